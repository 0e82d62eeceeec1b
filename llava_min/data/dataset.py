"""The official LLaVA data format -> training batches (input_ids, labels, attention_mask, pixel_values).

A record: `{"id", "image" (optional), "conversations": [{"from": "human"|"gpt", "value": str}, ...]}`,
in a JSON list or JSONL. Every record is checked when the dataset is built, before the first step: its
turns, a unique id, its image's header (format, size, the pixel limit; no pixel decoded) and its tokens
after truncation; only a file whose pixels are broken past a good header is found when it is read. Bad
records either stop the run (`on_error="raise"`: one DataError naming the
first few and counting them all) or are skipped and counted with their reasons (`"skip"`); a record is
never trained on silently, and never with a loss of 0. A bad record is a DataError or an ImageError, raised
by an explicit check where the fault is found; any other error is a bug and stops the run with its traceback.
"""
import dataclasses
import json
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from ..conversation import IGNORE_INDEX, IMAGE, TEMPLATES, check_turns, tokenize_conversation
from ..errors import DataError, ImageError
from .image import (MAX_PIXELS, ImageInput, ImageSettings, check_image_folder, check_work_size, find_image,
                    image_input, load_image, read_header)

# ---------------------------------------------------------------- reading and checking records

def read_records(path) -> list:
    """A JSON list or JSONL file, decided by the content, not the extension."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    if text.lstrip().startswith("{"):  # one object: a record on its own, or not the records at all
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None  # JSONL: one record per line
        if isinstance(whole, dict) and "conversations" not in whole:
            raise DataError(f"{path}: a JSON object, expected a JSON list of records (or one record per line)")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not a valid JSON list ({e})") from e
        return records
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {n}: not JSON ({e}); expected a JSON list or one record per line") from e
    return records


def check_record(record, template: str = "vicuna_v1") -> None:
    """Raises DataError("<what is wrong>: <detail>") for a record that cannot be trained on."""
    if not isinstance(record, dict):
        raise DataError(f"not a record: a {type(record).__name__}, expected a JSON object")
    if not record.get("conversations"):
        raise DataError("empty conversation: 'conversations' is missing or empty")
    turns = check_turns(record["conversations"])
    if len(turns) % 2:
        raise DataError("unanswered turn: the conversation ends with a human turn, nothing answers it")
    if template == "plain" and len(turns) != 2:
        raise DataError(f"not a caption pair: the plain template takes one human turn and one reply, got {len(turns)}")
    if any(not text.strip() for role, text in turns if role == 1):
        raise DataError("empty reply: an assistant turn has no text")
    if any(not text.replace(IMAGE, "").strip() for role, text in turns[2:] if role == 0) or \
            (not record.get("image") and not turns[0][1].strip()):
        raise DataError("empty question: a human turn has no text (only the first may hold the image alone)")
    image = record.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise DataError(f"bad image field: {image!r} is not a file name (one image per record)")
    if any(IMAGE in text for role, text in turns if role == 1):
        raise DataError(f"{IMAGE} in a reply: the placeholder belongs to a human turn")
    mentions = sum(text.count(IMAGE) for _, text in turns)
    if image and mentions == 0:
        raise DataError(f"image without {IMAGE}: has image {image!r} but no {IMAGE} placeholder in its turns")
    if not image and mentions:
        raise DataError(f"{IMAGE} without image: a turn mentions {IMAGE} but the record has no image")
    if mentions > 1:
        raise DataError(f"several {IMAGE}: mentions {IMAGE} {mentions} times, one image per record")


def checked_records(path, image_folder=None, check=check_record, progress: bool = False) -> tuple:
    """Every record of a file checked before training: `check(record)`, its image file inside `image_folder`
    and an id no earlier record has. Returns ([(id, record)] of the good ones, [(id, what is wrong)] of the bad
    ones)."""
    check_image_folder(image_folder)
    good, bad, seen = [], [], {}
    records = read_records(path)
    for index, record in enumerate(tqdm(records, desc="checking records", unit="rec", delay=2, disable=not progress)):
        rid = record_id(index, record)
        try:
            check_unique(rid, index, seen)
            check(record)
            if record.get("image"):
                find_image(record["image"], image_folder)
        except ImageError as e:
            bad.append((rid, f"bad image: {e}"))
        except DataError as e:
            bad.append((rid, str(e)))
        else:
            good.append((rid, record))
    return good, bad


def check_unique(rid: str, index: int, seen: dict) -> None:
    """An id names one record (a skip, a prediction or a log line points at it): a second use is an error."""
    if rid in seen:
        raise DataError(f"duplicate id: {rid!r} is also the id of record #{seen[rid]} (ids must be unique)")
    seen[rid] = index


def bad_records(path, bad: list, total: int, hint: str = "") -> DataError:
    """One error for all the bad records of a file: the first few named, all counted."""
    if len(bad) == 1:
        return DataError(f"{path}: record {bad[0][0]}: {bad[0][1]}" + hint)
    named = "; ".join(f"record {rid}: {reason}" for rid, reason in bad[:3])
    return DataError(f"{path}: {len(bad)} of {total} records cannot be used: {named}"
                     + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "") + hint)


def record_id(index: int, record) -> str:
    """The record's own id, else its position in the file."""
    rid = record.get("id") if isinstance(record, dict) else None
    return str(rid) if rid not in (None, "") else f"#{index}"


