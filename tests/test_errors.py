"""One error channel: a user's mistake is one of the project's errors (llava_min/errors.py), raised where the
fault is found and shown by the command line as one line; a bug keeps its type and its traceback, in training
with or without --on-error skip and in DataLoader workers too, and no model is saved."""
import ast
import json
import shutil
import sys
import traceback
from pathlib import Path

import pytest
from PIL import Image

import train
from llava_min.cli import run
from llava_min.data import image as image_module
from llava_min.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent


def stage2(parts, out, *extra, data=None, images=None):
    train.main(["--stage", "2", "--preset", "smoke", "--vision", str(parts / "clip"), "--llm", str(parts / "lm"),
                "--tokenizer", str(parts / "tokenizer.model"), "--data", str(data or parts / "data" / "instruct.json"),
                "--image-folder", str(images or parts / "data" / "images"), "--max-steps", "2", "--batch-size", "4",
                "--no-progress", "--no-whiten-features", "--out", str(out), *extra])


def saved_model(out: Path) -> list:
    return [p.name for p in out.glob("*") if p.name == "config.json" or p.suffix in (".safetensors", ".bin")]


PLANTED = {"tokenizing": (Tokenizer, "encode"), "preprocessing": (Image.Image, "resize")}


@pytest.mark.parametrize("workers", ["0", "2"])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("bug,site", [(TypeError, "tokenizing"), (ValueError, "preprocessing")])
def test_a_bug_while_reading_records_is_a_traceback_not_a_bad_record(parts, tmp_path, monkeypatch, bug, site,
                                                                     on_error, workers):
    """Not a skipped record, whatever --on-error says: a run of skipped records would save an untrained model."""
    def planted(*args, **kwargs):
        raise bug(f"planted bug in {site}")
    monkeypatch.setattr(*PLANTED[site], planted)  # (DataLoader workers are forked: they have it too)
    with pytest.raises(bug, match=f"planted bug in {site}") as caught:
        stage2(parts, tmp_path / "out", "--on-error", on_error, "--num-workers", workers)
    assert type(caught.value) is bug  # itself, not a DataError (a ValueError too) that names a record
    where = str(caught.value) + "".join(traceback.format_tb(caught.tb))
    assert ("in check" if site == "tokenizing" else "__getitem__") in where  # as planted: checked, or read
    assert saved_model(tmp_path / "out") == []


@pytest.fixture
def broken_data(parts, tmp_path):
    """Seven good records and one whose image file does not decode (found only when it is read)."""
    records = [r for r in json.loads((parts / "data" / "instruct.json").read_text()) if r.get("image")][:8]
    images = tmp_path / "images"
    for r in records[:7]:
        (images / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(parts / "data" / "images" / r["image"], images / r["image"])
    Image.effect_noise((64, 64), 64).save(images / "broken.png")  # a good header, its pixels cut short
    (images / "broken.png").write_bytes((images / "broken.png").read_bytes()[:300])
    records[7] = {**records[7], "id": "cut-short", "image": "broken.png"}
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path / "data.json", images


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_bad_record_found_when_read_is_one_line_or_skipped(parts, tmp_path, monkeypatch, capsys, broken_data,
                                                             workers):
    data, images = broken_data
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit) as stop:  # (from a worker it comes back with the worker's traceback as text)
        run(lambda: stage2(parts, tmp_path / "raised", "--num-workers", workers, data=data, images=images))
    assert stop.value.code.startswith("train.py: error: record cut-short: bad image: image ")
    assert "broken.png cannot be read" in stop.value.code
    assert "Traceback" not in stop.value.code and "\n" not in stop.value.code
    assert saved_model(tmp_path / "raised") == []
    capsys.readouterr()
    stage2(parts, tmp_path / "skipped", "--on-error", "skip", "--num-workers", workers, data=data, images=images)
    assert "config.json" in saved_model(tmp_path / "skipped")
    assert "skipped bad records (--on-error skip): 0 when the data was read in, 1 as the batches came" in \
        capsys.readouterr().out


def test_a_bug_after_decoding_is_no_unreadable_image(tmp_path, monkeypatch):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    assert image_module.load_image(tmp_path / "a.png").size == (8, 8)

    def planted(img):
        raise ValueError("planted bug in to_rgb")
    monkeypatch.setattr(image_module, "to_rgb", planted)
    with pytest.raises(ValueError, match="planted bug in to_rgb") as caught:
        image_module.load_image(tmp_path / "a.png")
    assert type(caught.value) is ValueError  # not an ImageError saying the file "cannot be read"


def broad_handlers(path: Path):
    """Handlers that catch ValueError, Exception, BaseException or everything, with their line."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ExceptHandler):
            types = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            names = {t.id for t in types if isinstance(t, ast.Name)}
            if node.type is None or names & {"Exception", "BaseException"} or names == {"ValueError"}:
                yield node  # (a tuple naming ValueError beside others guards one parse: float(), json.loads)


def keeps_the_error(handler: ast.ExceptHandler) -> bool:
    """The handler re-raises the very error (`raise`) or prints its traceback: a bug still shows as one."""
    for node in ast.walk(handler):
        if isinstance(node, ast.Raise) and node.exc is None:
            return True
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "print_exc":
            return True
    return False


def test_no_code_sorts_input_from_bugs_by_catching_a_broad_error():
    files = list((ROOT / "llava_min").rglob("*.py")) + list(ROOT.glob("*.py"))
    for path in files:
        lines = path.read_text().splitlines()
        for handler in broad_handlers(path):
            where = f"{path.relative_to(ROOT)}:{handler.lineno}"
            assert keeps_the_error(handler), f"{where} turns an unexpected error into something else"
            assert "#" in lines[handler.lineno - 1], f"{where}: say why in one line"
