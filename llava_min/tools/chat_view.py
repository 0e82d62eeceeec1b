"""A multi-turn chat about one image with the KV cache kept between turns: what each turn prefills.

    python -m llava_min.tools.inspect chat --model DIR --image IMG --question Q1 --question Q2 ...

Each turn tokenizes the whole conversation again (the template renders it so), finds how much of it the
cache already holds (the image and every earlier turn) and prefills only the rest, as chat.py does; the
answers are greedy.
"""
from pathlib import Path

from ..files import InputError


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="turns of a chat: tokens prefilled per turn with the KV cache reused")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--question", action="append", required=True, help="one per turn; repeat for more turns")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(show=run)


def cached_prefix(cached: list, ids: list) -> int:
    """How many leading ids the cache already holds (at least one id is left to feed)."""
    k = next((n for n, (a, b) in enumerate(zip(cached, ids)) if a != b), min(len(cached), len(ids)))
    return min(k, len(ids) - 1)


def turns(model, tok, pixels, image_size: tuple, questions: list, max_new_tokens: int):
    """Yields (question, reply, conversation tokens, tokens from the cache, image tokens prefilled, generated)."""
    import torch

    from ..conversation import cut_at, stop_at, stop_text, tokenize_prompt
    from ..eval.answer import decode_until_eos
    from ..model.generate import generate
    cfg, end = model.cfg, stop_text(model.cfg.template)
    context = cfg.text.max_position_embeddings
    cache, cached, conversation = model.new_cache(1, context), [], []
    for question in questions:
        conversation.append({"from": "human", "value": ("<image>\n" if not conversation else "") + question})
        ids = tokenize_prompt(conversation, tok, cfg.template, num_image_tokens=model.image_token_count(image_size),
                              image_token_id=cfg.image_token_id)
        if len(ids) >= context:
            raise InputError(f"turn {len(conversation) // 2 + 1} makes the conversation {len(ids)} tokens, past the "
                             f"model's context of {context}")
        k = cache.length = cached_prefix(cached, ids)
        new = torch.tensor([ids[k:]])
        images = int((new == cfg.image_token_id).sum())
        out = generate(model, new, min(max_new_tokens, context - len(ids)), eos_id=cfg.text.eos_token_id,
                       cache=cache, stop=stop_at(tok, end), pixel_values=pixels if images else None,
                       image_sizes=[image_size] if images and model.anyres else None)[0].tolist()
        reply = cut_at(decode_until_eos(tok, out), end).strip()
        cached = ids + out[:-1]  # the last generated token was never fed back
        conversation.append({"from": "gpt", "value": reply})
        yield question, reply, len(ids), k, images, len(out)


def run(args) -> None:
    import torch

    from ..checkpoint.peft import load_model
    from ..data.image import ImageSettings, image_input, load_image
    from ..tokenizer import Tokenizer
    image = load_image(args.image)
    if not args.model.is_dir():
        raise InputError(f"model directory {args.model} does not exist")
    model = load_model(args.model, dtype=torch.float32)
    pixels = image_input(image, ImageSettings.of(model.cfg)).pixel_values
    size, tok = (image.height, image.width), Tokenizer(args.model / "tokenizer.model")
    for n, (question, reply, total, cached, images, generated) in enumerate(
            turns(model, tok, pixels, size, args.question, args.max_new_tokens), 1):
        print(f"turn {n}  USER: {question}\n        ASSISTANT: {reply}")
        print(f"        {total} tokens of conversation: {cached} from the KV cache, {total - cached} prefilled"
              f" ({images} of them the image's), then {generated} generated")
