"""The language model f_phi of LLaVA: a LLaMA / Vicuna decoder (Touvron et al. 2023).

Mirrors transformers' `LlamaForCausalLM` (modeling_llama.py) so Hugging Face weights load without any
permutation: RMSNorm computed in fp32, rotary embeddings in the rotate-half layout, SwiGLU MLP,
grouped-query attention, no biases. Attention is `F.scaled_dot_product_attention`; when a batch needs
no mask (no left padding, no cache offset) it passes `is_causal=True` and no mask tensor, which lets
CUDA pick the fused flash kernel.
"""
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # labels the loss skips (as conversation.IGNORE_INDEX; the model imports no text code)


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: Optional[int] = None  # hidden_size // num_attention_heads when None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: Union[int, list] = 2  # a list: any of them ends a reply (generate)
    pad_token_id: int = 0

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # the statistics in fp32 whatever the weights' dtype, as LLaMA does
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [B, T, head_dim] for integer positions [B, T], computed in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions[..., None].float() * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half layout: pairs (i, i + d/2) rotate together. x is [B, H, T, D]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class KVCache:
    """Preallocated keys and values for every layer (gpt-fast style), filled left to right.

    `length` is the number of slots written so far; a forward pass over T new tokens writes slots
    [length, length + T) in every layer and then advances `length` (see `Llama.forward`).
    """

    def __init__(self, cfg: LlamaConfig, batch_size: int, max_len: int, dtype, device):
        # One tensor per layer, not one 5-D tensor: a compiled in-place write into a slice of a shared
        # base tensor copies the whole base (docs/performance.md).
        shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.max_len, self.length, self.batch_size = max_len, 0, batch_size

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, input_pos: Optional[torch.Tensor] = None):
        """Writes the new keys/values; returns the keys/values to attend over.

        Without `input_pos`: slots [length, length + T), and only the filled part is returned.
        With `input_pos` (a tensor of slot indices): the whole buffer is returned, the same shape at every
        step, so a compiled decode step is captured once (gpt-fast); a mask hides the unwritten slots.
        """
        if input_pos is not None:
            self.k[layer].index_copy_(2, input_pos, k)
            self.v[layer].index_copy_(2, input_pos, v)
            return self.k[layer], self.v[layer]
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; this step needs {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def attend(q, k, v, mask: Optional[torch.Tensor], causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v by SDPA, grouped keys/values shared by their query heads. Under bf16
    autocast on a CPU it runs in fp32: torch's CPU flash kernel is slower in bf16 (docs/performance.md)."""
    gqa = k.shape[1] != q.shape[1]
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask,
                                                  is_causal=causal, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=False)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask: Optional[torch.Tensor], cache: Optional[KVCache], input_pos=None):
        B, T, _ = x.shape
        split = lambda t: t.view(B, T, -1, self.cfg.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v, input_pos)
        # No mask tensor -> causal for a fresh sequence, or "see everything" for one new token.
        y = attend(q, k, v, mask, causal=mask is None and T > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None, input_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_for(attention_mask: Optional[torch.Tensor], T: int, start: int, device):
    """Boolean SDPA mask [B, 1, T, start + T], or None when causal attention alone is right.

    Needed only for left padding (pad keys must be hidden) or for several new tokens appended to a
    cache (causality is then offset by `start`). Right padding needs nothing: no real token ever
    attends to a later pad, and pads carry label -100.
    """
    left_padded = attention_mask is not None and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any())
    if not left_padded and (start == 0 or T == 1):
        return None
    q_idx = torch.arange(start, start + T, device=device)[:, None]
    k_idx = torch.arange(start + T, device=device)[None, :]
    allowed = (k_idx <= q_idx)[None, None]
    if left_padded:
        keys_real = attention_mask[:, None, None, : start + T].bool()
        allowed = allowed & keys_real | (k_idx == q_idx)  # a pad query sees itself: no empty softmax row
    return allowed


