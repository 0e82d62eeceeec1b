"""Training FLOPs per token, for the MFU the training loop logs and tools/bench.py prints."""


def count_params(module, embeddings: bool = False) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if embeddings or "embed" not in n)


def llava_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per sequence token, from what trains (call it after `freeze_for_stage`): 6N for a trained
    weight (2N forward, 2N for its gradient, 2N for its input's), 4N for a frozen LLM weight that gradients
    pass through (stage 1, and the base under LoRA), 4N for the projector (CLIP below it needs no gradient),
    2N for CLIP; attention, which has no weights, 12·L·d·T in both stages. Visual tokens are a fraction of T."""
    llm, cfg = model.language_model, model.cfg.text
    image_share = min(1.0, model.num_image_tokens / seq_len)
    weights = sum(p.numel() * (6 if p.requires_grad else 4) for n, p in llm.named_parameters() if "embed" not in n)
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len
    vision = (2 * count_params(model.vision_tower) + 4 * count_params(model.projector)) * image_share
    return weights + attention + vision
