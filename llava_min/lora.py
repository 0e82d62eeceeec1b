"""Merging a LoRA adapter into its base: a plain llava-hf checkpoint (adapters are read in checkpoint/peft.py and
written in checkpoint/save.py).

    python -m llava_min.lora merge --base STAGE1_OR_BASE_DIR --adapter ADAPTER_DIR --out MERGED_DIR
    python -m llava_min.lora merge --base VICUNA_DIR --adapter OFFICIAL_LORA_RELEASE_DIR --out MERGED_DIR
"""
import argparse
import sys

import torch

from .checkpoint.configs import read_config
from .checkpoint.load import append_image_token
from .checkpoint.official import named_dir, stage1_projector_file
from .checkpoint.peft import adapter_config, load_adapted, merge_adapter
from .checkpoint.save import finished_checkpoint, save_llava
from .checkpoint.weights import read_tensors, weight_files
from .cli import existing, run, writable
from .files import only_run


def stored_dtype(path) -> torch.dtype:
    """The floating dtype a checkpoint's LLM is stored in; a stage-1 directory (the projector alone) is
    asked for the LLM its config names."""
    if stage1_projector_file(path) is not None:
        path = named_dir(read_config(path).get("_name_or_path"), path) or path
    return next((t.dtype for _, t, _ in read_tensors(weight_files(path)) if t.is_floating_point()), torch.float32)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="base + adapter -> a plain llava-hf checkpoint")
    merge.add_argument("--base", type=existing("dir"), required=True)
    merge.add_argument("--adapter", type=existing("dir"), required=True)
    merge.add_argument("--out", type=writable("dir"), required=True)
    merge.add_argument("--overwrite", action="store_true", help="replace a finished model in --out")
    merge.add_argument("--tokenizer", type=existing(), help="default: the one saved with the adapter, else BASE's")
    merge.add_argument("--vision", type=existing("dir"), help="an official stage-1 BASE or LoRA release: the CLIP "
                       "directory it goes with, if not the one its config names")
    merge.add_argument("--llm", type=existing("dir"), help="an official stage-1 BASE: the LLaMA / Vicuna directory")
    args = p.parse_args(argv)
    with only_run(args.out):  # one writer per --out: a second would replace the first's model
        if finished_checkpoint(args.out) and not args.overwrite:
            merge.error(f"--out {args.out} holds a finished model: pass --overwrite to replace it, or another --out")
        merge_into(args)


def merge_into(args) -> None:
    """--adapter merged into --base, saved in --out whole or not at all (checkpoint.save.checkpoint_dir)."""
    trained_on = adapter_config(args.adapter).get("base_model_name_or_path")  # (a wrong --adapter fails fast)
    if trained_on and (args.adapter / trained_on).resolve() != args.base.resolve():
        print(f"note: {args.adapter} was trained on {trained_on}, not on --base {args.base}", file=sys.stderr)
    model = load_adapted(args.adapter, args.base, torch.float32, vision_path=args.vision, llm_path=args.llm)  # in fp32
    merge_adapter(model)
    if model.cfg.image_token_id < 0:  # llava-hf's <image> in the vocabulary (train.py adds it before training)
        append_image_token(model)
    model.to(stored_dtype(args.llm or args.base))  # and saved in the base's dtype (bf16 stays half the size)
    saved = args.adapter / "tokenizer.model"
    save_llava(model, args.out, args.tokenizer or (saved if saved.is_file() else args.base / "tokenizer.model"))
    print(f"merged {args.adapter} into {args.base} -> {args.out}")


if __name__ == "__main__":
    run(main)
