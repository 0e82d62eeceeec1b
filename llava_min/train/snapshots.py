"""Resumable snapshots of a training run: the trained weights, the optimizer, the step and every process's
random generators, written atomically; a resumed run must share the interrupted run's settings."""
import random

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from ..files import InputError, atomic_dir, recover_dir
from ..checkpoint.weights import load_safetensors, save_safetensors

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors on CPU, whatever the sharding


class Snapshots:
    """Trainer's snapshot methods (`state_dir`, `model`, `optimizer`, `step`, ... are the trainer's)."""

    def find_snapshot(self) -> None:
        """--resume needs a snapshot; a fresh start must not silently drop an interrupted run's."""
        if self.rank == 0:
            recover_dir(self.state_dir)
        if self.world_size > 1:
            dist.barrier()
        found = (self.state_dir / "state.pt").is_file()
        if self.cfg.resume and not found:
            raise FileNotFoundError(f"--resume: no snapshot in {self.state_dir} (one is written every --save-every "
                                    "steps and when --stop-after ends a run; a finished run removes it)")
        if not self.cfg.resume and found:
            step = torch.load(self.state_dir / "state.pt", weights_only=True)["step"]
            raise FileExistsError(f"{self.state_dir} holds the snapshot of an unfinished run (step {step}): pass "
                                  "--resume to continue it, or remove it to start over")

    def signature(self) -> dict:
        """What a resumed run must share with its snapshot: the data and its order, the schedule, what trains."""
        c = self.cfg
        return {"batch_size": c.batch_size, "grad_accum": c.grad_accum, "seed": c.seed,
                "group_by_length": c.group_by_length, "total_steps": self.total_steps, "samples": len(self.dataset),
                "lr": [g["peak_lr"] for g in self.optimizer.param_groups], "weight_decay": c.weight_decay,
                "warmup_ratio": c.warmup_ratio, "clip_grad": c.clip_grad, **self.settings}

    def check_signature(self, saved: dict) -> None:
        ours = self.signature()
        diff = [f"{k} {saved.get(k)!r} there, {v!r} here" for k, v in ours.items() if saved.get(k) != v]
        if diff:
            raise InputError(f"{self.state_dir}: this run's settings differ from the interrupted run's ("
                             + "; ".join(diff) + "): resume with the same settings, or start over in another --out")

    def save_state(self) -> None:
        """Trained weights, optimizer, schedule position, RNG: everything a resumed run needs."""
        model_state = get_model_state_dict(self.model, options=FULL)  # collective under FSDP
        optim_state = None  # before the first update there is none, and asking for it would make some (a step of 1)
        if self.optimizer.state:
            optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=FULL)
        mine = {"rng": self.rng_state(), "skipped": self.skipped}
        each = [mine]
        if self.world_size > 1:  # every process draws its own dropout masks and skips its own records
            each = [None] * self.world_size
            dist.all_gather_object(each, mine)
        if self.rank == 0:
            with atomic_dir(self.state_dir) as tmp:
                save_safetensors({n: model_state[n] for n in self.trainable_names}, tmp / "trainable.safetensors")
                torch.save({"step": self.step, "optimizer": optim_state, "skipped": [e["skipped"] for e in each],
                            "rng": [e["rng"] for e in each], "settings": self.signature()}, tmp / "state.pt")
        if self.world_size > 1:
            dist.barrier()

    def load_state(self) -> None:
        state = torch.load(self.state_dir / "state.pt", weights_only=True)
        self.check_signature(state["settings"])
        saved = load_safetensors(self.state_dir / "trainable.safetensors")
        if set(saved) != set(self.trainable_names):
            raise InputError(f"{self.state_dir}: snapshot holds {sorted(set(saved) ^ set(self.trainable_names))[:4]}"
                             "... which this run does not train (different stage or flags?)")
        set_model_state_dict(self.model, saved, options=StateDictOptions(full_state_dict=True, strict=False))
        if state["optimizer"] is not None:
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        self.step = state["step"]
        if len(state["rng"]) != self.world_size:
            raise InputError(f"{self.state_dir}: snapshot of {len(state['rng'])} processes, this run has "
                             f"{self.world_size}")
        self.skipped = state["skipped"][self.rank]
        rng = state["rng"][self.rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def rng_state(self) -> dict:
        """This process's generators: CPU torch, Python, and the GPU's when it has one."""
        state = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state
