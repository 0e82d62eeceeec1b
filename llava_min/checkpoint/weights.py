"""Reading and writing weight files, strictly: every tensor consumed, every shape checked.

Formats: `.safetensors` and `.bin` (read with `torch.load(weights_only=True)`, never a full unpickle),
single files or sharded sets described by a `*.index.json` `weight_map`. Models are built on the meta
device and receive the file's tensors with `assign=True`, so a 7B model never exists twice in memory.
"""
import errno
import os
import pickle
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..files import InputError, atomic_write, read_json

WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointError(InputError):
    """A checkpoint that does not fit the model: names the key and the file."""


def weight_files(path) -> list:
    """The weight files of a checkpoint directory (or a single weight file)."""
    path = Path(path)
    if path.is_file():
        candidates = [path]
    else:
        candidates = [path / n for n in WEIGHT_NAMES if (path / n).is_file()][:1]
        if not candidates:
            raise CheckpointError(f"no weights in {path}: looked for {', '.join(WEIGHT_NAMES)}")
    if candidates[0].name.endswith(".index.json"):
        index = read_json(candidates[0])
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{candidates[0]} has no weight_map")
        weight_map = index["weight_map"]
        return [candidates[0].parent / f for f in sorted(set(weight_map.values()))]
    return candidates


def read_tensors(files, keep: Callable[[str], bool] = lambda key: True) -> Iterator[tuple]:
    """Yields (key, tensor, file) for the kept keys, one file at a time, memory-mapped where possible."""
    for file in files:
        file = Path(file)
        if not file.is_file():
            raise CheckpointError(f"weight file {file} is missing")
        with unreadable(file):
            if file.suffix == ".safetensors":
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        if keep(key):
                            yield key, f.get_tensor(key), file
            else:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
                for key, tensor in state.items():
                    if keep(key):
                        yield key, tensor, file


def tensor_names(files) -> list:
    """The keys of weight files, without reading the tensors."""
    names = []
    for file in files:
        with unreadable(file):
            if Path(file).suffix == ".safetensors":
                with safe_open(file, framework="pt") as f:
                    names += list(f.keys())
            else:
                names += list(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    return names


@contextmanager
def unreadable(file):
    """A truncated or foreign weight file is a CheckpointError naming it (safetensors' and torch's errors do not)."""
    try:
        yield
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as e:
        raise CheckpointError(f"weight file {file} cannot be read: {' '.join(str(e).split())[:300]}") from e


def load_safetensors(file) -> dict:
    """A whole .safetensors file (a snapshot's or an adapter's), read or refused with its name."""
    from safetensors.torch import load_file
    with unreadable(file):
        return load_file(file)


def load_strict(model: nn.Module, tensors, rename: Callable[[str], Optional[str]], ignore: Callable[[str], Optional[str]],
                dtype: torch.dtype, device, allow_missing: tuple = ()) -> list:
    """Assigns checkpoint tensors to a (meta-device) model. Returns the ignored keys with reasons.

    `rename` maps a checkpoint key to the model's name (None: unknown); `ignore` gives a reason to skip
    a key (None: keep). Unknown, duplicate, misshapen and missing tensors are errors naming key and file.
    Names starting with a prefix in `allow_missing` may stay unloaded (the caller initializes them).
    """
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = getattr(model, "tied_names", dict)()
    loaded, ignored, sources, tied_copies = {}, [], set(), []
    for key, tensor, file in tensors:
        sources.add(str(file))
        reason = ignore(key)
        if reason:
            ignored.append((key, reason))
            continue
        name = rename(key)
        if name in tied:
            ignored.append((key, "tied to the input embedding"))
            tied_copies.append((key, tensor, file, name))
            continue
        if name not in expected:
            raise CheckpointError(f"unexpected tensor {key!r} in {file}: the model has no such parameter")
        if name in loaded:
            raise CheckpointError(f"tensor {key!r} in {file} maps to {name!r}, which was already loaded")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise CheckpointError(f"tensor {key!r} in {file} has shape {tuple(tensor.shape)}, "
                                  f"the model expects {tuple(expected[name])} for {name!r}")
        loaded[name] = tensor.to(device=device, dtype=dtype)
    missing = [k for k in expected if k not in loaded and k not in tied and not k.startswith(allow_missing)]
    if missing:
        raise CheckpointError(f"{len(missing)} tensor(s) missing from {', '.join(sorted(sources)) or 'the checkpoint'}: "
                              + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    for key, tensor, file, name in tied_copies:  # a tied copy must be a copy: a different head would be lost
        if tied[name] in loaded and not torch.equal(tensor.to(device=device, dtype=dtype), loaded[tied[name]]):
            raise CheckpointError(f"tensor {key!r} in {file} differs from {tied[name]!r}, to which the config ties it "
                                  "(tie_word_embeddings): set it to false to load the file's own head")
    model.load_state_dict(loaded, strict=False, assign=True)  # strictness was checked above, with names
    return ignored


def materialize(module: nn.Module, device, dtype) -> None:
    """Gives a meta-device module real, freshly initialized weights (for parts a checkpoint lacks)."""
    module.to_empty(device=device)
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    module.to(dtype)


def save_safetensors(tensors: dict, file, metadata: Optional[dict] = None) -> None:
    """Written whole or not at all; a disk without room for it is a DiskFullError (files.room_for)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    size = sum(t.nbytes for t in tensors.values())
    atomic_write(file, lambda tmp: write_safetensors(tensors, tmp, metadata or {"format": "pt"}), size=size)


def write_safetensors(tensors: dict, tmp: Path, metadata: dict) -> None:
    """safetensors reports a full disk as its own error: raised as the OSError it is."""
    try:
        save_file(tensors, str(tmp), metadata=metadata)
    except SafetensorError as e:
        if f"os error {errno.ENOSPC}" not in str(e):
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from e
