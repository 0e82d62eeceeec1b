"""LoRA (Hu et al. 2021): W x + (alpha / r) · B A dropout(x), W frozen, B = 0 at start.

LLaVA-1.5's LoRA recipe adapts every linear layer of the LLM (not lm_head, not the projector, which
trains fully): r 128, alpha 256, lr 2e-4, projector lr 2e-5 (the official finetune_lora.sh).
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

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
