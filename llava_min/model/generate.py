"""Autoregressive decoding with a KV cache: greedy, or temperature + top-p (nucleus) sampling.

The loop is the paper's (`generate`): prefill the prompt and its image, then sample one token, append it,
and feed it back, until every row has ended. Beside it, as gpt-fast does, the compiled step
(`CompiledStep`): the same step with static shapes, replayed as a CUDA graph. Works for any model whose
forward is `logits, _ = model(input_ids, attention_mask=..., cache=...)` (`Llama` and `Llava`). Batches
are left-padded, so every row's next token sits in the last column.
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


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, attention_mask=None, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: Union[int, Sequence[int]] = 2, generator=None, cache=None,
             on_token: Optional[Callable[[torch.Tensor], None]] = None, compile: bool = False,
             stop: Optional[Callable[[list], bool]] = None, **model_kwargs) -> torch.Tensor:
    """New token ids [B, n <= max_new_tokens]; a row that has ended repeats `eos_id` (the first, when a
    config lists several end tokens).

    Pass `cache` (from `model.new_cache`) to continue a conversation: only `input_ids` (the new tokens)
    are prefilled and the cache keeps everything for the next call. `on_token` sees each step's tokens
    [B] as they come (for streaming). `stop(row_ids)`, if given, sees each row's new tokens after every
    step; True ends the row (a template's text end marker). `compile=True` decodes every token after the
    first through `CompiledStep` (batches without padding; others decode eagerly).
    """
    attention_mask, cache, compiled = setup(model, input_ids.shape, max_new_tokens, attention_mask, cache, compile)
    logits, _ = model(input_ids, attention_mask=attention_mask, cache=cache, **model_kwargs)  # prefill
    prefilled = cache.length
    step = CompiledStep(model, cache) if compiled else EagerStep(model, cache, attention_mask)
    ends = Ends(eos_id, stop, len(input_ids), input_ids.device, lazy=compiled and on_token is None)
    last, new = logits[:, -1], []
    for i in range(max_new_tokens):  # sample one token per row, append it, feed it back
        token = ends.after_the_end(sample(last, temperature, top_p, generator))
        new.append(token)
        if on_token is not None:
            on_token(token)
        if ends.all_ended(token, i) or i == max_new_tokens - 1:
            break
        last = step(token)
    tokens = until_all_finished(torch.stack(new, dim=1), ends.eos)
    cache.length = prefilled + tokens.shape[1] - 1  # the last token is never fed (steps past it are dropped)
    return tokens


class EagerStep:
    """One token per row through the model, its keys and values appended to the cache; the next logits."""

    def __init__(self, model, cache, attention_mask: Optional[torch.Tensor]):
        self.model, self.cache, self.attention_mask = model, cache, attention_mask

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        if self.attention_mask is not None:  # left padding: every row's new token is real
            self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(len(token), 1)], dim=1)
        return self.model(token[:, None], attention_mask=self.attention_mask, cache=self.cache)[0][:, -1]


# ---------------------------------------------------------------- the compiled step (gpt-fast's recipe)

class CompiledStep:
    """`EagerStep` with static shapes: the token goes to cache slot `input_pos` (a [1] tensor on the
    device, advanced in place: no host-to-device copy, which would wait for the GPU), attending over the
    whole preallocated cache with a mask (`Llama.decode_step`), through `compiled_decode_step`."""

    def __init__(self, model, cache):
        for t in cache.k + cache.v:  # fixed addresses: the CUDA graph writes the cache in place, no copy in
            torch._dynamo.mark_static_address(t)
        self.model, self.cache = model, cache
        self.input_pos = torch.tensor([cache.length], device=cache.k[0].device)

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        if self.cache.length >= self.cache.max_len:  # checked here: an out-of-range slot would fault in the graph
            raise ValueError(f"KV cache holds {self.cache.max_len} tokens; this step needs {self.cache.length + 1}")
        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed: the graph may reuse them
        last = compiled_decode_step(self.model)(token[:, None], self.input_pos, self.cache).clone()
        self.cache.length += 1
        self.input_pos += 1
        return last


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


# ---------------------------------------------------------------- the loop's bookkeeping

class Ends:
    """Which rows have ended: on an end token (any of `eos_id`), or when `stop(row_ids)` says so.

    Reading `finished` waits for the GPU. `lazy` (the compiled path, when nobody streams the tokens)
    looks every 16 steps instead, so the CPU queues the next graphs while the GPU runs (no idle gap
    between tokens); the tokens past the end are cut off afterwards (`until_all_finished`)."""

    def __init__(self, eos_id, stop, batch_size: int, device, lazy: bool = False):
        self.eos = torch.tensor(eos_id, device=device).reshape(-1)  # for isin, on the device
        self.fill = eos_id if isinstance(eos_id, int) else eos_id[0]  # on the host: no wait for the GPU per token
        self.finished = torch.zeros(batch_size, dtype=torch.bool, device=device)
        self.stop, self.rows = stop, [[] for _ in range(batch_size)]
        self.look_every = 16 if lazy and stop is None else 1  # `stop` reads every token on the host anyway

    def after_the_end(self, token: torch.Tensor) -> torch.Tensor:
        """A row that has ended repeats the end token."""
        return token.masked_fill(self.finished, self.fill)

    def all_ended(self, token: torch.Tensor, step: int) -> bool:
        self.finished |= torch.isin(token, self.eos)
        if self.stop is not None:
            for row, t in zip(self.rows, token.tolist()):
                row.append(t)
            self.finished |= torch.tensor([self.stop(row) for row in self.rows], device=self.finished.device)
        return step % self.look_every == self.look_every - 1 and bool(self.finished.all())


def until_all_finished(tokens: torch.Tensor, eos: torch.Tensor) -> torch.Tensor:
    """Cuts [B, n] tokens after the first column where every row has ended (finished rows repeat eos)."""
    done = torch.isin(tokens, eos).all(dim=0).nonzero()
    return tokens[:, : int(done[0]) + 1] if len(done) else tokens


def setup(model, shape: tuple, max_new_tokens: int, attention_mask, cache, compile: bool) -> tuple:
    """(attention_mask, cache, compiled): the mask, None when nothing is padded (then no mask tensors at
    every step); the given cache (a conversation goes on), else a new one, the static one for the compiled
    step; whether that step decodes (batches without padding, more than one token)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # one check, not one per step
    compiled = compile and attention_mask is None and max_new_tokens > 1
    B, T = shape
    if cache is None:
        cache = static_cache(model, B, T + max_new_tokens) if compiled else model.new_cache(B, T + max_new_tokens)
    if attention_mask is not None and cache.length:
        raise ValueError("left-padded batches start from an empty cache")
    return attention_mask, cache, compiled
