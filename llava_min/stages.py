"""What each training stage trains, on what data, with which loss.

LLaVA Sec. 4.2: stage 1 (feature alignment) trains only the projection W, with CLIP and the LLM
frozen; stage 2 (end-to-end fine-tuning) trains W and the LLM, CLIP still frozen. The toy world adds
two stages before them, because LLaVA starts from a pretrained CLIP and a pretrained LLM:
`clip` (contrastive image-caption pretraining) and `lm` (next-token pretraining on text).
"""
import math
from pathlib import Path

import torch

from .data import DataError, check_record, read_records, record_id
from .image import ImageError, load_image, preprocess
from .llama import IGNORE_INDEX

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
            from .lora import add_lora
            module.requires_grad_(False)
            groups.append({"params": add_lora(module, lora), "lr": lr, "name": "lora"})
            continue
        part_lr = projector_lr if part == "projector" and projector_lr else lr
        extra = [model.image_newline] if part == "projector" and model.anyres is not None else []  # AnyRes row ends
        groups.append({"params": list(module.parameters()) + extra, "lr": part_lr, "name": part})
    model.vision_tower.eval()
    return groups


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


def lm_loss(model, batch) -> torch.Tensor:
    _, loss = model(batch["input_ids"], labels=batch["labels"], return_logits=False)
    return loss * num_targets(batch)


def clip_loss(model, batch) -> torch.Tensor:
    return model(batch["pixel_values"], batch["input_ids"], batch["eot_index"])


# ---------------------------------------------------------------- toy datasets

class PackedText(torch.utils.data.Dataset):
    """`corpus.txt` (one document per line) as BOS doc EOS BOS doc EOS ..., cut into equal windows."""

    def __init__(self, corpus_path, tok, seq_len: int):
        ids = []
        for line in Path(corpus_path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                ids += tok.encode(line.strip(), bos=True, eos=True)
        self.windows = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return self.windows[i]


def collate_text(windows) -> dict:
    ids = torch.stack(windows)
    return {"input_ids": ids, "labels": ids}


class CaptionPairs(torch.utils.data.Dataset):
    """(image, caption) pairs from an LLaVA-format caption file (the stage-1 `pretrain.json`)."""

    def __init__(self, data_path, image_folder, tok, image_size: int, max_len: int = 64):
        """Every record is checked here; a bad one stops the run naming the file and the record (this toy
        stage has no --on-error skip: its data is generated)."""
        self.data_path, self.records = data_path, read_records(data_path)
        for n, r in enumerate(self.records):
            try:
                if not isinstance(r, dict) or "image" not in r or not r.get("conversations"):
                    raise ValueError("a caption pair needs 'image' and 'conversations'")
                check_record(r, "plain")
            except ValueError as e:
                raise DataError(f"{data_path}: record {record_id(n, r)}: {e}") from e
        self.image_folder, self.tok, self.image_size, self.max_len = image_folder, tok, image_size, max_len

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        record = self.records[i]
        caption = record["conversations"][-1]["value"]
        ids = self.tok.encode(caption, bos=True)[: self.max_len - 1] + [self.tok.eos_id]
        try:
            image = load_image(record["image"], image_folder=self.image_folder)
        except ImageError as e:
            raise DataError(f"{self.data_path}: record {record_id(i, record)}: bad image: {e}") from e
        return torch.tensor(ids), preprocess(image, size=self.image_size, aspect="crop")


def collate_pairs(pairs, pad_id: int = 0) -> dict:
    lengths = torch.tensor([len(ids) for ids, _ in pairs])
    ids = torch.full((len(pairs), int(lengths.max())), pad_id)
    for row, (caption, _) in enumerate(pairs):
        ids[row, : len(caption)] = caption
    return {"input_ids": ids, "eot_index": lengths - 1, "pixel_values": torch.stack([p for _, p in pairs])}


# ---------------------------------------------------------------- MFU accounting

def count_params(module, embeddings: bool = False) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if embeddings or "embed" not in n)


def llava_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per sequence token, from what trains (call it after `freeze_for_stage`): 6N for a trained
    weight (2N forward, 2N for its gradient, 2N for its input's), 4N for a frozen LLM weight that gradients
    pass through (stage 1, and the base under LoRA), 4N for the projector (CLIP below it needs no gradient),
    2N for CLIP; attention, which has no weights, 12·L·d·T in both stages. Visual tokens are a fraction of T."""
    llm, cfg = model.language_model, model.cfg.text
    image_share = min(1.0, model.num_image_tokens / seq_len)
    weights = sum(p.numel() * (6 if p.requires_grad else 4) for n, p in llm.named_parameters() if "embed" not in n)
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
    vision = (2 * count_params(model.vision_tower) + 4 * count_params(model.projector)) * image_share
    return weights + attention + vision
