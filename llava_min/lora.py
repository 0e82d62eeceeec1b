"""LoRA adapters on disk: saved alone (LoRA + projector tensors), loaded back on their base, merged.

    python -m llava_min.lora merge --base STAGE1_OR_BASE_DIR --adapter ADAPTER_DIR --out MERGED_DIR
"""
import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from .files import read_json
from .model.lora import LoRAConfig, add_lora, merge_lora
from .save import checkpoint_dir
from .weights import CheckpointError, load_safetensors, save_safetensors


def adapter_state(model) -> dict:
    """What an adapter checkpoint holds: every LoRA tensor, the (fully trained) projector, and AnyRes's row-end
    vector when the model has one (stage 2 trains it too)."""
    return {k: v for k, v in model.state_dict().items()
            if ".lora_" in k or k.startswith("projector.") or k == "image_newline"}


def save_adapter(model, out_dir, base=None, tokenizer_path=None) -> None:
    cfg = model.language_model.lora_config
    config = json.dumps({**asdict(cfg), "base": str(base) if base else None,
                         "image_grid_pinpoints": model.cfg.image_grid_pinpoints or None,
                         # what stage 2 trained with, which its stage-1 base does not say (stage 1 crops)
                         "image_aspect_ratio": model.cfg.image_aspect_ratio, "template": model.cfg.template}, indent=2)
    with checkpoint_dir(out_dir) as tmp:  # whole or not at all, as a full checkpoint
        save_safetensors(adapter_state(model), tmp / "adapter.safetensors")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        (tmp / "adapter_config.json").write_text(config)


def adapter_config(adapter_dir) -> dict:
    file = Path(adapter_dir) / "adapter_config.json"
    if not file.is_file():
        raise CheckpointError(f"{adapter_dir} is not a LoRA adapter: it has no adapter_config.json")
    return read_json(file)


def load_adapter(model, adapter_dir) -> None:
    """Adds LoRA to a base model and loads an adapter strictly (every tensor, every shape)."""
    adapter_dir = Path(adapter_dir)
    cfg = adapter_config(adapter_dir)
    if cfg.get("image_grid_pinpoints") and model.anyres is None:  # trained on AnyRes tiles from a one-view base
        model.use_anyres(cfg["image_grid_pinpoints"])
    model.cfg.image_aspect_ratio = cfg.get("image_aspect_ratio", model.cfg.image_aspect_ratio)
    model.cfg.template = cfg.get("template", model.cfg.template)
    add_lora(model.language_model, LoRAConfig(cfg["r"], cfg["alpha"], cfg["dropout"], tuple(cfg["targets"])))
    model.train(model.training)  # the new layers in the model's mode: no dropout in an eval-mode model
    saved, expected = load_safetensors(adapter_dir / "adapter.safetensors"), adapter_state(model)
    if set(saved) != set(expected):
        diff = sorted(set(saved) ^ set(expected))
        raise CheckpointError(f"{adapter_dir}/adapter.safetensors does not fit the model: {diff[:4]}")
    with torch.no_grad():
        for name, tensor in saved.items():
            if tensor.shape != expected[name].shape:
                raise CheckpointError(f"{name!r} in {adapter_dir}/adapter.safetensors has shape {tuple(tensor.shape)},"
                                      f" the model expects {tuple(expected[name].shape)}")
            expected[name].copy_(tensor)


def stored_dtype(path) -> torch.dtype:
    """The floating dtype a checkpoint's LLM is stored in; a stage-1 directory (the projector alone) is
    asked for the LLM its config names."""
    from .checkpoints import local_dir, stage1_projector_file
    from .configs import read_config
    from .weights import read_tensors, weight_files
    if stage1_projector_file(path) is not None:
        path = local_dir(read_config(path).get("_name_or_path"), path) or path
    return next((t.dtype for _, t, _ in read_tensors(weight_files(path)) if t.is_floating_point()), torch.float32)


def main(argv=None):
    from .checkpoints import append_image_token, load
    from .cli import existing, writable
    from .save import finished_checkpoint, save_llava
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="base + adapter -> a plain llava-hf checkpoint")
    merge.add_argument("--base", type=existing("dir"), required=True)
    merge.add_argument("--adapter", type=existing("dir"), required=True)
    merge.add_argument("--out", type=writable("dir"), required=True)
    merge.add_argument("--overwrite", action="store_true", help="replace a finished model in --out")
    merge.add_argument("--tokenizer", type=existing(), help="default: the one saved with the adapter, else BASE's")
    merge.add_argument("--vision", type=existing("dir"), help="an official stage-1 BASE: the CLIP directory")
    merge.add_argument("--llm", type=existing("dir"), help="an official stage-1 BASE: the LLaMA / Vicuna directory")
    args = p.parse_args(argv)
    if finished_checkpoint(args.out) and not args.overwrite:
        merge.error(f"--out {args.out} holds a finished model: pass --overwrite to replace it, or another --out")
    trained_on = adapter_config(args.adapter).get("base")  # (read before the base loads: a wrong --adapter fails fast)
    if trained_on and Path(trained_on).resolve() != args.base.resolve():
        print(f"note: {args.adapter} was trained on {trained_on}, not on --base {args.base}", file=sys.stderr)
    model = load(args.base, dtype=torch.float32, vision_path=args.vision, llm_path=args.llm)  # merged in fp32
    if model.cfg.image_token_id < 0:  # as train.py did before training the adapter
        append_image_token(model)
    load_adapter(model, args.adapter)
    merge_lora(model.language_model)
    model.to(stored_dtype(args.llm or args.base))  # and saved in the base's dtype (bf16 stays half the size)
    saved = args.adapter / "tokenizer.model"
    save_llava(model, args.out, args.tokenizer or (saved if saved.is_file() else args.base / "tokenizer.model"))
    print(f"merged {args.adapter} into {args.base} -> {args.out}")


if __name__ == "__main__":
    from .cli import run
    run(main)