def truncate(ids: list, labels: list, max_length: int, image_token_id: int) -> tuple:
    """(input_ids, labels) cut to max_length, as training reads them; raises DataError when the cut goes
    through the image tokens or leaves nothing supervised (the record is then skipped)."""
    if len(ids) > max_length:
        if image_token_id in ids[max_length:]:  # features and image tokens would not match
            raise DataError(f"truncation cuts the image: {len(ids)} tokens, max_length {max_length} "
                            "would cut through the image tokens")
        ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels[1:]):  # labels[0] is never predicted
        raise DataError(f"nothing to learn: no supervised token left within max_length {max_length}")
    return ids, labels


# ---------------------------------------------------------------- the dataset

class LlavaDataset(torch.utils.data.Dataset):
    """Records -> dict(id, input_ids, labels, pixel_values, image_size); None for a record skipped at read time.

    The image settings are the model's (those of `ImageSettings.of(model.cfg)`); `num_image_tokens` is an
    int, or a function of the PIL image giving its count. `skipped` counts skips by reason and `skip_log` keeps
    their messages; with DataLoader workers the read-time skips are counted in the workers, and what
    reaches the trainer is collate's `num_skipped`."""

    def __init__(self, data_path, tok, image_folder=None, template="vicuna_v1", num_image_tokens=576,
                 image_token_id=-200, image_size=336, image_aspect="crop", max_length=2048, on_error="raise",
                 max_pixels=MAX_PIXELS, anyres=None, progress: bool = False):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; known: {', '.join(TEMPLATES)}")
        if image_aspect not in ("crop", "pad"):
            raise ValueError(f"image_aspect must be 'crop' or 'pad', got {image_aspect!r}")
        self.tok, self.image_folder, self.template = tok, image_folder, template
        self.num_image_tokens, self.image_token_id = num_image_tokens, image_token_id
        self.max_length, self.on_error, self.max_pixels, self.anyres = max_length, on_error, max_pixels, anyres
        self.images = ImageSettings(image_size, image_aspect, anyres, 0 if callable(num_image_tokens) else
                                    num_image_tokens)
        self.skipped, self.skip_log = Counter(), []  # reason -> count; the full messages
        # (id, record) of the records that passed the checks; the others stop the run, or are dropped here
        self.records, bad = checked_records(data_path, image_folder, self.check, progress)
        if bad and on_error == "raise":
            raise bad_records(data_path, bad, len(self.records) + len(bad), " (--on-error skip trains without them)")
        for rid, reason in bad:
            self.fail(rid, reason)
        self.dropped = len(bad)  # records that failed the checks, never read again

    def check(self, record) -> None:
        """What training would find about a record, short of decoding its image: its turns, its image's
        header and its tokens after truncation (a DataError or an ImageError)."""
        check_record(record, self.template)
        count = self.header_tokens(read_header(record["image"], self.image_folder, self.max_pixels)) \
            if record.get("image") else 0
        self.tokens(record, count)

    def header_tokens(self, image) -> int:
        """The visual tokens of an image known by its header (its size), as `view` will count them."""
        if callable(self.num_image_tokens):
            return self.num_image_tokens(image)
        if self.anyres is not None:
            return self.anyres.num_tokens((image.height, image.width))
        check_work_size(image.width, image.height, self.images.image_size, self.images.aspect)
        return self.num_image_tokens

    def fail(self, rid: str, reason: str) -> None:
        """Raise, or count the skip under the reason's first words ("<what is wrong>: <detail>")."""
        message = f"record {rid}: {reason}"
        if self.on_error == "raise":
            raise DataError(message)
        self.skipped[reason.split(":")[0]] += 1
        self.skip_log.append(message)

    def __len__(self):
        return len(self.records)

    @property
    def lengths(self) -> list:
        """A cheap length per record, for batches of similar lengths: its words, plus its image tokens where
        that count is fixed (as the official LLaVA's `lengths`, which counts 128 for any image)."""
        fixed = self.num_image_tokens if isinstance(self.num_image_tokens, int) and self.anyres is None else 0
        return [sum(len(turn["value"].split()) for turn in record["conversations"])
                + (fixed if record.get("image") else 0) for _, record in self.records]

    def tokens(self, record, num_image_tokens: int) -> tuple:
        """(input_ids, labels) truncated to max_length; raises DataError when that breaks the sample."""
        ids, labels = tokenize_conversation(record["conversations"], self.tok, self.template, num_image_tokens,
                                            self.image_token_id, has_image=bool(record.get("image")))
        return truncate(ids, labels, self.max_length, self.image_token_id)

    def load(self, record):
        try:
            return load_image(record["image"], image_folder=self.image_folder, max_pixels=self.max_pixels)
        except ImageError as e:
            raise DataError(f"bad image: {e}") from e

    def view(self, record, image) -> ImageInput:
        """The image as the model takes it: pixels, size and visual-token count."""
        try:
            view = image_input(image, self.images)
        except ImageError as e:
            raise DataError(f"bad image: {record['image']}: {e}") from e
        if callable(self.num_image_tokens):  # a count that depends on the image
            return dataclasses.replace(view, num_tokens=self.num_image_tokens(image))
        return view

    def __getitem__(self, i):
        rid, record = self.records[i]
        try:
            image = self.load(record) if record.get("image") else None
            view = self.view(record, image) if image is not None else None
            ids, labels = self.tokens(record, view.num_tokens if view is not None else 0)
        except DataError as e:  # a bad record (a bug is no DataError: it keeps its traceback)
            self.fail(rid, str(e))
            return None
        item = {"id": rid, "input_ids": torch.tensor(ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long), "pixel_values": None}
        if view is not None:
            item["pixel_values"], item["image_size"] = view.pixel_values, view.size
        return item


