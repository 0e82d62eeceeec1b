"""A checkpoint (or LoRA adapter) replaces the one in its directory whole or not at all: the process killed at
any file operation of the save leaves, once the next run has looked at the directory, the old complete
checkpoint or the new complete one, each with its own training log, and the directory's other files (a user's
notes) kept. Saved files get the usual mode (umask), not the private one of a temporary file."""
import os
import pathlib
import shutil
import tempfile

import pytest
import torch

import llava_min
import llava_min.checkpoint.weights
from llava_min.model.low_rank import LoRAConfig, add_lora
from llava_min.checkpoint.save import finished_checkpoint, save_adapter, save_llava

OPERATIONS = [(os, "replace"), (os, "rename"), (os, "link"), (os, "chmod"), (os, "unlink"), (os, "mkdir"),
              (os, "rmdir"), (shutil, "rmtree"), (shutil, "copyfile"), (shutil, "copy2"), (tempfile, "mkdtemp"),
              (pathlib.Path, "write_text"), (pathlib.Path, "write_bytes"), (llava_min.checkpoint.weights, "save_file")]


class Killed(BaseException):
    """The process dies here: nothing after it runs, no clean-up either."""


def killed_at(monkeypatch, k: int, operations=OPERATIONS) -> list:
    """From the k-th file operation on, every one raises Killed. Returns the call counter."""
    calls = [0]

    def wrap(fn):
        def operation(*args, **kwargs):
            calls[0] += 1
            if calls[0] >= k:
                raise Killed
            return fn(*args, **kwargs)
        return operation
    for owner, name in operations:
        monkeypatch.setattr(owner, name, wrap(getattr(owner, name)))
    return calls


def contents(directory) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(pathlib.Path(directory).rglob("*"))
            if p.is_file()}


def perturbed(model, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("kind", ["model", "adapter"])
def test_a_kill_at_any_file_operation_leaves_the_old_or_the_new_checkpoint(hf_llava_dir, tmp_path, monkeypatch, kind):
    model = llava_min.load(hf_llava_dir)
    if kind == "adapter":
        add_lora(model.language_model, LoRAConfig(r=2, alpha=4.0, dropout=0.0))
    save = (lambda out: save_llava(model, out)) if kind == "model" else (lambda out: save_adapter(model, out))
    out, old, new = tmp_path / "runs" / "out", tmp_path / "old", tmp_path / "new"
    save(out)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "notes.txt").write_text("mine")
    shutil.copytree(out, old)
    perturbed(model, 0)
    save(new)
    expected = {"old": contents(old), "new": {**contents(new), "notes.txt": b"mine"}}  # (the log: the old model's)
    assert expected["old"] != expected["new"]
    k, completed = 0, False
    while not completed:
        k += 1
        shutil.rmtree(out)
        shutil.copytree(old, out)
        with monkeypatch.context() as patch:
            calls = killed_at(patch, k)
            try:
                save(out)
                completed = calls[0] < k
            except Killed:
                pass
        assert finished_checkpoint(out) is not None, f"killed at file operation {k}"  # (the next run's look)
        assert contents(out) in expected.values(), f"killed at file operation {k}: neither the old nor the new"
        assert sorted(p.name for p in out.parent.iterdir()) == ["out"], f"killed at file operation {k}: leftovers"
    assert k > 10 and contents(out) == expected["new"]
    weights = out / ("model.safetensors" if kind == "model" else "adapter_model.safetensors")
    umask = os.umask(0o22)
    os.umask(umask)
    assert weights.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_save_into_a_file_is_refused_and_the_file_kept(hf_llava_dir, tmp_path):
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(ValueError, match="out is a file, not a directory"):
        save_llava(llava_min.load(hf_llava_dir), tmp_path / "out")
    assert (tmp_path / "out").read_text() == "not a directory"
