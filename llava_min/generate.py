"""Autoregressive decoding with a KV cache: greedy, or temperature + top-p (nucleus) sampling.

Works for any model whose forward is `logits, _ = model(input_ids, attention_mask=..., cache=...)`
(`Llama` and `Llava`). Batches are left-padded, so every row's next token sits in the last column.
"""
from typing import Callable, Optional

import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always survives)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, attention_mask=None, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: int = 2, generator=None, cache=None,
             on_token: Optional[Callable[[torch.Tensor], None]] = None, **model_kwargs) -> torch.Tensor:
    """New token ids [B, n <= max_new_tokens]; a row that has finished repeats `eos_id`.

    Pass `cache` (from `model.new_cache`) to continue a conversation: only `input_ids` (the new
    tokens) are prefilled and the cache keeps everything for the next call. `on_token` sees each
    step's tokens [B] as they come (for streaming).
    """
    B, T = input_ids.shape
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: skip mask tensors for every step (one check, not one per step)
    if cache is None:
        cache = model.new_cache(B, T + max_new_tokens)
    if attention_mask is not None and cache.length:
        raise ValueError("left-padded batches start from an empty cache")
    logits, _ = model(input_ids, attention_mask=attention_mask, cache=cache, **model_kwargs)
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out = []
    for step in range(max_new_tokens):
        token = sample(logits[:, -1], temperature, top_p, generator)
        token = token.masked_fill(finished, eos_id)
        out.append(token)
        if on_token is not None:
            on_token(token)
        finished |= token == eos_id
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
        logits, _ = model(token[:, None], attention_mask=attention_mask, cache=cache)
    return torch.stack(out, dim=1)