@contextmanager
def uncounted_skips(dataset):
    """Reads inside leave `skipped` and `skip_log` as they were: for a look at the data before training
    (which reads the same records again and counts their skips then). Sees through a Subset."""
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    saved = (Counter(base.skipped), list(base.skip_log)) if isinstance(base, LlavaDataset) else None
    try:
        yield dataset
    finally:
        if saved is not None:
            base.skipped, base.skip_log = saved


def collate(items: list, pad_id: int = 0) -> dict:
    """Right padding (labels -100 on pads) and an attention mask; the images' views of the batch one after
    the other in record order, with their sizes (None when no record has one). Skipped records (None) are
    dropped and counted."""
    kept = [it for it in items if it is not None]
    width = max((len(it["input_ids"]) for it in kept), default=0)
    ids = torch.full((len(kept), width), pad_id, dtype=torch.long)
    labels = torch.full((len(kept), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(kept), width), dtype=torch.long)
    for row, it in enumerate(kept):
        n = len(it["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = it["input_ids"], it["labels"], 1
    images = [it["pixel_values"] for it in kept if it["pixel_values"] is not None]
    sizes = [it["image_size"] for it in kept if "image_size" in it]
    pixels = torch.cat(images) if images else None
    batch = {"ids": [it["id"] for it in kept], "input_ids": ids, "labels": labels, "attention_mask": mask,
             "pixel_values": pixels, "num_skipped": len(items) - len(kept)}
    if sizes:
        batch["image_sizes"] = torch.tensor(sizes)
    return batch
