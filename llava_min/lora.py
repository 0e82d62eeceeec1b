"""LoRA adapters on disk: saved alone (LoRA + projector tensors) in peft's layout, loaded back on their base,
merged (the layouts read: adapters.py).

    python -m llava_min.lora merge --base STAGE1_OR_BASE_DIR --adapter ADAPTER_DIR --out MERGED_DIR
    python -m llava_min.lora merge --base VICUNA_DIR --adapter OFFICIAL_LORA_RELEASE_DIR --out MERGED_DIR
"""
import argparse
from pathlib import Path

import torch

from .adapters import adapted_settings, apply_adapter, load_adapted, merge_adapter, write_adapter
from .adapters import adapter_state  # noqa: F401  (what an adapter holds; imported from here too)


def save_adapter(model, out_dir, base=None, tokenizer_path=None) -> None:
    """The adapter (`adapter_state`) in peft's layout: PeftModel.from_pretrained reads it on a llava-hf base."""
    write_adapter(model, out_dir, base, tokenizer_path)


def load_adapter(model, adapter_dir) -> None:
    """Adds LoRA to a base model and loads an adapter strictly (every tensor, every shape): ours, peft's, or
    llava-min's earlier format, with the settings stage 2 trained with."""
    adapted_settings(model, adapter_dir)
    apply_adapter(model, adapter_dir)


def stored_dtype(path) -> torch.dtype:
    """The floating dtype a checkpoint's LLM is stored in; a stage-1 directory (the projector alone) is
    asked for the LLM its config names."""
    from .official import named_dir, stage1_projector_file
    from .configs import read_config
    from .weights import read_tensors, weight_files
    if stage1_projector_file(path) is not None:
        path = named_dir(read_config(path).get("_name_or_path"), path) or path
    return next((t.dtype for _, t, _ in read_tensors(weight_files(path)) if t.is_floating_point()), torch.float32)


def main(argv=None):
    from .checkpoints import append_image_token
    from .save import save_llava
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="base + adapter -> a plain llava-hf checkpoint")
    merge.add_argument("--base", type=Path, required=True)
    merge.add_argument("--adapter", type=Path, required=True)
    merge.add_argument("--out", type=Path, required=True)
    merge.add_argument("--tokenizer", type=Path, help="default: the one saved with the adapter, else BASE's")
    merge.add_argument("--vision", type=Path, help="an official stage-1 BASE or LoRA release: the CLIP directory it "
                       "goes with, if not the one its config names")
    merge.add_argument("--llm", type=Path, help="an official stage-1 BASE: the LLaMA / Vicuna directory it goes with")
    args = p.parse_args(argv)
    model = load_adapted(args.adapter, args.base, torch.float32, vision_path=args.vision, llm_path=args.llm)  # in fp32
    merge_adapter(model)
    if model.cfg.image_token_id < 0:  # llava-hf's <image> in the vocabulary (train.py adds it before training)
        append_image_token(model)
    model.to(stored_dtype(args.llm or args.base))  # and saved in the base's dtype (bf16 stays half the size)
    saved = args.adapter / "tokenizer.model"
    save_llava(model, args.out, args.tokenizer or (saved if saved.is_file() else args.base / "tokenizer.model"))
    print(f"merged {args.adapter} into {args.base} -> {args.out}")


if __name__ == "__main__":
    main()
