"""LoRA (Hu et al. 2021) for stage 2 on one GPU: W x + (alpha / r) · B A dropout(x), W frozen, B = 0 at start.

LLaVA-1.5's LoRA recipe adapts every linear layer of the LLM (not lm_head, not the projector, which
trains fully): r 128, alpha 256, lr 2e-4, projector lr 2e-5. The adapter is saved alone (LoRA + projector
tensors, a few hundred MB for 7B), loads back on top of its base, and merges into a plain checkpoint.

    python -m llava_min.lora merge --base STAGE1_OR_BASE_DIR --adapter ADAPTER_DIR --out MERGED_DIR
"""
import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .weights import CheckpointError, atomic_write, save_safetensors

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    r: int = 128
    alpha: float = 256.0
    dropout: float = 0.05
    targets: tuple = TARGETS


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank update. The frozen weight keeps its name
    (`q_proj.weight`), so the base checkpoint's names do not change."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        kwargs = dict(device=base.weight.device, dtype=torch.float32)  # adapters train in fp32
        self.lora_A = nn.Parameter(torch.empty(cfg.r, self.in_features, **kwargs))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, cfg.r, **kwargs))  # B = 0: starts as W
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = cfg.alpha / cfg.r
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t() @ self.lora_B.t()
        return super().forward(x) + (self.scaling * update).to(x.dtype)

    def merged(self) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            delta = self.scaling * (self.lora_B @ self.lora_A)
            linear.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def lora_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def add_lora(llm: nn.Module, cfg: LoRAConfig) -> list:
    """Wraps the target linear layers of the LLM; returns the new (trainable) LoRA parameters."""
    params = []
    for name, module in list(llm.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in cfg.targets and type(child) is nn.Linear:
                lora = LoRALinear(child, cfg)
                setattr(module, child_name, lora)
                params += [lora.lora_A, lora.lora_B]
    if not params:
        raise ValueError(f"no linear layer named {cfg.targets} to adapt")
    llm.lora_config = cfg
    return params


def merge_lora(llm: nn.Module) -> None:
    """Folds every B A into its W and removes the adapters: a plain model again."""
    for name, lora in lora_layers(llm):
        parent_name, _, child = name.rpartition(".")
        setattr(llm.get_submodule(parent_name) if parent_name else llm, child, lora.merged())
    llm.__dict__.pop("lora_config", None)


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
    save_safetensors(adapter_state(model), Path(out_dir) / "adapter.safetensors")
    if tokenizer_path is not None:
        atomic_write(Path(out_dir) / "tokenizer.model", lambda tmp: tmp.write_bytes(Path(tokenizer_path).read_bytes()))
    atomic_write(Path(out_dir) / "adapter_config.json", lambda tmp: tmp.write_text(config))


def load_adapter(model, adapter_dir) -> None:
    """Adds LoRA to a base model and loads an adapter strictly (every tensor, every shape)."""
    from safetensors.torch import load_file
    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("image_grid_pinpoints") and model.anyres is None:  # trained on AnyRes tiles from a one-view base
        model.use_anyres(cfg["image_grid_pinpoints"])
    model.cfg.image_aspect_ratio = cfg.get("image_aspect_ratio", model.cfg.image_aspect_ratio)
    model.cfg.template = cfg.get("template", model.cfg.template)
    add_lora(model.language_model, LoRAConfig(cfg["r"], cfg["alpha"], cfg["dropout"], tuple(cfg["targets"])))
    model.train(model.training)  # the new layers in the model's mode: no dropout in an eval-mode model
    saved, expected = load_file(adapter_dir / "adapter.safetensors"), adapter_state(model)
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
    from .checkpoints import local_dir, read_config, stage1_projector_file
    from .weights import read_tensors, weight_files
    if stage1_projector_file(path) is not None:
        path = local_dir(read_config(path).get("_name_or_path"), path) or path
    return next((t.dtype for _, t, _ in read_tensors(weight_files(path)) if t.is_floating_point()), torch.float32)


def main(argv=None):
    from .checkpoints import append_image_token, load, save_llava
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="base + adapter -> a plain llava-hf checkpoint")
    merge.add_argument("--base", type=Path, required=True)
    merge.add_argument("--adapter", type=Path, required=True)
    merge.add_argument("--out", type=Path, required=True)
    merge.add_argument("--tokenizer", type=Path, help="default: the one saved with the adapter, else BASE's")
    merge.add_argument("--vision", type=Path, help="an official stage-1 BASE: the CLIP directory it goes with")
    merge.add_argument("--llm", type=Path, help="an official stage-1 BASE: the LLaMA / Vicuna directory it goes with")
    args = p.parse_args(argv)
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
    main()
