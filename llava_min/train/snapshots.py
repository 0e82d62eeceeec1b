"""Resumable snapshots of a training run: the trained weights, the optimizer, the step and every process's
random generators, written atomically; a resumed run must share the interrupted run's settings (its
`resume_signature`)."""
import contextlib
import errno
import hashlib
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from ..checkpoint.save import finished_checkpoint
from ..files import LOG, DiskFullError, InputError, atomic_dir, recover_dir, room_for
from ..checkpoint.weights import load_safetensors, save_safetensors

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors on CPU, whatever the sharding


class SnapshotError(InputError):
    """A snapshot that does not fit this run: none to resume, an unfinished one a fresh start would drop,
    or one of a run with other settings; the message names the directory."""


def resume_signature(cfg, total_steps: int, samples: int, lrs: list, settings: dict) -> dict:
    """What a resumed run must share with its snapshot to go on as the interrupted run would have: the stage,
    its data and their order (the file's digest, samples, batch sizes, seed, grouping), the schedule (steps,
    peak learning rates per parameter group, warmup, decay, clipping), and the stage's own `settings` (what
    trains and how: LoRA, AnyRes, the template, ...). `cfg`: the run's TrainConfig."""
    return {"stage": cfg.name, "data_sha256": digest(cfg.data_file) if cfg.data_file else None,
            "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "seed": cfg.seed,
            "group_by_length": cfg.group_by_length, "total_steps": total_steps, "samples": samples, "lr": lrs,
            "weight_decay": cfg.weight_decay, "warmup_ratio": cfg.warmup_ratio, "clip_grad": cfg.clip_grad, **settings}


def digest(path) -> str:
    """The training file's SHA-256 (its first 16 hex digits): a resumed run must read the snapshot's data."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def save_state(state: dict, file: Path) -> None:
    """torch.save through a Python file, whose full disk is an OSError (torch's own writer reports it as an
    "enforce fail", raised while closing the zip: the OSError is its context); refused before writing where
    the disk has no room for its tensors."""
    with room_for(file, tensor_bytes(state)), open(file, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as e:
            if not (isinstance(e.__context__, OSError) and e.__context__.errno == errno.ENOSPC):
                raise
            raise e.__context__ from e


def tensor_bytes(obj) -> int:
    """The bytes of the tensors in a nest of dicts, lists and tuples (what a saved file mostly is)."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    return sum(tensor_bytes(v) for v in obj) if isinstance(obj, (list, tuple)) else 0


