"""What each training stage trains, with which loss (LLaVA Sec. 4.2), and one stage's run.

Stage 1 (feature alignment) trains only the projection W, with CLIP and the LLM frozen; stage 2
(end-to-end fine-tuning) trains W and the LLM, CLIP still frozen. `run_stage` trains a stage as its
settings (train/settings.py) say.
"""
import math
from typing import Optional

import torch

from ..conversation import IGNORE_INDEX
from ..data.dataset import LlavaDataset
from ..errors import DataError
from .devices import world
from .settings import LlavaStage, StageRun
from .trainer import TrainConfig, Trainer

FROZEN, TRAINED = False, True
# Sec. 4.2, the one place that says what trains: part -> trained? (LoRA replaces "language_model")
STAGE_PARTS = {
    "1": {"vision_tower": FROZEN, "projector": TRAINED, "language_model": FROZEN},
    "2": {"vision_tower": FROZEN, "projector": TRAINED, "language_model": TRAINED},
}


def freeze_for_stage(model, stage: str, lr: float, projector_lr: float = None, lora=None) -> list:
    """Sets requires_grad per part and returns the optimizer's parameter groups (one per trained part).
    With `lora` (a LoRAConfig), stage 2 trains LoRA adapters in place of the LLM's weights."""
    groups = []
    for part, trained in STAGE_PARTS[stage].items():
        module = getattr(model, part)
        module.requires_grad_(trained)
        if not trained:
            continue
        if part == "language_model" and lora is not None:
            from ..model.low_rank import add_lora
            module.requires_grad_(False)
            groups.append({"params": add_lora(module, lora), "lr": lr, "name": "lora"})
            continue
        part_lr = projector_lr if part == "projector" and projector_lr else lr
        extra = [model.image_newline] if part == "projector" and model.anyres is not None else []  # AnyRes row ends
        groups.append({"params": list(module.parameters()) + extra, "lr": part_lr, "name": part})
    model.vision_tower.eval()
    return groups


def master_weights(model, stage: str, lora) -> None:
    """Frozen weights in bf16; trained ones keep fp32 masters (AnyRes's row-end vector, trained with the
    projector, too: a bf16 copy would round most of its small updates away)."""
    for part, trained in STAGE_PARTS[stage].items():
        getattr(model, part).to(torch.float32 if trained and not (lora and part == "language_model") else torch.bfloat16)
    if model.anyres is not None:
        model.image_newline.data = model.image_newline.data.float()


# ---------------------------------------------------------------- losses: (sum over targets, target count)

def num_targets(batch) -> int:
    """Supervised tokens of a batch (labels are shifted by one inside the model)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if len(batch["input_ids"]) else 0


def with_blank_image(model, batch: dict) -> dict:
    """A micro-batch without images (text only, or every record skipped) gets a blank image that runs
    through the vision tower and the projector and is placed nowhere, as the official trainer does for
    text-only samples: under DDP / FSDP every process then runs the same modules in the same order and
    every trained parameter gets a gradient. A batch left with no rows gets one padding row."""
    llava = getattr(model, "module", model)  # DDP wraps the model; FSDP does not
    ids, size = batch["input_ids"], llava.cfg.vision.image_size
    if ids.shape[0] == 0:
        ids = torch.full((1, 1), llava.cfg.text.pad_token_id, dtype=ids.dtype, device=ids.device)
        batch = {**batch, "input_ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX)}
    tiles = 1 + math.prod(llava.anyres.grid((size, size))) if llava.anyres is not None else 1
    blank = {"pixel_values": torch.zeros(tiles, 3, size, size, device=ids.device), "image_unused": True}
    if llava.anyres is not None:
        blank["image_sizes"] = torch.tensor([[size, size]])
    return {**batch, **blank}


def llava_loss(model, batch) -> torch.Tensor:
    """Eq. 3 summed over the assistant tokens (Table 2: only they carry labels)."""
    n = num_targets(batch)
    if batch.get("pixel_values") is None:
        batch = with_blank_image(model, batch)
    logits, loss = model(batch["input_ids"], pixel_values=batch["pixel_values"], labels=batch["labels"],
                         image_sizes=batch.get("image_sizes"), return_logits=n == 0,
                         image_unused=batch.get("image_unused", False))
    return loss * n if n else logits.sum() * 0.0  # nothing to learn: a zero that reaches every trained parameter


# ---------------------------------------------------------------- one stage

def llava_dataset(run: StageRun, s: LlavaStage, model, tok, template: str, max_length: int):
    """Stage 1's or 2's records, every one checked before the first step (dropped here with --on-error skip)."""
    data = LlavaDataset(run.data, tok, image_folder=s.image_folder, template=template,
                        num_image_tokens=model.num_image_tokens, image_token_id=model.cfg.image_token_id,
                        image_size=model.cfg.vision.image_size, image_aspect=model.cfg.image_aspect_ratio,
                        max_length=max_length, on_error=s.on_error, anyres=model.anyres,
                        progress=run.loop.progress and world()[0] == 0)
    if data.dropped and world()[0] == 0:
        print(f"--on-error skip: {data.dropped} of {data.dropped + len(data)} records in {run.data} dropped before "
              "training: " + "; ".join(data.skip_log[:3]) + ("; ..." if data.dropped > 3 else ""))
    if len(data) == 0:
        raise DataError(f"{run.data}: no record left to train on, all {len(data.skip_log)} were skipped: "
                        + "; ".join(data.skip_log[:3]))
    if s.data_fraction < 1.0:  # a fixed, seeded subset (the half-data ablation)
        keep = torch.randperm(len(data), generator=torch.Generator().manual_seed(run.loop.seed))
        data = torch.utils.data.Subset(data, keep[: int(len(data) * s.data_fraction)].tolist())
    return data


def run_stage(run: StageRun, model, groups, dataset, collate_fn, loss_fn, count_fn, save, flops=0.0,
              group_by_length=False, chosen: Optional[dict] = None):
    """Trains one stage; `chosen`: the stage's settings a resumed run must share with its snapshot."""
    s, loop = run.steps, run.loop
    cfg = TrainConfig(out_dir=str(run.out), lr=s.lr, epochs=s.epochs, max_steps=loop.max_steps,
                      batch_size=s.batch_size, grad_accum=s.grad_accum, seed=loop.seed, resume=run.resume,
                      save_every=loop.save_every, stop_after=loop.stop_after, num_workers=loop.num_workers,
                      fsdp=loop.fsdp, group_by_length=group_by_length, bf16=loop.bf16, progress=loop.progress,
                      name=f"stage {run.stage}" if run.stage in ("1", "2") else run.stage,
                      data_file=str(run.data), fallback_out=loop.fallback_out and str(loop.fallback_out))
    trainer = Trainer(model, groups, dataset, collate_fn, loss_fn, count_fn, cfg, loop.device, flops, chosen)
    losses = trainer.fit(save)
    base = getattr(dataset, "dataset", dataset)  # (under a Subset)
    dropped = getattr(base, "dropped", 0)
    if (trainer.skipped_total or dropped) and trainer.rank == 0:
        reasons = getattr(base, "skip_log", [])  # (those found as batches came: without loader workers only)
        print(f"skipped bad records (--on-error skip): {dropped} when the data was read in, "
              f"{trainer.skipped_total} as the batches came (each time one came up)"
              + "".join(f"\n  {m}" for m in reasons[:5]) + ("\n  ..." if len(reasons) > 5 else ""))
    return losses
