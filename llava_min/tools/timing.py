"""Honest timings: the GPU synchronized before each clock read, peak memory per row, two models timed in turn."""
import gc
import statistics
import time
from contextlib import contextmanager

import torch


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def peak_memory(device, out: dict):
    """Peak MB allocated inside the block above what was allocated before it: both models stay resident
    (and the first side's optimizer state during the second side's step), so totals would not compare."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    yield
    out["peak_mb"] = round((torch.cuda.max_memory_allocated(device) - before) / 2**20) if cuda else None


def timed(fn, device, warmup: int, repeats: int, other=None) -> tuple:
    """Median seconds of `fn` (and of `other`, interleaved with it) after warm-up."""
    for _ in range(warmup):
        fn(), other and other()
    times = {fn: [], other: []}
    for _ in range(repeats):
        for f in (fn, other) if other else (fn,):
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[f].append(time.perf_counter() - t0)
    return statistics.median(times[fn]), statistics.median(times[other]) if other else None


def runs_on_flash(step) -> bool:
    """Does a training step run with SDPA restricted to the flash backend? (No kernel -> RuntimeError.)
    The check the design rests on: no mask tensor in training-shaped attention, so flash can take it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            step()
        return True
    except RuntimeError:
        return False


def free_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
