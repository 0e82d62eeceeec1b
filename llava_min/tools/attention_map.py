"""Where an answer looks in the image: the attention weights of the answer's tokens on the visual tokens.

The model's attention runs in SDPA, which never exposes its weights; the model is left as it is. Forward
hooks on each LLaMA attention layer take the layer's input and recompute, with the layer's own q_proj,
k_proj and rotary tables, A = softmax(q k^T / sqrt(d)) under the causal mask (LLaMA's eager attention in
transformers' modeling_llama.py), for the chosen query positions only.

Which queries: answer token j is produced by the position before it, so the query at position
len(prompt) - 1 + j is the one "looking" when token j is chosen. Each row of A sums to 1 over all keys
(text and image); the map is the mean over layers, heads and answer tokens of the columns of the image's
positions, so its cells are shares of attention and their sum is the share the image gets.
"""
import math
from dataclasses import dataclass

import torch

from ..model.llama import apply_rope
from ..files import InputError


class AttentionRecorder:
    """Hooks on every `Attention` of a `Llama`: `weights[layer]` = A [batch, heads, len(queries), T]."""

    def __init__(self, llm, queries: list):
        self.queries, self.weights, self.handles = list(queries), [], []
        for block in llm.layers:
            self.handles.append(block.self_attn.register_forward_hook(self.recompute))

    def recompute(self, attn, args, output) -> None:
        x, cos, sin, mask, cache = args[:5]
        if mask is not None or cache is not None:  # a single unpadded sequence, so the mask is causal alone
            raise ValueError("attention weights are recomputed for one unpadded sequence without a cache")
        B, T, _ = x.shape
        h, kv, d = attn.cfg.num_attention_heads, attn.cfg.num_key_value_heads, attn.cfg.head_dim
        rows = torch.tensor(self.queries, device=x.device)
        q = attn.q_proj(x[:, rows]).view(B, len(rows), h, d).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, kv, d).transpose(1, 2)
        q, k = apply_rope(q, cos[:, rows], sin[:, rows]), apply_rope(k, cos, sin)
        k = k.repeat_interleave(h // kv, dim=1)  # grouped keys: query head i reads key head i // (h / kv)
        scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(d)
        future = torch.arange(T, device=x.device)[None, :] > rows[:, None]
        self.weights.append(scores.masked_fill(future, float("-inf")).softmax(-1))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def record_attention(model, input_ids: torch.Tensor, queries: list, **model_kwargs) -> torch.Tensor:
    """A [layers, batch, heads, len(queries), T] for `input_ids` through `model` (a Llava or a Llama)."""
    llm = getattr(model, "language_model", model)
    recorder = AttentionRecorder(llm, queries)
    try:
        model(input_ids, **model_kwargs)
    finally:
        recorder.remove()
    return torch.stack(recorder.weights).cpu()


@dataclass
class AttentionMap:
    weights: torch.Tensor  # A [layers, heads, answer tokens, T]: each row sums to 1 over all T keys
    visual: torch.Tensor  # the positions of the visual tokens in the sequence

    def cells(self, layer=None) -> torch.Tensor:
        """One value per visual token: the mean over heads, answer tokens and layers (or one `layer`) of
        the weight on it. The sum is the share of attention the image gets."""
        w = self.weights if layer is None else self.weights[layer][None]
        return w[..., self.visual].mean(dim=(0, 1, 2))


def answer_length(tok, ids: list, end) -> int:
    """How many generated tokens make the answer: before EOS and the template's end marker."""
    from ..conversation import cut_at
    ids = ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids
    text = cut_at(tok.decode(ids), end).strip()
    return next((k for k in range(len(ids) + 1) if tok.decode(ids[:k]).strip() == text), len(ids))


@torch.no_grad()
def answer_attention(model, tok, prompt: list, pixel_values, image_sizes=None, max_new_tokens: int = 32) -> tuple:
    """The greedy answer to `prompt` (ids) and its AttentionMap."""
    from ..conversation import stop_at, stop_text
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    end = stop_text(model.cfg.template)
    budget = min(max_new_tokens, model.cfg.text.max_position_embeddings - len(prompt))
    if budget < 1:
        raise InputError(f"the prompt is {len(prompt)} tokens, the model's context is "
                         f"{model.cfg.text.max_position_embeddings}: no room for an answer")
    new = model.generate(ids, pixel_values=pixel_values, max_new_tokens=budget, image_sizes=image_sizes,
                         stop=stop_at(tok, end))[0].tolist()
    answer = new[: answer_length(tok, new, end)]
    if not answer:
        raise InputError(f"the model's answer is empty (it produced {new!r}): no answer token to map")
    sequence = torch.tensor([prompt + answer[:-1]], device=device)  # the last answer token is never a query
    queries = list(range(len(prompt) - 1, len(prompt) - 1 + len(answer)))
    weights = record_attention(model, sequence, queries, pixel_values=pixel_values, image_sizes=image_sizes)
    visual = (sequence[0] == model.cfg.image_token_id).nonzero().flatten()
    return answer, AttentionMap(weights[:, 0], visual.cpu())
