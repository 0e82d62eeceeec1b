"""Eq. 3 in numbers: one record's loss recomputed from the model's own logits.

    python -m llava_min.tools.inspect loss --model DIR --data DATA.json --id ID --image-folder IMAGES

Eq. 3 is the likelihood of the answer, p(X_a | X_v, X_instruct) = prod_i p(x_i | X_v, X_instruct,<i, X_a,<i),
over the tokens Table 2 marks. Training minimizes its negative log, divided by the number of those tokens:
the mean of -log p over the supervised tokens. Here that mean is computed by hand (a softmax over each
position's logits, the target's probability) and set beside the loss the model returns.
"""
from pathlib import Path

from ..files import InputError


def add_parser(sub) -> None:
    p = sub.add_parser("loss", help="Eq. 3: one record's -mean log p, by hand, beside the model's loss")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="a LLaVA-format JSON / JSONL file")
    p.add_argument("--index", type=int, help="the record's position in --data")
    p.add_argument("--id", help="the record's id in --data")
    p.add_argument("--image-folder", type=Path)
    p.add_argument("--template", help="default: the model's")
    p.set_defaults(show=run)


def record_tensors(model, tok, record, template: str, image_folder) -> tuple:
    """(input_ids [1, T], labels [1, T], pixel_values or None) as the training data pipeline builds them."""
    import torch

    from ..conversation import tokenize_conversation
    from ..data.image import ImageSettings, image_input, load_image
    image = load_image(record["image"], image_folder=image_folder) if record.get("image") else None
    count = model.image_token_count((image.height, image.width)) if image is not None else 0
    ids, labels = tokenize_conversation(record["conversations"], tok, template, count, model.cfg.image_token_id,
                                        has_image=image is not None)
    pixels = None
    if image is not None:
        pixels = image_input(image, ImageSettings.of(model.cfg)).pixel_values
    return torch.tensor([ids]), torch.tensor([labels]), pixels, image


def by_hand(logits, labels) -> tuple:
    """(positions, target ids, p(target)) of the supervised tokens: the logits at position i predict token i+1."""
    import torch

    from ..conversation import IGNORE_INDEX
    targets = labels[0, 1:]
    where = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    probs = torch.softmax(logits[0, :-1][where].double(), dim=-1)
    return where + 1, targets[where], probs.gather(1, targets[where, None]).squeeze(1)


def run(args) -> None:
    import torch

    from ..checkpoint.peft import load_model
    from ..conversation import check_template
    from ..tokenizer import Tokenizer
    from .labels_view import token_texts
    from .records import pick_record
    if (args.index is None) == (args.id is None):
        raise InputError("give one of --index N or --id ID")
    record = pick_record(args.data, args.index, args.id)
    if not args.model.is_dir():
        raise InputError(f"model directory {args.model} does not exist")
    model = load_model(args.model, dtype=torch.float32)
    tok = Tokenizer(args.model / "tokenizer.model")
    template = check_template(args.template or model.cfg.template)
    ids, labels, pixels, image = record_tensors(model, tok, record, template, args.image_folder)
    with torch.no_grad():
        logits, loss = model(ids, pixel_values=pixels, labels=labels,
                             image_sizes=[(image.height, image.width)] if model.anyres and image else None)
    positions, targets, p = by_hand(logits, labels)
    nll = -p.log()
    n_image = int((ids == model.cfg.image_token_id).sum())
    print(f"record {record.get('id', args.index)} ({template}): {ids.shape[1]} tokens, {n_image} of them the "
          f"image's; {len(targets)} supervised (Table 2)")
    print(f"{'position':>8}  {'token':<16}{'p(token)':>10}{'-log p':>9}")
    for pos, piece, prob, v in zip(positions.tolist(), token_texts(tok, targets.tolist()), p.tolist(), nll.tolist()):
        print(f"{pos:>8}  {piece!r:<16}{prob:>10.4f}{v:>9.4f}")
    print(f"Eq. 3, the answer's likelihood: the product of the {len(p)} p's = exp(-{nll.sum():.4f}) = "
          f"{torch.exp(-nll.sum()):.3g}")
    print(f"-log of it / {len(p)} (the mean of -log p), by hand here: {nll.mean():.6f}")
    print(f"the loss the model returns (causal_lm_loss):            {loss.item():.6f}")
