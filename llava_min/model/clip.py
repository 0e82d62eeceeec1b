"""The vision encoder g of Eq. 1: a CLIP ViT (Radford et al. 2021), as LLaVA uses it.

Mirrors transformers' `CLIPVisionModel` (modeling_clip.py): patch embedding without bias, a class
token, learned position embeddings, `pre_layrnorm` (sic), pre-LN blocks with quick-GELU MLPs.
LLaVA reads the hidden states of one block (`select_layer`, default -2 = the penultimate block), so
the blocks after it never run; `post_layernorm` is only used by CLIP's own contrastive pooling.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


def num_features(cfg: VisionConfig, select_feature: str = "patch") -> int:
    """Feature vectors g gives per image: one per patch, plus the CLS token for "cls_patch"."""
    return cfg.num_patches + (select_feature == "cls_patch")


class VisionEmbeddings(nn.Module):
    """Image -> [CLS, patch_1, ..., patch_N] + position embeddings."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)  # [B, N, D]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biases; no mask (every patch sees every patch)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        split = lambda t: t.view(B, T, self.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v)  # scale = head_dim ** -0.5, as CLIP
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """g in Eq. 1: Z_v = g(X_v), the features of block `select_layer`.

    `select_layer` indexes CLIP's `hidden_states` tuple, which has num_layers + 1 entries (entry 0 is
    the embedding after pre_layrnorm), so -2 is the output of the second-to-last block.
    `select_feature`: "patch" drops the CLS token (576 tokens at 336 px), "cls_patch" keeps it.
    """

    def __init__(self, cfg: VisionConfig, select_layer: int = -2, select_feature: str = "patch"):
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got {select_feature!r}")
        if not -(cfg.num_hidden_layers + 1) <= select_layer <= cfg.num_hidden_layers:
            raise ValueError(f"select_layer {select_layer} is outside the {cfg.num_hidden_layers + 1} hidden states "
                             f"(embeddings + {cfg.num_hidden_layers} layers)")
        self.cfg, self.select_feature = cfg, select_feature
        self.num_blocks = select_layer % (cfg.num_hidden_layers + 1)  # blocks to run; -2 -> L - 1
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    @property
    def num_tokens(self) -> int:
        """Visual tokens per image: what `<image>` expands to."""
        return num_features(self.cfg, self.select_feature)

    def hidden_states(self, pixel_values: torch.Tensor, num_blocks: int) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for block in self.layers[:num_blocks]:
            x = block(x)
        return x

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[num_images, 3, H, W] -> Z_v [num_images, num_tokens, hidden]."""
        z = self.hidden_states(pixel_values, self.num_blocks)
        return z[:, 1:] if self.select_feature == "patch" else z

    def pooled(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP's image embedding before its projection: post_layernorm(CLS) of the last block."""
        return self.pooled_and_features(pixel_values, -1)[0]

    def pooled_and_features(self, pixel_values: torch.Tensor, select_layer: int) -> tuple:
        """`pooled` and the patch features of block `select_layer`, in one pass."""
        keep = select_layer % (self.cfg.num_hidden_layers + 1)
        z = x = self.hidden_states(pixel_values, keep)
        for block in self.layers[keep:]:
            x = block(x)
        return self.post_layernorm(x[:, 0]), z[:, 1:]