def positions_for(attention_mask: Optional[torch.Tensor], B: int, T: int, start: int, device):
    """Rotary positions: with left padding each row counts only its real tokens (as HF generate)."""
    if attention_mask is None:
        return torch.arange(start, start + T, device=device).expand(B, T)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start: start + T]


def causal_lm_loss(scores: torch.Tensor, labels: torch.Tensor, to_logits=None) -> torch.Tensor:
    """Eq. 3 is the answer's likelihood, prod_i p(x_i | X_v, X_instruct, x_<i) over the supervised tokens (labels
    -100 are not); this loss is its negative log divided by their number, the normalization chosen (training
    divides by the whole optimizer step's count instead: Trainer.train_step).

    `scores` are logits, or hidden states with `to_logits` (final norm + vocabulary projection), which then runs
    only at the positions that carry a label: in stage 2 most positions are system prompt, question or image (Table 2).
    """
    targets = labels[:, 1:]
    supervised = targets != IGNORE_INDEX
    scores = scores[:, :-1][supervised]
    return F.cross_entropy((scores if to_logits is None else to_logits(scores)).float(), targets[supervised])


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.grad_checkpointing = False

    def tie_weights(self) -> None:
        """Re-share the head with the embedding (loading with assign=True replaces parameters)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def tied_names(self) -> dict:
        """Tied parameter -> the one it shares (none unless the config ties them)."""
        return {"lm_head.weight": "embed_tokens.weight"} if self.cfg.tie_word_embeddings else {}

    @torch.no_grad()
    def resize_vocab(self, new_size: int) -> None:
        """Appends token rows initialized to the mean of the existing ones (llava-hf adds `<image>` so)."""
        old = self.cfg.vocab_size
        for module in (self.embed_tokens, self.lm_head):
            w = module.weight
            module.weight = nn.Parameter(torch.cat([w, w.mean(0, keepdim=True).expand(new_size - old, -1)]))
        self.cfg.vocab_size = self.embed_tokens.num_embeddings = self.lm_head.out_features = new_size
        self.tie_weights()

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        w = self.embed_tokens.weight
        return KVCache(self.cfg, batch_size, max_len, w.dtype, w.device)

    def forward(self, input_ids=None, labels=None, attention_mask=None, cache: Optional[KVCache] = None,
                inputs_embeds=None, return_logits: bool = True):
        """Returns (logits [B, T, V], loss or None). `attention_mask` ([B, cached + T], 1 = real token)
        is only needed for left-padded batches; `cache` makes this an incremental step. Training passes
        `return_logits=False`: (None, loss), the vocabulary projected only where a label is."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        start = cache.length if cache is not None else 0
        positions = positions_for(attention_mask, B, T, start, x.device)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        mask = attention_mask_for(attention_mask, T, start, x.device)
        for block in self.layers:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        return self.head(x, labels, return_logits)

    def head(self, x: torch.Tensor, labels=None, return_logits: bool = True):
        """Final norm and the vocabulary projection, and Eq. 3's loss when labels are given."""
        to_logits = lambda h: self.lm_head(self.norm(h))  # noqa: E731
        if not return_logits:
            return None, causal_lm_loss(x, labels, to_logits) if labels is not None else None
        logits = to_logits(x)
        return logits, causal_lm_loss(logits, labels) if labels is not None else None

    def decode_step(self, input_ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, V] for one new token per row, written at cache slot `input_pos` ([1] tensor).

        The same shapes at every step (the whole cache is attended, later slots masked) and no Python
        state read, so `torch.compile` with CUDA graphs captures it once (generate.compiled_decode_step). For
        batches without padding; the caller advances `cache.length`.
        """
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(input_pos.expand(x.shape[0], 1), self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        mask = (torch.arange(cache.max_len, device=x.device) <= input_pos)[None, None, None]  # [1, 1, 1, max_len]
        for block in self.layers:
            x = block(x, cos, sin, mask, cache, input_pos)
        return self.head(x)[0][:, -1]
