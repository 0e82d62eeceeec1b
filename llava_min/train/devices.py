"""Where training runs: the torchrun process group, bf16 where it is native, FSDP sharding, peak FLOP/s."""
import gc
import os
from typing import Optional

import torch
import torch.distributed as dist


# Dense bf16 peak FLOP/s for MFU, keyed by a substring of torch.cuda.get_device_name().
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12,
              "L4": 121e12, "4090": 165e12}  # the more specific names first


def world() -> tuple:
    """(rank, world_size); starts the process group under torchrun (gloo on CPU, nccl on CUDA)."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def leave_world() -> None:
    """Ends the process group after a finished run: first the objects that still hold its pending work
    (DDP's buckets, FSDP's groups) are freed, then every process meets and the group is destroyed, all
    while the interpreter is alive. Left to interpreter exit, gloo's threads aborted 1 run in ~10."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def bf16_native(device) -> bool:
    """Whether bf16 matrix products are native here: CUDA, or a CPU with AVX512-BF16 or AMX instructions.
    Elsewhere (most laptops, older servers) oneDNN emulates them, slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's own probes (x86)
    return device.type == "cpu" and any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def use_bf16(device, choice: Optional[bool]) -> bool:
    """bf16 autocast or not: the choice made (--bf16 / --no-bf16), else where it is native."""
    return bf16_native(device) if choice is None else choice


def peak_flops(device) -> Optional[float]:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def shard(model) -> None:
    """FSDP2: every transformer block is sharded on its own, then the rest of the model."""
    from torch.distributed.fsdp import fully_shard
    for module in list(model.modules()):
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                fully_shard(block)
    fully_shard(model)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
