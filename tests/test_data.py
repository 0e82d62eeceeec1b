"""The dataset: official records in, aligned ids/labels/images out; bad records named and counted."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from llava_min.data import DataError, LlavaDataset, collate
from llava_min.tokenizer import Tokenizer

GOOD = {"id": "good", "image": "a.png", "conversations": [
    {"from": "human", "value": "<image>\nHow many circles are there?"}, {"from": "gpt", "value": "There are 2 circles."}]}
TEXT_ONLY = {"id": "text", "conversations": [{"from": "user", "value": "Say a red square."},
                                             {"from": "assistant", "value": "A red square."}]}


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(images / "a.png")
    Image.new("RGBA", (16, 16), (0, 0, 255, 128)).save(images / "rgba.png")
    Image.fromarray(np.zeros((400, 400, 3), dtype=np.uint8)).save(images / "huge.png")
    (images / "broken.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "outside.png").write_bytes((images / "a.png").read_bytes())
    return images


def dataset(tmp_path, records, tok, folder, jsonl=False, **kw):
    path = tmp_path / ("data.jsonl" if jsonl else "data.json")
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    kw = {"num_image_tokens": 4, "image_token_id": 299, "image_size": 16, **kw}
    return LlavaDataset(path, tok, image_folder=folder, **kw)


def with_image(image, rid="r"):
    return {**GOOD, "id": rid, "image": image}


def test_item_and_collate(tmp_path, tiny_tokenizer, folder):
    tok = Tokenizer(tiny_tokenizer)
    ds = dataset(tmp_path, [GOOD, TEXT_ONLY, with_image("rgba.png")], tok, folder, jsonl=True)
    items = [ds[i] for i in range(3)]
    assert items[0]["pixel_values"].shape == (3, 16, 16) and items[1]["pixel_values"] is None
    assert (items[0]["input_ids"] == 299).sum() == 4
    batch = collate(items, pad_id=tok.pad_id)
    T = max(len(it["input_ids"]) for it in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, T)
    assert batch["pixel_values"].shape == (2, 3, 16, 16)  # only the records with an image, in order
    short = int(batch["attention_mask"][1].sum())
    assert (batch["labels"][1, short:] == -100).all() and (batch["input_ids"][1, short:] == tok.pad_id).all()
    assert batch["ids"] == ["good", "text", "r"] and batch["num_skipped"] == 0


BAD_RECORDS = [
    ({"id": "e1", "conversations": []}, "record e1: empty or missing conversations"),
    ({"id": "e2", "image": "a.png", "conversations": [{"from": "gpt", "value": "<image>\nhi"},
                                                      {"from": "human", "value": "x"}]}, "record e2: turn 0: roles out of order"),
    ({"id": "e3", "conversations": GOOD["conversations"]}, "record e3: mentions <image> but has no image"),
    ({"id": "e4", "image": "a.png", "conversations": TEXT_ONLY["conversations"]}, "record e4: has image 'a.png' but no <image>"),
    ({"id": "e5", "image": "a.png", "conversations": GOOD["conversations"][:1]}, "record e5: no assistant reply"),
]
BAD_IMAGES = [("missing.png", "does not exist"), ("broken.png", "cannot be read"), ("huge.png", "more than the limit"),
              ("../outside.png", "outside the image folder")]


@pytest.mark.parametrize("record,message", BAD_RECORDS)
def test_bad_records_raise_with_their_id(tmp_path, tiny_tokenizer, folder, record, message):
    with pytest.raises(DataError, match=message.replace("(", "\\(")):
        dataset(tmp_path, [GOOD, record], Tokenizer(tiny_tokenizer), folder)


@pytest.mark.parametrize("image,message", BAD_IMAGES)
def test_bad_images_raise_with_record_id_and_file(tmp_path, tiny_tokenizer, folder, image, message):
    ds = dataset(tmp_path, [with_image(image, "img1")], Tokenizer(tiny_tokenizer), folder, max_pixels=100_000)
    with pytest.raises(DataError, match=f"record img1: .*{message}"):
        ds[0]


def test_skip_mode_counts_and_drops(tmp_path, tiny_tokenizer, folder):
    records = [GOOD] + [r for r, _ in BAD_RECORDS] + [with_image("missing.png", "m")]
    ds = dataset(tmp_path, records, Tokenizer(tiny_tokenizer), folder, on_error="skip")
    assert len(ds) == 2 and sum(ds.skipped.values()) == len(BAD_RECORDS)
    batch = collate([ds[0], ds[1]])
    assert batch["ids"] == ["good"] and batch["num_skipped"] == 1 and sum(ds.skipped.values()) == len(BAD_RECORDS) + 1


def test_truncation_keeps_alignment_and_skips_empty_targets(tmp_path, tiny_tokenizer, folder):
    tok = Tokenizer(tiny_tokenizer)
    full = dataset(tmp_path, [GOOD], tok, folder)[0]
    n = len(full["input_ids"])
    cut = dataset(tmp_path, [GOOD], tok, folder, max_length=n - 2)[0]
    assert torch.equal(cut["input_ids"], full["input_ids"][: n - 2]) and torch.equal(cut["labels"], full["labels"][: n - 2])
    first_target = int((full["labels"] != -100).nonzero()[0])
    with pytest.raises(DataError, match="no supervised token left within max_length"):
        dataset(tmp_path, [GOOD], tok, folder, max_length=first_target)[0]
    with pytest.raises(DataError, match="would cut through the image tokens"):
        dataset(tmp_path, [GOOD], tok, folder, max_length=3)[0]
