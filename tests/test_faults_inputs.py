"""Faults a new user meets in their inputs: every bad record found before step 1, a device that is not there,
a learning rate that diverges, a resumed run that starts from another model; each one line, or trained around."""
import argparse
import json
import re
import shutil
import struct
import zlib

import pytest
from PIL import Image

import train
from llava_min import cli
from llava_min.files import InputError
from test_cli_errors import run_catalogue


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds no pixels: enough for a header check, and cheap to make."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def good_records(parts, images, n: int) -> list:
    """The first n image records of the toy world's instruct.json, their images copied into `images`."""
    records = [r for r in json.loads((parts / "data" / "instruct.json").read_text()) if r.get("image")][:n]
    for r in records:
        (images / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(parts / "data" / "images" / r["image"], images / r["image"])
    return records


@pytest.fixture
def mixed_data(parts, tmp_path):
    """Eight good records and four bad ones of different kinds, each found only by a look at the file."""
    images = tmp_path / "images"
    records = good_records(parts, images, 8)
    (images / "text.png").write_text("a text file named like an image")
    (images / "huge.png").write_bytes(png_header(9000, 9000))  # 81 megapixels, over MAX_PIXELS
    turns = records[0]["conversations"]
    long = [{"from": "human", "value": "<image>\n" + "How many circles are there? " * 200}, turns[1]]
    records += [{**records[1], "id": "text", "image": "text.png"}, {**records[1], "id": "huge", "image": "huge.png"},
                {**records[1], "id": "long", "conversations": long}, dict(records[2])]
    (tmp_path / "mixed.json").write_text(json.dumps(records))
    return tmp_path / "mixed.json", images, records[2]["id"]


def stage2(parts, data, images, out) -> list:
    return ["--stage", "2", "--preset", "smoke", "--vision", parts / "clip", "--llm", parts / "lm", "--tokenizer",
            parts / "tokenizer.model", "--data", data, "--image-folder", images, "--max-steps", "2", "--batch-size",
            "4", "--no-progress", "--no-whiten-features", "--out", out]


def test_every_kind_of_bad_record_is_listed_before_step_1_and_skip_trains_on_the_rest(parts, tmp_path, capsys,
                                                                                        mixed_data):
    data, images, duplicate = mixed_data
    [result] = run_catalogue("train.py", [(stage2(parts, data, images, tmp_path / "raised"),
                                           "mixed.json: 4 of 12 records cannot be used: ")])
    line = result["stderr"].strip().splitlines()[-1]
    assert "record text: bad image: " in line and "text.png cannot be read: cannot identify image file" in line
    assert "record huge: bad image: " in line and "is 9000x9000 pixels, more than the limit" in line
    assert "record long: nothing to learn: no supervised token left within max_length 512" in line
    assert line.endswith("; and 1 more (--on-error skip trains without them)")
    assert not (tmp_path / "raised" / "metrics.jsonl").exists()  # no step was run
    train.main([str(a) for a in stage2(parts, data, images, tmp_path / "skipped")] + ["--on-error", "skip"])
    out = capsys.readouterr().out
    assert "--on-error skip: 4 of 12 records in " in out and "dropped before training" in out
    assert f"record {duplicate}: duplicate id: {duplicate!r} is also the id of record #2" in out
    assert (tmp_path / "skipped" / "config.json").is_file()
    steps = [json.loads(l) for l in (tmp_path / "skipped" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(s.get("loss") is not None for s in steps)


def test_a_bad_record_found_in_a_loader_worker_is_one_line(parts, tmp_path):
    """Behind a good header the pixels are cut short: found in a DataLoader worker, reported as the record."""
    images = tmp_path / "images"
    records = good_records(parts, images, 8)
    Image.effect_noise((64, 64), 64).save(images / "cut.png")
    (images / "cut.png").write_bytes((images / "cut.png").read_bytes()[:300])
    records[5] = {**records[5], "id": "cut", "image": "cut.png"}
    (tmp_path / "data.json").write_text(json.dumps(records))
    [result] = run_catalogue("train.py", [(stage2(parts, tmp_path / "data.json", images, tmp_path / "o")
                                           + ["--num-workers", "2"], "train.py: error: record cut: bad image: ")])
    line = result["stderr"].strip().splitlines()[-1]
    assert "cut.png cannot be read" in line and "DataLoader worker" not in line and len(line) < 400


def test_a_learning_rate_that_diverges_ends_in_one_line_naming_the_step(parts, tmp_path):
    data = parts / "data" / "instruct.json"
    run_catalogue("train.py", [(stage2(parts, data, parts / "data" / "images", tmp_path / "o") + ["--lr", "1e9"],
                                "Lower --lr")])


def test_a_resumed_run_must_start_from_the_same_init(parts, tmp_path):
    common = ["--preset", "smoke", "--tokenizer", str(parts / "tokenizer.model"), "--image-folder",
              str(parts / "data" / "images"), "--no-progress", "--no-whiten-features", "--batch-size", "4"]
    train.main(["--stage", "1", "--vision", str(parts / "clip"), "--llm", str(parts / "lm"), "--data",
                str(parts / "data" / "pretrain.json"), "--max-steps", "1", "--out", str(tmp_path / "s1")] + common)
    shutil.copytree(tmp_path / "s1", tmp_path / "other")
    stage2 = ["--stage", "2", "--data", str(parts / "data" / "instruct.json"), "--max-steps", "3", "--out",
              str(tmp_path / "s2")] + common
    train.main(stage2 + ["--init", str(tmp_path / "s1"), "--stop-after", "1"])
    with pytest.raises(InputError, match=f"init '{tmp_path / 's1'}' there, '{tmp_path / 'other'}' here"):
        train.main(stage2 + ["--init", str(tmp_path / "other"), "--resume"])


@pytest.mark.parametrize("text,message", [("gpu0", "'gpu0' is not a device name (this machine has: cpu, cuda"),
                                          ("meta", "meta: not a device llava-min can run on here"),
                                          ("cuda:2", "cuda:2: this machine has 2 CUDA device(s)")])
def test_a_device_this_machine_lacks_is_an_argparse_error_naming_what_it_has(monkeypatch, text, message):
    monkeypatch.setattr(cli, "cuda_count", lambda: 2)
    assert cli.device("cuda:1") == "cuda:1" and cli.device("cpu") == "cpu" and cli.default_device() == "cuda"
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        cli.device(text)
    monkeypatch.setattr(cli, "cuda_count", lambda: 0)
    with pytest.raises(argparse.ArgumentTypeError, match="cuda: CUDA is not available on this machine"):
        cli.device("cuda")
    assert cli.default_device() == "cpu"