class Snapshots:
    """The snapshot of one run in `directory` (OUT/resume). `signature`: the run's `resume_signature`;
    `trainable`: the names of the parameters it trains (all a snapshot keeps of the model). Under torchrun
    every process takes part in `save` and `load`; rank 0 alone writes."""

    def __init__(self, directory, signature: dict, trainable: list, rank: int = 0, world_size: int = 1,
                 device=torch.device("cpu")):
        self.directory, self.signature, self.trainable = Path(directory), signature, trainable
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)

    def exists(self) -> bool:
        return (self.directory / "state.pt").is_file()

    def check_start(self, resume: bool) -> None:
        """--resume needs a snapshot; a fresh start must not silently drop an interrupted run's."""
        if self.rank == 0:
            recover_dir(self.directory)
        if self.world_size > 1:
            dist.barrier()
        if resume and not self.exists():
            raise SnapshotError(f"--resume: no snapshot in {self.directory} (one is written every --save-every "
                                "steps and when --stop-after ends a run; a finished run removes it)")
        if not resume and self.exists():
            raise SnapshotError(f"{self.directory} holds the snapshot of an unfinished run (step {self.step()}): pass "
                                "--resume to continue it, or remove it to start over")

    def save(self, model, optimizer, step: int, skipped: int) -> None:
        """Trained weights, optimizer, schedule position, RNG: everything a resumed run needs. `skipped`:
        the records this process has skipped so far."""
        model_state = get_model_state_dict(model, options=FULL)  # collective under FSDP
        optim_state = None  # before the first update there is none, and asking for it would make some (a step of 1)
        if optimizer.state:
            optim_state = get_optimizer_state_dict(model, optimizer, options=FULL)
        mine = {"rng": self.rng_state(), "skipped": skipped}
        each = [mine]
        if self.world_size > 1:  # every process draws its own dropout masks and skips its own records
            each = [None] * self.world_size
            dist.all_gather_object(each, mine)
        if self.rank == 0:
            with atomic_dir(self.directory, carry=lambda name: name == LOG) as tmp:  # (the log goes on)
                save_safetensors({n: model_state[n] for n in self.trainable}, tmp / "trainable.safetensors")
                save_state({"step": step, "optimizer": optim_state, "skipped": [e["skipped"] for e in each],
                            "rng": [e["rng"] for e in each], "settings": self.signature}, tmp / "state.pt")
        if self.world_size > 1:
            dist.barrier()

    def load(self, model, optimizer) -> tuple:
        """Restores the trained weights, the optimizer and this process's generators; (step, skipped)."""
        state = torch.load(self.directory / "state.pt", weights_only=True)
        self.check_signature(state["settings"])
        saved = load_safetensors(self.directory / "trainable.safetensors")
        if set(saved) != set(self.trainable):
            raise SnapshotError(f"{self.directory}: snapshot holds {sorted(set(saved) ^ set(self.trainable))[:4]}"
                                "... which this run does not train (different stage or flags?)")
        set_model_state_dict(model, saved, options=StateDictOptions(full_state_dict=True, strict=False))
        if state["optimizer"] is not None:
            set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        if len(state["rng"]) != self.world_size:
            raise SnapshotError(f"{self.directory}: snapshot of {len(state['rng'])} processes, this run has "
                                f"{self.world_size}")
        rng = state["rng"][self.rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        return state["step"], state["skipped"][self.rank]

    def check_signature(self, saved: dict) -> None:
        diff = [f"{k} {saved.get(k)!r} there, {v!r} here" for k, v in self.signature.items() if saved.get(k) != v]
        if diff:
            raise SnapshotError(f"{self.directory}: this run's settings differ from the interrupted run's ("
                                + "; ".join(diff) + "): resume with the same settings, or start over in another --out")

    @contextlib.contextmanager
    def kept(self):
        """A save the disk has no room for says what is kept: the last snapshot (atomic: a failed one leaves the
        one before), from which --resume goes on once there is room; a finished model in --out is untouched."""
        try:
            yield
        except DiskFullError as e:
            kept = f"the snapshot of step {self.step()} in {self.directory} is kept: free space and rerun with " \
                "--resume" if self.exists() else "no snapshot was kept (--save-every N makes them)"
            raise DiskFullError(f"{e}; {kept}") from e

    def step(self) -> int:
        return torch.load(self.directory / "state.pt", weights_only=True)["step"]

    def remove(self) -> None:
        """A finished run's checkpoint supersedes its snapshot. Its log, which a checkpoint's swap takes along
        (save.checkpoint_dir), joins the output here where the run saved otherwise."""
        if (self.directory / LOG).is_file():
            os.replace(self.directory / LOG, self.directory.parent / LOG)
        shutil.rmtree(self.directory, ignore_errors=True)

    def rng_state(self) -> dict:
        """This process's generators: CPU torch, Python, and the GPU's when it has one."""
        state = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state


def save_or_fall_back(save, out_dir: Path, spare: Optional[str], snapshots: Snapshots) -> None:
    """The trained model into `out_dir`; where its disk is full, into `spare` (--fallback-out) before the error."""
    try:
        with snapshots.kept():
            save(out_dir)
    except DiskFullError as e:
        if spare is None:
            raise
        if finished_checkpoint(spare, recover=False):  # (it held none when the options were read)
            raise DiskFullError(f"{e}; --fallback-out {spare} now holds a finished model: not replaced") from e
        try:
            save(Path(spare))
        except DiskFullError as again:
            raise DiskFullError(f"{e}; {again}") from e
        raise DiskFullError(f"{e}; the trained model was written to --fallback-out {spare}") from e
