"""Training recipes by name: each stage's learning rate, epochs and batch, and the model's settings.

The official recipes are LLaVA-1.5's scripts (scripts/v1_5/pretrain.sh, finetune.sh in the official
repository) and LLaVA-NeXT's stage 2 on AnyRes tiles; the toy presets live in llava_min/toy/presets.py.
"""
import dataclasses
from dataclasses import dataclass


@dataclass
class StageSettings:
    lr: float
    epochs: float = 1.0
    batch_size: int = 16
    grad_accum: int = 1


@dataclass
class Preset:
    stage1: StageSettings
    stage2: StageSettings
    projector: str = "mlp2x_gelu"
    select_layer: int = -2
    template: str = "vicuna_v1"
    image_aspect: str = "pad"  # stage 2's (and the finished model's); stage 1 center-crops (pretrain.sh)
    max_length: int = 2048
    grad_checkpointing: bool = False
    anyres: bool = False  # stage 2 on AnyRes tiles (LLaVA-NeXT)
    group_by_length: bool = False  # stages 1 and 2: batches of records of similar length (less padding)


RECIPES = {
    # LLaVA-1.5's official recipe. Global batch 256 / 128 = batch x accumulation x GPUs.
    "llava-v1.5-7b": Preset(stage1=StageSettings(lr=1e-3, batch_size=16, grad_accum=16),
                            stage2=StageSettings(lr=2e-5, batch_size=8, grad_accum=16), grad_checkpointing=True),
    # LLaVA-NeXT's recipe on the same parts: stage 2 on AnyRes tiles with row-end tokens.
    "llava-next-7b": Preset(stage1=StageSettings(lr=1e-3, batch_size=16, grad_accum=16),
                            stage2=StageSettings(lr=2e-5, batch_size=8, grad_accum=16), grad_checkpointing=True,
                            anyres=True),
}


def given(settings, **values):
    """`settings` (a recipe's dataclass) with the values a run chose in place of its own; None keeps its own."""
    return dataclasses.replace(settings, **{k: v for k, v in values.items() if v is not None})
