"""Contrastive pretraining of a tiny vision tower, so the toy world starts, like LLaVA, from a CLIP.

CLIP's recipe (Radford et al. 2021, Fig. 3): an image encoder and a text encoder map a batch of N
(image, caption) pairs to unit vectors; the N x N cosine similarities, scaled by a learned
temperature, are trained with a symmetric cross-entropy (InfoNCE) whose targets are the diagonal.
The text tower is built from this project's LLaMA decoder blocks (causal, like CLIP's text encoder)
and pooled at the end-of-text token.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..model.clip import VisionTower
from ..model.llama import DecoderBlock, LlamaConfig, RMSNorm, rope_cos_sin


class TextTower(nn.Module):
    def __init__(self, cfg: LlamaConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.text_projection = nn.Linear(cfg.hidden_size, embed_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """Right-padded captions [B, T] ending in EOS at `eot_index` [B] -> text embeddings [B, embed_dim]."""
        x = self.embed_tokens(input_ids)
        B, T, _ = x.shape
        cos, sin = rope_cos_sin(torch.arange(T, device=x.device).expand(B, T), self.cfg.head_dim, self.cfg.rope_theta,
                                x.dtype)
        for block in self.layers:
            x = block(x, cos, sin)  # causal: the EOS position has read the whole caption, never the padding
        pooled = self.norm(x[torch.arange(B, device=x.device), eot_index])
        return self.text_projection(pooled)


def decorrelation_loss(z: torch.Tensor) -> torch.Tensor:
    """How far the features' covariance C (over all tokens) is from the identity: ||C - I||^2 / dim (as VICReg)."""
    cov = torch.cov(z.reshape(-1, z.shape[-1]).float().T)
    return (cov - torch.eye(len(cov), device=z.device)).pow(2).sum() / len(cov)


class ContrastiveCLIP(nn.Module):
    def __init__(self, vision: VisionTower, text_cfg: LlamaConfig, embed_dim: int = 128, feature_layer: int = -2,
                 decorrelation: float = 0.0):
        super().__init__()
        self.vision_tower = vision
        self.feature_layer, self.decorrelation = feature_layer, decorrelation
        self.visual_projection = nn.Linear(vision.cfg.hidden_size, embed_dim, bias=False)
        self.text_tower = TextTower(text_cfg, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature

    def forward(self, pixel_values, input_ids, eot_index) -> torch.Tensor:
        """Symmetric InfoNCE over the batch (mean of image->text and text->image cross-entropy)."""
        pooled, features = self.vision_tower.pooled_and_features(pixel_values, self.feature_layer)
        image = F.normalize(self.visual_projection(pooled), dim=-1)
        text = F.normalize(self.text_tower(input_ids, eot_index), dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * image @ text.t()
        target = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        return loss + self.decorrelation * decorrelation_loss(features) if self.decorrelation else loss
