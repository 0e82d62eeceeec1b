"""The projection W of Eq. 1 that maps visual features into the LLM's word-embedding space.

LLaVA: one linear layer. LLaVA-1.5 (Sec. 3.3 of "Improved Baselines"): `mlp2x_gelu`, a two-layer MLP
with an exact (erf) GELU between, which transformers calls `LlavaMultiModalProjector`.
"""
import torch
import torch.nn.functional as F
from torch import nn

PROJECTOR_TYPES = ("linear", "mlp2x_gelu")


class Projector(nn.Module):
    def __init__(self, kind: str, vision_dim: int, text_dim: int):
        super().__init__()
        if kind not in PROJECTOR_TYPES:
            raise ValueError(f"projector type must be one of {PROJECTOR_TYPES}, got {kind!r}")
        self.kind = kind
        self.linear_1 = nn.Linear(vision_dim, text_dim)
        self.linear_2 = nn.Linear(text_dim, text_dim) if kind == "mlp2x_gelu" else None

    def forward(self, z_v: torch.Tensor) -> torch.Tensor:
        if self.linear_2 is None:  # LLaVA: W is one layer (Eq. 1 writes no bias; the official nn.Linear has one)
            return self.linear_1(z_v)  # Eq. 1: H_v = W · Z_v
        h_v = self.linear_2(F.gelu(self.linear_1(z_v)))  # Eq. 1 with LLaVA-1.5's W: Linear -> GELU -> Linear
        return h_v
