"""The official LLaVA data format -> training batches (input_ids, labels, attention_mask, pixel_values).

A record: `{"id", "image" (optional), "conversations": [{"from": "human"|"gpt", "value": ...}, ...]}`,
in a JSON list or JSONL. Every record's text is checked when the dataset is built; images are checked
when read. A bad record either stops the run (`on_error="raise"`) or is skipped and counted with its
reason (`"skip"`); it is never trained on silently, and never with a loss of 0.
"""
import json
from collections import Counter
from pathlib import Path

import torch

from .conversation import IMAGE, check_turns, tokenize_conversation
from .image import MAX_PIXELS, ImageError, load_image, preprocess
from .llama import IGNORE_INDEX


class DataError(ValueError):
    """A record that cannot be trained on; the message names the record id."""


def read_records(path) -> list:
    """A JSON list or JSONL file (decided by the content, not the extension)."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: not JSON ({e})") from e
    return records


def check_record(record) -> None:
    """Raises ValueError describing what is wrong with a record's structure and text."""
    if not isinstance(record, dict):
        raise ValueError("a record must be a JSON object")
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("empty or missing conversations")
    turns = check_turns(conversations)
    if len(turns) < 2:
        raise ValueError("no assistant reply to learn from")
    mentions = sum(text.count(IMAGE) for _, text in turns)
    if record.get("image") and mentions == 0:
        raise ValueError(f"has image {record['image']!r} but no {IMAGE} placeholder in its conversation")
    if not record.get("image") and mentions:
        raise ValueError(f"mentions {IMAGE} but has no image")
    if mentions > 1:
        raise ValueError(f"mentions {IMAGE} {mentions} times; one image per record")


class LlavaDataset(torch.utils.data.Dataset):
    def __init__(self, data_path, tok, image_folder=None, template="vicuna_v1", num_image_tokens=576,
                 image_token_id=-200, image_size=336, image_aspect="crop", max_length=2048, on_error="raise", max_pixels=MAX_PIXELS):
        if on_error not in ("raise", "skip"):
            raise ValueError("on_error must be 'raise' or 'skip'")
        self.tok, self.image_folder, self.template = tok, image_folder, template
        self.num_image_tokens, self.image_token_id = num_image_tokens, image_token_id
        self.image_size, self.image_aspect, self.max_length, self.on_error = image_size, image_aspect, max_length, on_error
        self.max_pixels, self.skipped = max_pixels, Counter()
        self.records = [r for i, r in enumerate(read_records(data_path)) if self.valid(i, r)]

    def record_id(self, index, record) -> str:
        return str(record.get("id", f"#{index}")) if isinstance(record, dict) else f"#{index}"

    def fail(self, record_id: str, reason: str):
        if self.on_error == "raise":
            raise DataError(f"record {record_id}: {reason}")
        self.skipped[reason.split(":")[0]] += 1

    def valid(self, index, record) -> bool:
        try:
            check_record(record)
        except ValueError as e:
            self.fail(self.record_id(index, record), str(e))
            return False
        return True

    def __len__(self):
        return len(self.records)

    def tokens(self, record) -> tuple:
        """(input_ids, labels), truncated to max_length; raises ValueError when nothing is left to learn."""
        ids, labels = tokenize_conversation(record["conversations"], self.tok, self.template,
                                            self.num_image_tokens, self.image_token_id, has_image=bool(record.get("image")))
        if len(ids) > self.max_length:
            cut = ids[self.max_length:]
            if self.image_token_id in cut:
                raise ValueError(f"truncation to {self.max_length} tokens would cut through the image tokens")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            raise ValueError(f"no supervised token left within max_length {self.max_length}")
        return ids, labels

    def pixels(self, record):
        image = load_image(record["image"], image_folder=self.image_folder, max_pixels=self.max_pixels)
        return preprocess(image, size=self.image_size, aspect=self.image_aspect)

    def __getitem__(self, i):
        record = self.records[i]
        rid = self.record_id(i, record)
        try:
            ids, labels = self.tokens(record)
            pixel_values = self.pixels(record) if record.get("image") else None
        except (ValueError, ImageError) as e:
            self.fail(rid, str(e))
            return None
        return {"id": rid, "input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixel_values}


def collate(items: list, pad_id: int = 0) -> dict:
    """Right padding (labels -100 on pads) + an attention mask; the images of the batch in record order.
    Skipped records (None) are dropped and counted."""
    kept = [it for it in items if it is not None]
    width = max((len(it["input_ids"]) for it in kept), default=0)
    ids = torch.full((len(kept), width), pad_id, dtype=torch.long)
    labels = torch.full((len(kept), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(kept), width), dtype=torch.long)
    for row, it in enumerate(kept):
        n = len(it["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = it["input_ids"], it["labels"], 1
    images = [it["pixel_values"] for it in kept if it["pixel_values"] is not None]
    return {"ids": [it["id"] for it in kept], "input_ids": ids, "labels": labels, "attention_mask": mask,
            "pixel_values": torch.stack(images) if images else None, "num_skipped": len(items) - len(kept)}
