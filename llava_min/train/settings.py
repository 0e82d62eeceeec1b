"""One training stage's settings, resolved before it starts: what it reads and writes, the loop, and for
LLaVA's two stages the recipe with the run's own choices in place. train.py fills them from its command
line, the toy pipeline from its preset and the few choices it takes; a stage reads nothing else."""
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint.save import finished_checkpoint
from ..model.low_rank import LoRAConfig
from .recipes import Preset, StageSettings, given


@dataclass
class Loop:
    """How the training loop runs, the same for every stage of one command."""
    seed: int = 0
    max_steps: Optional[int] = None  # in place of the epochs
    save_every: int = 0  # steps between resumable snapshots (0: none)
    stop_after: Optional[int] = None  # leave after this many steps with a resumable snapshot
    num_workers: int = 0  # processes loading batches
    fsdp: bool = False  # under torchrun: FSDP instead of DDP
    bf16: Optional[bool] = None  # bf16 autocast; None: where the hardware has it
    device: str = "cpu"
    progress: bool = True
    fallback_out: Optional[Path] = None  # where the trained model goes if --out's disk is full at the final save


@dataclass
class StageRun:
    """One stage's training data, output directory, steps (lr, epochs, batch, accumulation) and loop."""
    stage: str  # "1", "2", or one of the toy's pretraining stages ("clip", "lm")
    data: Path
    out: Path
    steps: StageSettings
    loop: Loop
    resume: bool = False  # continue from out/resume


@dataclass
class Choices:
    """What a run chose for stages 1 and 2 in place of its recipe's (None: the recipe's)."""
    lr: Optional[float] = None
    epochs: Optional[float] = None
    batch_size: Optional[int] = None
    grad_accum: Optional[int] = None
    projector_lr: Optional[float] = None
    projector: Optional[str] = None
    select_layer: Optional[int] = None
    template: Optional[str] = None
    max_length: Optional[int] = None
    grad_checkpointing: Optional[bool] = None
    group_by_length: Optional[bool] = None
    anyres: bool = False  # stage 2 on AnyRes tiles (a recipe's own AnyRes stays on without it)
    whiten_features: Optional[bool] = None  # train the projector in whitened coordinates (llava_min/toy/whiten.py)
    lora: Optional[LoRAConfig] = None  # stage 2: LoRA adapters in place of the LLM's weights


@dataclass
class LlavaStage:
    """Stage 1 or 2 besides its run: the parts it starts from and the recipe as this run resolved it."""
    recipe: Preset  # the model's settings, the run's choices in place
    image_folder: Optional[Path] = None
    tokenizer: Optional[Path] = None  # None: the one beside init, or llm
    init: Optional[Path] = None  # stage 2: the stage-1 directory
    vision: Optional[Path] = None
    llm: Optional[Path] = None
    projector_lr: Optional[float] = None  # None: the stage's lr
    lora: Optional[LoRAConfig] = None
    whiten_features: bool = False
    data_fraction: float = 1.0  # a fixed, seeded share of the records
    on_error: str = "raise"  # bad records: "raise" or "skip"
    dtype: torch.dtype = torch.float32  # the weights' as they load


def stage_steps(recipe: StageSettings, choices: Choices) -> StageSettings:
    """A stage's lr, epochs, batch and accumulation: the recipe's where the run chose none."""
    return given(recipe, lr=choices.lr, epochs=choices.epochs, batch_size=choices.batch_size,
                 grad_accum=choices.grad_accum)


def resolve(preset: Preset, stage: str, choices: Choices, whiten: bool = False, **parts) -> tuple:
    """(steps, LlavaStage) of stage "1" or "2": the preset's settings where the run chose none (`whiten`:
    the default for whitening); `parts`: LlavaStage's files and data handling."""
    recipe = preset.stage1 if stage == "1" else preset.stage2
    lora = choices.lora if stage == "2" else None
    lr, projector_lr = choices.lr, choices.projector_lr
    if lora is not None:  # LLaVA-1.5's LoRA recipe (scripts/v1_5/finetune_lora.sh): adapters at 10x, projector 1x
        lr, projector_lr = 10 * recipe.lr if lr is None else lr, projector_lr or recipe.lr
    steps = stage_steps(recipe, dataclasses.replace(choices, lr=lr))
    model = given(preset, projector=choices.projector, select_layer=choices.select_layer, template=choices.template,
                  max_length=choices.max_length, grad_checkpointing=choices.grad_checkpointing,
                  group_by_length=choices.group_by_length, anyres=choices.anyres or None)
    whiten = whiten if choices.whiten_features is None else choices.whiten_features
    return steps, LlavaStage(model, projector_lr=projector_lr, lora=lora, whiten_features=whiten, **parts)


def fallback_problem(spare: Path, out: Path, stage: str) -> Optional[str]:
    """What is wrong with --fallback-out: it must differ from --out, serve a trained stage, hold no finished model."""
    done = finished_checkpoint(spare, recover=False)
    why = ("is for the trained stages (1, 2, clip, lm)" if stage == "tokenizer" else
           "is --out: give a directory on another disk" if spare.resolve() == out.resolve() else
           f"holds a finished model ({done.name}): give an empty directory" if done else None)
    return why and f"--fallback-out {spare} {why}"
