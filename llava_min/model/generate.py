"""Autoregressive decoding with a KV cache: greedy, or temperature + top-p (nucleus) sampling.

Works for any model whose forward is `logits, _ = model(input_ids, attention_mask=..., cache=...)`
(`Llama` and `Llava`). Batches are left-padded, so every row's next token sits in the last column.
"""
from typing import Callable, Optional, Sequence, Union

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
        drop[..., 0] = False  # top_p = 0 too: greedy
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def compiled_decode_step(model) -> Callable:
    """`model.decode_step` compiled once per model: fused kernels, and on CUDA one graph replay per
    token instead of hundreds of kernel launches from Python (gpt-fast's recipe; docs/performance.md)."""
    if getattr(model, "_compiled_decode_step", None) is None:
        options = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}  # "reduce-overhead" + tuning
        model._compiled_decode_step = torch.compile(model.decode_step, options=options, fullgraph=True,
                                                    dynamic=False)
    return model._compiled_decode_step


def static_cache(model, batch_size: int, length: int, multiple: int = 256):
    """A KV cache kept on the model and reused across calls, its length rounded up to `multiple`:
    the compiled step guards on the cache's identity and shape, so reuse avoids recompiling."""
    max_len = -(-length // multiple) * multiple
    cache = getattr(model, "_static_cache", None)
    if cache is None or cache.batch_size != batch_size or cache.max_len != max_len:
        model._static_cache = None  # let the old buffers go before the new ones are allocated
        cache = model._static_cache = model.new_cache(batch_size, max_len)
    cache.length = 0  # the mask hides every slot past the current one: no need to clear old contents
    return cache


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, attention_mask=None, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: Union[int, Sequence[int]] = 2, generator=None, cache=None,
             on_token: Optional[Callable[[torch.Tensor], None]] = None, compile: bool = False,
             stop: Optional[Callable[[list], bool]] = None, **model_kwargs) -> torch.Tensor:
    """New token ids [B, n <= max_new_tokens]; a row that has finished repeats `eos_id` (the first, when
    a config lists several end tokens).

    Pass `cache` (from `model.new_cache`) to continue a conversation: only `input_ids` (the new
    tokens) are prefilled and the cache keeps everything for the next call. `on_token` sees each
    step's tokens [B] as they come (for streaming). `compile=True` runs every token after the first
    through `compiled_decode_step` (batches without padding; others decode eagerly). `stop(row_ids)`, if
    given, sees each row's new tokens after every step; True ends the row (a template's text end marker).
    """
    B, T = input_ids.shape
    eos = torch.tensor(eos_id, device=input_ids.device).reshape(-1)  # for isin, on the device
    fill = eos_id if isinstance(eos_id, int) else eos_id[0]  # on the host: no wait for the GPU per token
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: skip mask tensors for every step (one check, not one per step)
    compiled = compile and attention_mask is None and max_new_tokens > 1
    if cache is None:
        cache = static_cache(model, B, T + max_new_tokens) if compiled else model.new_cache(B, T + max_new_tokens)
    if compiled:  # fixed addresses: the CUDA graph writes the cache in place instead of copying it in
        for t in cache.k + cache.v:
            torch._dynamo.mark_static_address(t)
    if attention_mask is not None and cache.length:
        raise ValueError("left-padded batches start from an empty cache")
    logits, _ = model(input_ids, attention_mask=attention_mask, cache=cache, **model_kwargs)
    prefilled = cache.length
    input_pos = torch.tensor([prefilled], device=input_ids.device) if compiled else None
    # Reading `finished` waits for the GPU. The compiled path, when nobody streams the tokens, looks every
    # 16 steps instead, so the CPU queues the next graphs while the GPU runs (no idle gap between tokens).
    check_every = 16 if compiled and on_token is None and stop is None else 1
    last = logits[:, -1]
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    out, rows = [], [[] for _ in range(B)]  # rows: each row's tokens so far, for `stop`
    for step in range(max_new_tokens):
        token = sample(last, temperature, top_p, generator)
        token = token.masked_fill(finished, fill)
        out.append(token)
        if on_token is not None:
            on_token(token)
        finished |= torch.isin(token, eos)
        if stop is not None:
            for row, t in zip(rows, token.tolist()):
                row.append(t)
            finished |= torch.tensor([stop(row) for row in rows], device=finished.device)
        if step == max_new_tokens - 1 or (step % check_every == check_every - 1 and bool(finished.all())):
            break
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
        if compiled:
            last = decode_compiled(model, token, cache, input_pos)
        else:
            last = model(token[:, None], attention_mask=attention_mask, cache=cache)[0][:, -1]
    tokens = until_all_finished(torch.stack(out, dim=1), eos)
    cache.length = prefilled + tokens.shape[1] - 1  # the last token is never fed (steps past it are dropped)
    return tokens


def until_all_finished(tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Cuts [B, n] tokens after the first column where every row has ended (finished rows repeat eos)."""
    done = torch.isin(tokens, eos).all(dim=0).nonzero()
    return tokens[:, : int(done[0]) + 1] if len(done) else tokens


def decode_compiled(model, token: torch.Tensor, cache, input_pos: torch.Tensor) -> torch.Tensor:
    """One compiled step at slot `input_pos` (a [1] tensor on the device, advanced here in place: no
    host-to-device copy, which would wait for the GPU)."""
    if cache.length >= cache.max_len:  # checked here: an out-of-range slot would fault inside the graph
        raise ValueError(f"KV cache holds {cache.max_len} tokens; this step needs {cache.length + 1}")
    torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed: the graph may reuse them
    last = compiled_decode_step(model)(token[:, None], input_pos, cache).clone()
    cache.length += 1
    input_pos += 1
    return last
