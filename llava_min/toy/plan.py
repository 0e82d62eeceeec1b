"""The toy pipeline's plan: each step's settings, made from the toy preset and the few choices the pipeline
takes (`ToyRun`), and what each level of its outputs records it was made with.

The levels: the world (the data directory), the shared models (tokenizer, CLIP, LM: the output directory)
and each variant's stages 1 and 2 (OUT/variant). A later run with other values into the same directories
stops and names them, so outputs are never reused under settings they were not made with.
"""
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..train.recipes import given
from ..train.settings import Choices, Loop, StageRun, resolve, stage_steps
from .presets import TOY_PRESETS, ToyPreset


@dataclass
class ToyRun:
    """What the toy pipeline (`python train.py`) was asked to make; None: the preset's."""
    preset: str = "toy"
    world: str = "shapes"
    num_images: Optional[int] = None  # the world's training images
    num_eval: Optional[int] = None  # its held-out images
    clip_decorrelation: Optional[float] = None  # the toy CLIP's decorrelation term
    choices: Choices = field(default_factory=Choices)  # lr, epochs, batch, accumulation: every stage's
    no_stage1: bool = False  # ablation: stage 2 from a random projector
    no_stage2: bool = False  # ablation: alignment only, no instruction tuning
    data_fraction: float = 1.0  # ablation: this share of instruct.json
    out: Path = Path("runs/toy")
    data_dir: Path = Path("data/toy")

    @property
    def toy(self) -> ToyPreset:
        return TOY_PRESETS[self.preset]


ABLATIONS = {  # variant -> what makes it (the rows of the README's table; each is one flag of train.py)
    "full": {},
    "no-stage2": {"no_stage2": True},
    "no-stage1": {"no_stage1": True},
    "linear": {"projector": "linear"},
    "last-layer": {"select_layer": -1},
    "half-data": {"data_fraction": 0.5},
    "no-whiten": {"whiten_features": False},
}
# Per-world epochs, where they differ from the preset's (train.py's --epochs overrides them): the detail world's
# one-pixel patterns need longer in the CLIP and in both stages (docs/anyres.md).
WORLD_EPOCHS = {"detail": {"clip": 6.0, "stage 1": 2.0, "stage 2": 2.0}}


def with_row(run: ToyRun, row: dict) -> ToyRun:
    """`run` with an ablation row's values on top (ToyRun's own fields, or its choices')."""
    own = {k: v for k, v in row.items() if k in {f.name for f in dataclasses.fields(ToyRun)}}
    choices = dataclasses.replace(run.choices, **{k: v for k, v in row.items() if k not in own})
    return dataclasses.replace(run, choices=choices, **own)


def row_flags(row: dict) -> str:
    """An ablation row as train.py's flags."""
    def flag(k, v):
        name = k.replace("_", "-")
        return f"--{name}" if v is True else f"--no-{name}" if v is False else f"--{name} {v}"
    return " ".join(flag(k, v) for k, v in row.items())


def variant_name(run: ToyRun) -> str:
    c = run.choices
    parts = [name for name, on in [("no-stage1", run.no_stage1), ("no-stage2", run.no_stage2),
                                   ("linear", c.projector == "linear"), ("last-layer", c.select_layer == -1),
                                   ("half-data", run.data_fraction == 0.5), ("anyres", c.anyres),
                                   ("no-whiten", c.whiten_features is False)] if on]
    if run.data_fraction not in (0.5, 1.0):
        parts.append(f"data-{run.data_fraction:g}")
    return "-".join(parts) or "full"


def stage_epochs(run: ToyRun, name: str) -> Optional[float]:
    """A step's epochs: --epochs, else its world's (WORLD_EPOCHS), else None (the preset's)."""
    return run.choices.epochs or WORLD_EPOCHS.get(run.world, {}).get(name)


def in_world(run: ToyRun, name: str) -> Choices:
    return dataclasses.replace(run.choices, epochs=stage_epochs(run, name))


def made_with(run: ToyRun, loop: Loop) -> tuple:
    """What the world, the shared models and the variant depend on (recorded in world.json, settings.json and
    VARIANT/settings.json), with the preset's value where nothing was chosen, so giving a default is the same run."""
    toy, c = run.toy, run.choices
    world = {"preset": run.preset, "seed": loop.seed, "world": run.world,
             "num_images": run.num_images or toy.num_images, "num_eval": run.num_eval or toy.num_eval}
    models = {**world, "max_steps": loop.max_steps, "epochs": c.epochs, "batch_size": c.batch_size,
              "grad_accum": c.grad_accum, "lr": c.lr, "clip_decorrelation": run.clip_decorrelation}
    stage2 = resolve(toy.recipe, "2", c, toy.whiten_features)[1]
    lora = {"lora_r": c.lora.r, "lora_alpha": c.lora.alpha, "lora_dropout": c.lora.dropout} if c.lora else {}
    variant = {"no_stage1": run.no_stage1, "no_stage2": run.no_stage2, "data_fraction": run.data_fraction,
               "projector": stage2.recipe.projector, "select_layer": stage2.recipe.select_layer,
               "template": stage2.recipe.template, "max_length": stage2.recipe.max_length,
               "group_by_length": stage2.recipe.group_by_length, "whiten_features": stage2.whiten_features,
               "anyres": c.anyres, "projector_lr": c.projector_lr, "grad_checkpointing": c.grad_checkpointing,
               "lora": c.lora is not None, **lora}
    return world, models, variant


def interrupted(out: Path) -> bool:
    return (out / "resume" / "state.pt").is_file()  # (--save-every N wrote it)


def plan(run: ToyRun, loop: Loop) -> dict:
    """Each step after the data: name -> (its output, the arguments of its stage function), in running order."""
    toy, data, root, run_dir = run.toy, run.data_dir, run.out, run.out / variant_name(run)
    tokenizer, images, clip, lm = root / "tokenizer.model", data / "images", root / "clip", root / "lm"

    def pretraining(name, recipe, corpus):
        return StageRun(name, data / corpus, root / name, stage_steps(recipe, in_world(run, name)), loop,
                        resume=interrupted(root / name))
    steps = {"tokenizer": (tokenizer, (data / "corpus.txt", tokenizer, toy)),
             "clip": (clip, (pretraining("clip", toy.clip, "pretrain.json"),
                             given(toy, clip_decorrelation=run.clip_decorrelation), tokenizer, images)),
             "lm": (lm, (pretraining("lm", toy.lm, "corpus.txt"), toy, tokenizer))}
    for name, key, records, skipped in (("stage 1", "1", "pretrain.json", run.no_stage1),
                                        ("stage 2", "2", "instruct.json", run.no_stage2)):
        if skipped:
            continue
        out = run_dir / f"stage{key}"
        init = run_dir / "stage1" if key == "2" and not run.no_stage1 else None
        stage_steps_, stage = resolve(toy.recipe, key, in_world(run, name), toy.whiten_features, image_folder=images,
                                      tokenizer=tokenizer, init=init, vision=clip, llm=lm,
                                      data_fraction=run.data_fraction if key == "2" else 1.0)
        steps[name] = (out, (StageRun(key, data / records, out, stage_steps_, loop, resume=interrupted(out)), stage))
    return steps
