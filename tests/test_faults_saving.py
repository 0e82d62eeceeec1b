"""Faults that would lose work: a second run into the same output (a lock naming the first run's pid), a full
disk (one line naming the file, the space it needs and the space free; the last snapshot kept), and a crash
at each step of the swap that puts a new model in place (one complete model with its own log, the new one
whenever it was complete)."""
import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import SafetensorError

import llava_min.checkpoint.weights
import llava_min.files
from llava_min.checkpoint.save import checkpoint_dir, finished_checkpoint, save_pretrained
from llava_min.checkpoint.weights import load_safetensors
from llava_min.files import DiskFullError, InputError, aside, only_run, write_json
from llava_min.train.trainer import TrainConfig, Trainer
from test_saving import Killed, killed_at


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KB file system (a tmpfs, where this test may mount one)."""
    with mounted(tmp_path / "disk", 256 * 1024) as where:
        yield where


@contextlib.contextmanager
def mounted(where, size: int):
    where.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                                        str(where)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


# ---------------------------------------------------------------- one run per output


def test_a_lock_held_by_a_live_process_is_refused_naming_its_pid_and_a_dead_ones_is_taken_over(tmp_path, running):
    out = tmp_path / "out"
    lock = tmp_path / ".out.lock"
    lock.write_text(str(running))
    with pytest.raises(InputError, match=f"another run \\(pid {running}\\) is writing {out}"):
        with only_run(out):
            pass
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(dead.stdout.strip())  # a killed run's
    with only_run(out):
        assert lock.read_text() == str(os.getpid())
    assert not lock.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_under_torchrun_only_rank_0_takes_the_lock(tmp_path, monkeypatch, running):
    (tmp_path / ".out.lock").write_text(str(running))
    monkeypatch.setenv("RANK", "1")
    with only_run(tmp_path / "out"):
        pass
    assert (tmp_path / ".out.lock").read_text() == str(running) and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the swap's crash points


def write_model(tmp, name: str) -> None:
    (tmp / "config.json").write_text(name)
    (tmp / "model.safetensors").write_text(name * 100)


def model_and_log(out) -> tuple:
    return tuple((out / name).read_text() for name in ("config.json", "model.safetensors", "metrics.jsonl"))


@pytest.mark.parametrize("k", range(1, 8))
def test_a_crash_at_each_rename_or_removal_of_the_swap_leaves_one_model_with_its_log(tmp_path, monkeypatch, k):
    out = tmp_path / "out"
    with checkpoint_dir(out) as tmp:
        write_model(tmp, "old")
        (tmp / "metrics.jsonl").write_text("old log\n")
    (out / "resume").mkdir()
    (out / "resume" / "metrics.jsonl").write_text("new log\n")  # the run in progress logs beside its snapshot
    with monkeypatch.context() as patch:
        killed_at(patch, k, [(os, "replace"), (shutil, "rmtree")])
        try:
            with checkpoint_dir(out) as tmp:
                write_model(tmp, "new")
            completed = True
        except Killed:
            completed = False
    new_was_complete = aside(out, "new").is_dir() or (out / "config.json").read_text() == "new"
    assert finished_checkpoint(out) is not None  # (the next run's look: recovery)
    expected = ("new", "new" * 100, "new log\n") if new_was_complete else ("old", "old" * 100, "old log\n")
    assert model_and_log(out) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert new_was_complete or not completed
    assert k < 7 or completed  # (each rename and removal of the swap, then none)


def test_a_crash_between_the_two_renames_is_finished_forward(tmp_path):
    out = tmp_path / "out"
    with checkpoint_dir(out) as tmp:
        write_model(tmp, "old")
    new = aside(out, "new")
    new.mkdir()
    write_model(new, "new")
    os.replace(out, aside(out, "old"))  # the first rename done, the second not
    assert finished_checkpoint(out, recover=False) is not None  # seen as finished before it is put back
    assert finished_checkpoint(out) is not None and (out / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------- the training log and a full disk in a run


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(4, 1)


def fit(out, monkeypatch=None, **overrides):
    torch.manual_seed(0)
    model = Tiny()
    data = [torch.randn(4) for _ in range(8)]
    cfg = TrainConfig(out_dir=str(out), lr=0.1, max_steps=4, batch_size=2, progress=False, **overrides)
    trainer = Trainer(model, [{"params": list(model.parameters())}], data, lambda xs: {"x": torch.stack(xs)},
                      lambda m, b: m.w(b["x"]).pow(2).sum(), lambda b: len(b["x"]), cfg)
    return trainer.fit(lambda where: save_pretrained(dict(model.state_dict()), {"step": trainer.step}, where))


def logged_steps(file) -> list:
    return [json.loads(line)["step"] for line in file.read_text().splitlines()]


def test_an_interrupted_overwrite_keeps_the_old_models_log_and_the_finished_run_brings_its_own(tmp_path):
    out = tmp_path / "out"
    save_pretrained({"w": torch.zeros(1)}, {"old": True}, out)
    (out / "metrics.jsonl").write_text('{"step": 99}\n')
    fit(out, stop_after=2)
    assert (out / "metrics.jsonl").read_text() == '{"step": 99}\n' and json.loads((out / "config.json").read_text())
    assert logged_steps(out / "resume" / "metrics.jsonl") == [1, 2]
    fit(out, resume=True)
    assert logged_steps(out / "metrics.jsonl") == [1, 2, 3, 4] and not (out / "resume").exists()
    assert json.loads((out / "config.json").read_text()) == {"step": 4}


def test_a_full_disk_at_the_final_save_keeps_the_last_snapshot_and_says_so(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = llava_min.files.free_space
    with monkeypatch.context() as patch:
        patch.setattr(llava_min.files, "free_space", lambda f: 10 if str(f).endswith("model.safetensors") else real(f))
        with pytest.raises(DiskFullError) as e:
            fit(out, save_every=2)
    said = str(e.value)
    assert said.startswith(f"cannot write {out / 'model.safetensors'}: no space left on its disk (20 bytes needed, "
                           "10 bytes free)"), said
    assert said.endswith(f"the snapshot of step 2 in {out / 'resume'} is kept: free space and rerun with --resume")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and finished_checkpoint(out) is None
    fit(out, save_every=2, resume=True)
    assert finished_checkpoint(out) is not None and logged_steps(out / "metrics.jsonl") == [1, 2, 3, 4]


def test_a_full_disk_at_the_final_save_writes_the_trained_model_to_the_fallback_directory(tmp_path, monkeypatch):
    out, spare = tmp_path / "out", tmp_path / "spare"
    real = llava_min.files.free_space
    monkeypatch.setattr(llava_min.files, "free_space",  # full only where --out is written (its temporary copy)
                        lambda f: 10 if f.parent.name.startswith(".out.") else real(f))
    with pytest.raises(DiskFullError) as e:
        fit(out, fallback_out=str(spare))
    said = str(e.value)
    assert said.startswith(f"cannot write {out / 'model.safetensors'}: no space left on its disk"), said
    assert said.endswith(f"no snapshot was kept (--save-every N makes them); the trained model was written to "
                         f"--fallback-out {spare}"), said
    assert finished_checkpoint(out) is None and json.loads((spare / "config.json").read_text()) == {"step": 4}
    torch.manual_seed(0)  # fit's initial weights: the fallback holds the trained ones
    assert not torch.equal(load_safetensors(spare / "model.safetensors")["w.weight"], Tiny().w.weight.detach())


def test_a_fallback_directory_that_is_full_too_is_named_beside_the_first(tmp_path, monkeypatch):
    out, spare = tmp_path / "out", tmp_path / "spare"
    real = llava_min.files.free_space
    monkeypatch.setattr(llava_min.files, "free_space",
                        lambda f: 10 if str(f).endswith("model.safetensors") else real(f))
    with pytest.raises(DiskFullError) as e:
        fit(out, fallback_out=str(spare))
    said = str(e.value)
    assert f"cannot write {out / 'model.safetensors'}: no space" in said
    assert f"cannot write {spare / 'model.safetensors'}: no space" in said, said
    assert finished_checkpoint(out) is None and finished_checkpoint(spare) is None


def test_fallback_out_is_checked_with_the_options(tmp_path, capsys):
    import train
    save_pretrained({"w": torch.zeros(1)}, {}, tmp_path / "done")
    base = ["--stage", "lm", "--preset", "smoke", "--data", str(tmp_path / "c.txt"), "--tokenizer",
            str(tmp_path / "t.model"), "--out", str(tmp_path / "out")]
    (tmp_path / "c.txt").write_text("a\n")
    (tmp_path / "t.model").write_text("")
    for extra, said in [(["--fallback-out", str(tmp_path / "out")], "is --out: give a directory on another disk"),
                        (["--fallback-out", str(tmp_path / "done")], "holds a finished model (config.json)")]:
        with pytest.raises(SystemExit) as e:
            train.parse_args(base + extra)
        assert e.value.code == 2 and said in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--fallback-out", str(tmp_path / "x")])  # the toy pipeline: no second place
    assert "--fallback-out is for one stage" in capsys.readouterr().err


def test_a_model_another_run_finished_after_the_options_were_read_is_not_replaced(tmp_path, monkeypatch):
    import train
    from llava_min.errors import OptionError
    (tmp_path / "c.txt").write_text("a\n")
    (tmp_path / "t.model").write_text("")
    args = train.parse_args(["--stage", "lm", "--preset", "smoke", "--data", str(tmp_path / "c.txt"), "--tokenizer",
                             str(tmp_path / "t.model"), "--out", str(tmp_path / "out")])
    save_pretrained({"w": torch.zeros(1)}, {"theirs": True}, tmp_path / "out")  # the other run ends and unlocks
    monkeypatch.setattr(train, "parse_args", lambda argv=None: args)
    with pytest.raises(OptionError, match="holds a finished model, from a run that ended after this one started"):
        train.main([])
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"theirs": True}


# ---------------------------------------------------------------- a full disk at each kind of write


def test_safetensors_and_torch_report_a_full_disk_as_the_file_that_did_not_fit(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(llava_min.checkpoint.weights, "save_file", full)
    with pytest.raises(DiskFullError, match=f"cannot write {tmp_path / 'm' / 'model.safetensors'}: no space left"):
        save_pretrained({"w": torch.zeros(8)}, {}, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(DiskFullError, match=f"cannot write {tmp_path / 'o' / 'resume' / 'state.pt'}: no space"):
        fit(tmp_path / "o", stop_after=1)


@pytest.mark.parametrize("where", ["the probe", "the write"])
def test_a_real_small_disk(small_disk, monkeypatch, where):
    if where == "the write":  # the probe said there was room: the write itself meets the full disk
        monkeypatch.setattr(llava_min.files, "free_space", lambda f: 1 << 40)
    with pytest.raises(DiskFullError, match=f"cannot write {small_disk / 'big.json'}: no space left on its disk"):
        write_json(small_disk / "big.json", ["x" * 1000] * 1000)
    with pytest.raises(DiskFullError, match=f"cannot write {small_disk / 'model' / 'model.safetensors'}: no space"):
        save_pretrained({"w": torch.zeros(1 << 17)}, {}, small_disk / "model")
    with pytest.raises(DiskFullError, match=f"cannot write {small_disk / 'run' / 'resume' / 'state.pt'}: no space"):
        big = Tiny()
        big.w = torch.nn.Linear(4, 10_000, bias=False)  # (its optimizer state does not fit)
        cfg = TrainConfig(out_dir=str(small_disk / "run"), lr=0.1, max_steps=4, batch_size=2, progress=False,
                          stop_after=1)
        Trainer(big, [{"params": list(big.parameters())}], [torch.randn(4) for _ in range(8)],
                lambda xs: {"x": torch.stack(xs)}, lambda m, b: m.w(b["x"]).pow(2).sum(), lambda b: len(b["x"]),
                cfg).fit(lambda out: None)
    assert sorted(p.name for p in small_disk.iterdir() if not p.name.startswith("run")) == []


def test_gen_data_on_a_small_disk_names_what_did_not_fit(small_disk):
    import gen_data
    with pytest.raises(DiskFullError, match=f"cannot write {small_disk / 'world'}/.*: no space left on its disk"):
        gen_data.main(["--out", str(small_disk / "world"), "--num-images", "200", "--num-eval", "20",
                       "--image-size", "32", "--workers", "1"])
    assert not (small_disk / "world" / "eval.json").exists()  # (the file whose presence means "done")


@pytest.mark.parametrize("where", ["the probe", "the write"])
def test_teacher_answers_that_fill_the_disk_end_in_one_error_naming_the_file_and_a_rerun_goes_on(small_disk,
                                                                                                  monkeypatch, where):
    from llava_min.data.teacher import run_requests
    if where == "the write":  # the probe said there was room: the append itself meets the full disk
        monkeypatch.setattr(llava_min.files, "free_space", lambda f: 1 << 40)
    out, filler = small_disk / "responses.jsonl", small_disk / "filler"
    filler.write_bytes(b"x" * 150_000)
    requests = [(f"k{i}", [{"role": "user", "content": str(i)}], None) for i in range(40)]
    with pytest.raises(DiskFullError, match=f"cannot write {out}: no space left on its disk"):
        run_requests(requests, lambda messages, meta: "y" * 4000, out, workers=2)
    assert 0 < len(out.read_bytes()) < 40 * 4000
    filler.unlink()  # the user frees space and reruns: the answers on disk are kept, the rest asked
    counts = run_requests(requests, lambda messages, meta: "y" * 4000, out, workers=2)
    keys = [json.loads(line)["key"] for line in out.read_text().splitlines()]
    assert sorted(keys) == sorted(k for k, _, _ in requests) and counts["skipped"] + counts["answered"] == 40


def test_lora_merge_overwrite_on_a_full_disk_says_so_in_one_line_and_keeps_the_old_model(chat_model, tmp_path):
    import llava_min
    from llava_min.checkpoint.save import save_adapter
    from llava_min.model.low_rank import LoRAConfig, add_lora
    model = llava_min.load(chat_model)
    add_lora(model.language_model, LoRAConfig(r=2, alpha=4.0, dropout=0.0))
    save_adapter(model, tmp_path / "adapter", base=chat_model)
    size = sum(p.stat().st_size for p in chat_model.iterdir())
    with mounted(tmp_path / "disk", size * 3 // 2) as disk:
        shutil.copytree(chat_model, disk / "merged")
        before = {p.name: p.read_bytes() for p in (disk / "merged").iterdir()}
        done = subprocess.run([sys.executable, "-m", "llava_min.lora", "merge", "--base", str(chat_model), "--adapter",
                               str(tmp_path / "adapter"), "--out", str(disk / "merged"), "--overwrite"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith(
            f"lora.py: error: cannot write {disk / 'merged' / 'model.safetensors'}: no space left on its disk ("), \
            done.stderr
        assert {p.name: p.read_bytes() for p in (disk / "merged").iterdir()} == before
        assert sorted(p.name for p in disk.iterdir()) == ["merged"]
