"""The dataset: official records in, aligned ids/labels/images out; bad records named and counted."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from llava_min.conversation import tokenize_conversation
from llava_min.data.dataset import DataError, LlavaDataset, collate, uncounted_skips
from llava_min.files import InputError
from llava_min.tokenizer import Tokenizer

GOOD = {"id": "good", "image": "a.png",
        "conversations": [{"from": "human", "value": "How many circles are there?\n<image>"},
                          {"from": "gpt", "value": "There are 2 circles."}]}
TEXT_ONLY = {"id": "text", "conversations": [{"from": "user", "value": "Say a red square."},
                                             {"from": "assistant", "value": "A red square."}]}
N_IMAGE = 4


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return Tokenizer(tiny_tokenizer)


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(images / "a.png")
    Image.new("RGBA", (16, 16), (0, 0, 255, 128)).save(images / "rgba.png")
    Image.fromarray(np.zeros((400, 400, 3), dtype=np.uint8)).save(images / "huge.png")
    (images / "broken.png").write_bytes(b"\x89PNG broken")
    (images / "text.png").write_text("not an image, only named like one")
    cut = images / "cut.png"  # a good header, its pixels cut short
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:300])
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (images / "link.png").symlink_to(tmp_path / "outside.png")
    return images


def dataset(tmp_path, records, tok, folder, jsonl=False, name=None, **kw):
    path = tmp_path / (name or ("data.jsonl" if jsonl else "data.json"))
    path.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records, indent=1))
    kw = {"num_image_tokens": N_IMAGE, "image_token_id": tok.vocab_size, "image_size": 16, **kw}
    return LlavaDataset(path, tok, image_folder=folder, **kw)


def with_image(image, rid="r"):
    return {**GOOD, "id": rid, "image": image}


def test_item_matches_the_conversation_tokenizer(tmp_path, tok, folder):
    item = dataset(tmp_path, [GOOD], tok, folder)[0]
    ids, labels = tokenize_conversation(GOOD["conversations"], tok, "vicuna_v1", N_IMAGE, tok.vocab_size)
    assert item["id"] == "good" and item["input_ids"].tolist() == ids and item["labels"].tolist() == labels
    assert item["input_ids"].dtype == item["labels"].dtype == torch.long
    assert item["pixel_values"].shape == (1, 3, 16, 16) and item["pixel_values"].dtype == torch.float32


def test_item_and_collate(tmp_path, tok, folder):
    ds = dataset(tmp_path, [GOOD, TEXT_ONLY, with_image("rgba.png")], tok, folder, jsonl=True)
    items = [ds[i] for i in range(3)]
    assert items[1]["pixel_values"] is None and (items[0]["input_ids"] == tok.vocab_size).sum() == N_IMAGE
    batch = collate(items, pad_id=tok.pad_id)
    T = max(len(it["input_ids"]) for it in items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, T)
    assert batch["input_ids"].dtype == batch["labels"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["pixel_values"].shape == (2, 3, 16, 16)  # only the records with an image, in record order
    assert torch.equal(batch["pixel_values"][1:], items[2]["pixel_values"])
    for row, it in enumerate(items):  # right padding: real tokens first, pads after, never supervised
        n = len(it["input_ids"])
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (T - n)
        assert torch.equal(batch["input_ids"][row, :n], it["input_ids"])
        assert torch.equal(batch["labels"][row, :n], it["labels"])
        assert (batch["input_ids"][row, n:] == tok.pad_id).all() and (batch["labels"][row, n:] == -100).all()
    assert batch["ids"] == ["good", "text", "r"] and batch["num_skipped"] == 0
    assert collate([items[1]])["pixel_values"] is None


def test_json_or_jsonl_is_decided_by_content(tmp_path, tok, folder):
    as_list = dataset(tmp_path, [GOOD, TEXT_ONLY], tok, folder, name="list.jsonl")
    as_lines = dataset(tmp_path, [GOOD, TEXT_ONLY], tok, folder, jsonl=True, name="lines.json")
    assert len(as_list) == len(as_lines) == 2
    assert torch.equal(as_list[1]["input_ids"], as_lines[1]["input_ids"])
    (tmp_path / "bad.jsonl").write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(DataError, match="bad.jsonl, line 2: not JSON"):
        LlavaDataset(tmp_path / "bad.jsonl", tok)


def test_plain_template_for_stage_1(tmp_path, tok, folder):
    item = dataset(tmp_path, [GOOD], tok, folder, template="plain")[0]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    caption = tok.encode("There are 2 circles.\n")
    assert ids == [tok.bos_id] + [tok.vocab_size] * N_IMAGE + caption and labels == [-100] * (1 + N_IMAGE) + caption


def test_num_image_tokens_can_depend_on_the_image(tmp_path, tok, folder):
    """The AnyRes hook: a function of the image gives each record its own count."""
    ds = dataset(tmp_path, [GOOD, with_image("rgba.png")], tok, folder, num_image_tokens=lambda img: img.size[0] // 2)
    assert [(ds[i]["input_ids"] == tok.vocab_size).sum().item() for i in range(2)] == [15, 8]


BAD_RECORDS = [
    ({"id": "e1", "conversations": []}, "record e1: empty conversation"),
    ({"id": "e2", "image": "a.png", "conversations": [{"from": "gpt", "value": "<image>\nhi"},
                                                      {"from": "human", "value": "x"}]},
     "record e2: roles out of order: turn 0 is from 'gpt'"),
    ({"id": "e3", "conversations": GOOD["conversations"]}, "record e3: <image> without image"),
    ({"id": "e4", "image": "a.png", "conversations": TEXT_ONLY["conversations"]},
     "record e4: image without <image>: has image 'a.png'"),
    ({"id": "e5", "image": "a.png", "conversations": GOOD["conversations"][:1]}, "record e5: unanswered turn"),
    ({"id": "e6", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": 7}]},
     "record e6: not text: turn 1 has a int value"),
    ({"id": "e7", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]},
     "record e7: empty reply"),
    ({"id": "e8", "image": ["a.png", "b.png"], "conversations": GOOD["conversations"]}, "record e8: bad image field"),
    ({"id": "e9", "image": "a.png", "conversations": GOOD["conversations"][:1] + [{"from": "gpt", "value": "<image>"}]},
     "record e9: <image> in a reply"),
    ({"id": "e11", "conversations": [{"from": "human", "value": " "}, {"from": "gpt", "value": "hi"}]},
     "record e11: empty question"),  # text only: the official prompt drops an empty turn
    ({"id": "e12", "image": "a.png", "conversations": GOOD["conversations"][:2] + [
        {"from": "human", "value": ""}, {"from": "gpt", "value": "x"}]}, "record e12: empty question"),
    ({"conversations": [{"from": "human", "value": "hi"}]}, "record #1: unanswered turn"),  # no id: the file index
    (["not", "a", "record"], "record #1: not a record: a list"),
    ({"id": "e10", "image": "a.png", "conversations": [{"from": "human", "value": "<image> <image>"},
                                                        {"from": "gpt", "value": "two"}]},
     "record e10: several <image>"),
]


@pytest.mark.parametrize("record,message", BAD_RECORDS)
def test_bad_records_raise_at_load_with_their_id(tmp_path, tok, folder, record, message):
    with pytest.raises(DataError, match=message.replace("(", "\\(")):
        dataset(tmp_path, [GOOD, record], tok, folder)


FOUND_BEFORE = [("missing.png", "missing.png does not exist"),  # a look at the folder and the headers finds these
                ("../outside.png", "'../outside.png' leads outside the image folder"),
                ("link.png", "'link.png' leads outside the image folder"),
                ("broken.png", "broken.png cannot be read"),
                ("text.png", "text.png cannot be read: cannot identify image file"),
                ("huge.png", "huge.png is 400x400 pixels, more than the limit")]
FOUND_WHEN_READ = [("cut.png", "cut.png cannot be read")]  # a good header: only decoding finds it
BAD_IMAGES = FOUND_BEFORE + FOUND_WHEN_READ


@pytest.mark.parametrize("image,message", FOUND_BEFORE)
def test_bad_images_are_found_by_their_header_before_training(tmp_path, tok, folder, image, message):
    with pytest.raises(DataError, match=f"record img1: bad image: .*{message}"):
        dataset(tmp_path, [GOOD, with_image(image, "img1")], tok, folder, max_pixels=100_000)


@pytest.mark.parametrize("image,message", FOUND_WHEN_READ)
def test_unreadable_images_raise_when_read_with_record_id_and_file(tmp_path, tok, folder, image, message):
    ds = dataset(tmp_path, [with_image(image, "img1")], tok, folder, max_pixels=100_000)
    assert len(ds) == 1  # decoding is lazy
    with pytest.raises(DataError, match=f"record img1: bad image: .*{message}"):
        ds[0]


def test_every_bad_record_is_reported_at_once_before_training(tmp_path, tok, folder):
    """Not at its batch, hours in: all of them, the first few named, the rest counted."""
    records = [with_image("a.png", f"g{i}") for i in range(5)] + [
        with_image("gone.png", "late1"), {"id": "late2", "conversations": []}, with_image("a.png", "g5"),
                            with_image("../outside.png", "late3"), with_image("gone2.png", "late4")]
    with pytest.raises(DataError, match=r"data.json: 4 of 10 records cannot be used: record late1: bad image: "
                                        r".*gone.png does not exist; record late2: empty conversation.*; record "
                                        r"late3: bad image: .*leads outside.*; and 1 more \(--on-error skip trains "
                                        r"without them\)$"):
        dataset(tmp_path, records, tok, folder)
    with pytest.raises(InputError, match=r"image folder .*nowhere does not exist$"):  # not "image ... does not exist"
        dataset(tmp_path, [GOOD], tok, tmp_path / "nowhere")
    (tmp_path / "object.json").write_text(json.dumps({"data": [GOOD]}))
    with pytest.raises(DataError, match="object.json: a JSON object, expected a JSON list of records"):
        LlavaDataset(tmp_path / "object.json", tok)


def test_images_of_every_kind_load(tmp_path, tok, folder):
    for name, img in [("p.png", Image.new("P", (9, 7))), ("l.png", Image.new("L", (9, 7))),
                      ("c.jpg", Image.new("CMYK", (9, 7))), ("deep.png", Image.fromarray(np.zeros((7, 9), np.uint16)))]:
        img.save(folder / name)
        assert dataset(tmp_path, [with_image(name)], tok, folder)[0]["pixel_values"].shape == (1, 3, 16, 16)


def test_skip_mode_counts_every_reason_and_drops(tmp_path, tok, folder):
    bad_images = [with_image(image, f"img{i}") for i, (image, _) in enumerate(BAD_IMAGES)]
    records = [GOOD] + [r for r, _ in BAD_RECORDS] + bad_images
    ds = dataset(tmp_path, records, tok, folder, on_error="skip", max_pixels=100_000)
    dropped = len(BAD_RECORDS) + len(FOUND_BEFORE)  # before training
    assert len(ds) == 1 + len(FOUND_WHEN_READ) and sum(ds.skipped.values()) == ds.dropped == dropped
    assert ds.skipped["unanswered turn"] == 2 and ds.skipped["roles out of order"] == 1
    assert len(ds.skip_log) == dropped and ds.skip_log[0].startswith("record e1: empty conversation")
    items = [ds[i] for i in range(len(ds))]
    assert items[0] is not None and items[1:] == [None] * len(FOUND_WHEN_READ)
    assert ds.skipped["bad image"] == len(BAD_IMAGES) and any("record img0: bad image" in m for m in ds.skip_log)
    batch = collate(items)
    assert batch["ids"] == ["good"] and batch["num_skipped"] == len(FOUND_WHEN_READ)
    assert batch["input_ids"].shape[0] == 1
    empty = collate([None, None])
    assert empty["input_ids"].shape == (0, 0) and empty["num_skipped"] == 2 and empty["pixel_values"] is None


def test_a_look_before_training_does_not_count_skips(tmp_path, tok, folder):
    ds = dataset(tmp_path, [GOOD, with_image("cut.png", "img0")], tok, folder, on_error="skip")
    for view in (ds, torch.utils.data.Subset(ds, [1, 0])):
        with uncounted_skips(view):
            assert [view[i] is None for i in range(2)] == ([False, True] if view is ds else [True, False])
        assert ds.skipped == {} and ds.skip_log == []
    assert ds[1] is None and ds.skipped == {"bad image": 1} and len(ds.skip_log) == 1


def test_truncation_keeps_alignment_and_skips_broken_samples(tmp_path, tok, folder):
    full = dataset(tmp_path, [GOOD], tok, folder)[0]
    n = len(full["input_ids"])
    cut = dataset(tmp_path, [GOOD], tok, folder, max_length=n - 2)[0]
    assert torch.equal(cut["input_ids"], full["input_ids"][: n - 2])
    assert torch.equal(cut["labels"], full["labels"][: n - 2])
    first_target = int((full["labels"] != -100).nonzero()[0])
    assert dataset(tmp_path, [GOOD], tok, folder, max_length=first_target + 1)[0] is not None  # one target left
    with pytest.raises(DataError, match="record good: nothing to learn: no supervised token left within max_length"):
        dataset(tmp_path, [GOOD], tok, folder, max_length=first_target)  # found before training, not at its batch
    image_start = int((full["input_ids"] == tok.vocab_size).nonzero()[0])
    with pytest.raises(DataError, match="record good: truncation cuts the image"):
        dataset(tmp_path, [GOOD], tok, folder, max_length=image_start + 2)
    skipping = dataset(tmp_path, [GOOD], tok, folder, max_length=image_start, on_error="skip")
    assert len(skipping) == 0 and skipping.dropped == 1 and skipping.skipped == {"truncation cuts the image": 1}


def test_real_tokenizer_record(tmp_path, llama_tokenizer_path, folder):
    """The LLaVA-1.5 setting: Vicuna's tokenizer, 576 image tokens, the official -200 placeholder, pad mode."""
    tok = Tokenizer(llama_tokenizer_path)
    ds = dataset(tmp_path, [GOOD, TEXT_ONLY], tok, folder, num_image_tokens=576, image_token_id=-200,
                 image_size=336, image_aspect="pad")
    item = ds[0]
    assert (item["input_ids"] == -200).sum() == 576 and item["pixel_values"].shape == (1, 3, 336, 336)
    replies = item["labels"][item["labels"] != -100].tolist()
    assert replies[-1] == tok.eos_id and tok.decode(replies) == "There are 2 circles."


def test_bad_arguments(tmp_path, tok, folder):
    for kw, message in [({"on_error": "ignore"}, "on_error must be 'raise' or 'skip'"),
                        ({"template": "v2"}, "unknown template 'v2'"),
                        ({"image_aspect": "stretch"}, "image_aspect must be 'crop' or 'pad'")]:
        with pytest.raises(ValueError, match=message):
            dataset(tmp_path, [GOOD], tok, folder, **kw)


def test_duplicate_ids_are_bad_records_named_by_their_id(tmp_path, tok, folder):
    records = [with_image("a.png", "same"), with_image("a.png", "other"), with_image("a.png", "same")]
    with pytest.raises(DataError, match=r"record same: duplicate id: 'same' is also the id of record #0"):
        dataset(tmp_path, records, tok, folder)
    ds = dataset(tmp_path, records, tok, folder, on_error="skip")  # the first keeps the id
    assert [rid for rid, _ in ds.records] == ["same", "other"] and ds.skipped == {"duplicate id": 1}
