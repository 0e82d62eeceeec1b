"""One training loop for every stage: AdamW, warmup + cosine, gradient accumulation, clipping, bf16
autocast where the hardware has it (CUDA, recent x86 CPUs), DDP or FSDP under torchrun,
a JSONL metrics log, and exact resume.

The stage supplies the model, its parameter groups, a dataset + collate function, `loss_fn(model,
batch)` giving the *sum* of the per-target losses and `count_fn(batch)` giving the number of targets.
Each optimizer step divides by the count over all its micro-batches and all processes, so two
processes with batch B give the same update as one process with batch 2B (a per-micro-batch mean
would weight the tokens of short samples more).
"""
import contextlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from tqdm import tqdm

from .devices import peak_flops, shard, to_device, use_bf16, world
from ..errors import OptionError
from ..files import LOG, SNAPSHOT, InputError, atomic_write, room_for
from .snapshots import FULL, Snapshots, resume_signature, save_or_fall_back


@dataclass
class TrainConfig:
    out_dir: str
    lr: float
    epochs: float = 1.0
    max_steps: Optional[int] = None
    batch_size: int = 8  # per process, per micro-batch
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    clip_grad: float = 1.0
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # steps between resumable snapshots; 0 = only at the end
    num_workers: int = 0
    resume: bool = False
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state (ZeRO-3) instead of DDP
    group_by_length: bool = False  # batches of samples of similar length (less padding); needs dataset lengths
    bf16: Optional[bool] = None  # bf16 autocast (fp32 weights); None: where the hardware has it (use_bf16)
    stop_after: Optional[int] = None  # leave after this many steps, as if interrupted (tests, time limits)
    progress: bool = True
    name: str = ""  # the stage: the progress bar's label, and part of the resume signature
    data_file: Optional[str] = None  # the training file: a resumed run must read the same (resume_signature)
    fallback_out: Optional[str] = None  # the final save's second place, where out_dir's disk is full


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup, then cosine decay to zero (the official recipe's schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def sample_lengths(dataset) -> list:
    """`dataset.lengths` (through a Subset too): what group_by_length sorts by."""
    if isinstance(dataset, torch.utils.data.Subset):
        inner = sample_lengths(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    if not hasattr(dataset, "lengths"):
        raise ValueError(f"group_by_length needs a dataset with `lengths`; {type(dataset).__name__} has none")
    return dataset.lengths


def length_grouped(order: torch.Tensor, lengths: list, batch: int, generator: torch.Generator,
                   megabatch: int = 50) -> torch.Tensor:
    """`order` rearranged so that each run of `batch` samples has similar lengths: every `megabatch` batches
    are sorted by length and cut into batches, then the epoch's batches are shuffled (transformers'
    group_by_length). The same samples, less padding; a function of `order` and `generator` only."""
    n, lengths = len(order) // batch * batch, torch.as_tensor(lengths)
    batches = []
    for start in range(0, n, megabatch * batch):
        chunk = order[start: min(start + megabatch * batch, n)]
        batches += list(chunk[lengths[chunk].argsort(descending=True, stable=True)].split(batch))
    return torch.cat([batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()] + [order[n:]])


class Trainer:
    def __init__(self, model, param_groups: list, dataset, collate: Callable, loss_fn: Callable, count_fn: Callable,
                 cfg: TrainConfig, device="cpu", flops_per_token: float = 0.0, settings: Optional[dict] = None):
        """`settings`: the stage's own choices a resumed run must share with its snapshot (`resume_signature`)."""
        self.model, self.dataset, self.collate, self.cfg = model, dataset, collate, cfg
        self.loss_fn, self.count_fn = loss_fn, count_fn
        self.device = torch.device(device)
        self.bf16 = use_bf16(self.device, cfg.bf16)
        self.rank, self.world_size = world()
        names = {id(p): n for n, p in model.named_parameters()}
        trainable = [names[id(p)] for g in param_groups for p in g["params"]]
        self.ddp, self.fsdp = None, cfg.fsdp and self.world_size > 1
        fused = self.device.type == "cuda"
        if self.fsdp:  # sharding replaces the parameters: find the trained ones again by name
            shard(model)
            params = dict(model.named_parameters())
            param_groups = [{**g, "params": [params[names[id(p)]] for p in g["params"]]} for g in param_groups]
        elif self.world_size > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if fused else None)
        self.params = [p for g in param_groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        for group in self.optimizer.param_groups:
            group["peak_lr"] = group["lr"]
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.world_size
        self.steps_per_epoch = len(dataset) // self.global_batch
        if self.steps_per_epoch == 0:
            raise InputError(f"{len(dataset)} samples are fewer than one global batch of {self.global_batch}: "
                             "lower --batch-size or --grad-accum")
        self.total_steps = cfg.max_steps or max(1, int(cfg.epochs * self.steps_per_epoch))
        self.warmup = math.ceil(cfg.warmup_ratio * self.total_steps)
        self.flops_per_token, self.peak = flops_per_token, peak_flops(device)
        self.lengths = sample_lengths(dataset) if cfg.group_by_length else None
        self.step, self.skipped = 0, 0
        signature = resume_signature(cfg, self.total_steps, len(dataset),
                                     [g["peak_lr"] for g in self.optimizer.param_groups], settings or {})
        self.snapshots = Snapshots(Path(cfg.out_dir) / SNAPSHOT, signature, trainable, self.rank, self.world_size,
                                   self.device)
        self.log_file = self.snapshots.directory / LOG  # with the run; it enters --out with the model (checkpoint_dir)

    # ------------------------------------------------------------ data order
    def micro_batch_indices(self, first_step: int):
        """This process's micro-batches of dataset indices from `first_step` on, in an epoch-seeded order
        that depends only on the seed: a resumed run sees exactly the batches it would have seen."""
        B, W, G = self.cfg.batch_size, self.world_size, self.global_batch
        order_epoch = None
        for step in range(first_step, self.total_steps):
            epoch, within = divmod(step, self.steps_per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, self.epoch_order(epoch)
            for j in range(self.cfg.grad_accum):
                start = within * G + (j * W + self.rank) * B
                yield order[start: start + B].tolist()

    def epoch_order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
        order = torch.randperm(len(self.dataset), generator=generator)
        if self.lengths is not None:
            order = length_grouped(order, self.lengths, self.global_batch, generator)
        return order

    def step_batches(self, first_step: int):
        """Lists of `grad_accum` collated micro-batches, one list per optimizer step (workers prefetch)."""
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=self.micro_batch_indices(first_step),
                                             collate_fn=self.collate, num_workers=self.cfg.num_workers,
                                             pin_memory=self.device.type == "cuda",  # its own generator: starting
                                             generator=torch.Generator().manual_seed(self.cfg.seed))  # draws no RNG
        group = []
        for batch in loader:
            group.append(batch)
            if len(group) == self.cfg.grad_accum:
                yield group
                group = []

    # ------------------------------------------------------------ one optimizer step
    def count(self, batches) -> torch.Tensor:
        n = torch.tensor(float(sum(self.count_fn(b) for b in batches)), device=self.device)
        if self.world_size > 1:
            dist.all_reduce(n)
        return n

    def train_step(self, batches) -> tuple:
        """One optimizer step. Here Eq. 3's mean is taken: each micro-batch's summed loss over the step's
        supervised-token count, counted over all its micro-batches and all processes."""
        total = self.count(batches)
        loss_sum = torch.zeros((), device=self.device)
        model = self.ddp or self.model
        for j, batch in enumerate(batches):
            sync = j == len(batches) - 1
            ctx = model.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()
            if self.fsdp:
                model.set_requires_gradient_sync(sync)
            with ctx, torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16):
                part = self.loss_fn(model, batch)
                # DDP / FSDP average gradients over processes; scale back up so the result is sum / total.
                (part * self.world_size / total).backward()
            loss_sum += part.detach()
            self.skipped += batch.get("num_skipped", 0)
        if self.world_size > 1:
            dist.all_reduce(loss_sum)
        if total.item() == 0:  # every record of the step skipped: nothing to learn, no update (the step still counts)
            self.optimizer.zero_grad(set_to_none=True)
            return float("nan"), None
        loss = loss_sum / total
        if not torch.isfinite(loss):
            saved = f"the last snapshot in {self.snapshots.directory} is intact" if self.snapshots.exists() else \
                "no snapshot was saved (--save-every N makes them)"
            raise OptionError(f"loss is {loss.item()} at step {self.step}: stopping; {saved}. "
                              "Lower --lr or check the data.")  # diverged: most often a learning rate too high
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad) if self.cfg.clip_grad else None
        lr_scale = lr_at(self.step, self.total_steps, self.warmup, 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = group["peak_lr"] * lr_scale
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), grad_norm

    # ------------------------------------------------------------ the loop
    def fit(self, save: Callable[[Path], None]) -> list:
        """Runs to `total_steps` (or `stop_after`), calls `save(out_dir)` at the end; returns the step losses."""
        torch.manual_seed(self.cfg.seed + self.rank)
        random.seed(self.cfg.seed + self.rank)
        self.snapshots.check_start(self.cfg.resume)
        if self.cfg.resume:
            self.step, self.skipped = self.snapshots.load(self.model, self.optimizer)
        self.trim_log()
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=self.rank != 0 or not self.cfg.progress,
                   dynamic_ncols=True, desc=self.cfg.name or None)
        losses, stop = [], self.cfg.stop_after
        for batches in self.step_batches(self.step):
            if stop is not None and len(losses) >= stop:
                break
            tokens = sum(int(b["input_ids"].numel()) if "input_ids" in b else 0 for b in batches) * self.world_size
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss, grad_norm = self.train_step([to_device(b, self.device) for b in batches])
            if self.device.type == "cuda":
                torch.cuda.synchronize()  # honest timing: wait for the GPU before reading the clock
            dt = time.perf_counter() - t0
            self.step += 1
            losses.append(loss)
            self.log(loss, grad_norm, tokens, dt, bar)
            if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.total_steps:
                with self.snapshots.kept():
                    self.snapshots.save(self.model, self.optimizer, self.step, self.skipped)
        bar.close()
        self.skipped_total = self.skipped_in_all()  # (a collective: before rank 0 alone saves)
        if self.step >= self.total_steps:
            if self.fsdp:  # gather the whole model (every process takes part); rank 0 writes it
                state = get_model_state_dict(self.model, options=FULL)
                self.model.state_dict = lambda *args, **kwargs: state  # what the stage's save(out) reads
            if self.rank == 0:
                save_or_fall_back(save, Path(self.cfg.out_dir), self.cfg.fallback_out, self.snapshots)
                self.snapshots.remove()
        else:
            with self.snapshots.kept():
                self.snapshots.save(self.model, self.optimizer, self.step, self.skipped)  # interrupted on purpose
        return losses

    def skipped_in_all(self) -> int:
        """Records skipped so far by every process together (each counts its own)."""
        n = torch.tensor(self.skipped, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(n)
        return int(n)

    def log(self, loss, grad_norm, tokens, dt, bar) -> None:
        if self.rank != 0:
            return
        record = {"step": self.step, "loss": None if math.isnan(loss) else round(loss, 6),  # None: all skipped
                  "lr": self.optimizer.param_groups[0]["lr"], "tokens_per_s": round(tokens / dt, 1),
                  "step_s": round(dt, 4)}
        if grad_norm is not None:
            record["grad_norm"] = round(float(grad_norm), 4)
        if self.peak and self.flops_per_token:
            record["mfu"] = round(self.flops_per_token * tokens / dt / self.peak, 4)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record) + "\n"
        with room_for(self.log_file, len(line)), open(self.log_file, "a") as f:
            f.write(line)
        bar.update(1)
        if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
            bar.set_postfix({k: record[k] for k in ("loss", "lr", "tokens_per_s", "mfu") if k in record})

    def trim_log(self) -> None:
        """Keep only the log lines of steps this run has already done (none on a fresh start)."""
        if self.rank == 0 and self.log_file.is_file():
            lines = [l for l in self.log_file.read_text().splitlines() if logged_step(l) <= self.step]
            atomic_write(self.log_file, lambda tmp: tmp.write_text("".join(l + "\n" for l in lines)))


def logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; a torn last line (a crash mid-write) counts as never written."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


