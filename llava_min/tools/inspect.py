"""Look inside LLaVA: what is supervised, the shapes through Fig. 1, where an answer looks in the image.

    python -m llava_min.tools.inspect labels --data DATA.json --index 0 --tokenizer tokenizer.model
    python -m llava_min.tools.inspect labels --conversation '[{"from": "human", "value": "<image>\\nHi"},
                                                             {"from": "gpt", "value": "Hello."}]' --model DIR
    python -m llava_min.tools.inspect shapes --model DIR --image IMG
    python -m llava_min.tools.inspect attention --model DIR --image IMG --question "What color is the circle?"

labels: one record (or an inline conversation) tokenized under a template, every token marked by what
Eq. 3 does with it (supervised or masked), the image's tokens folded into one run; counts at the end.
shapes: the tensors of one forward pass, image to logits. attention: the greedy answer, and a PNG of
how much its tokens attend to each visual token (mean over heads and layers, or --layer).
"""
import argparse
import json
import sys
from pathlib import Path

from ..cli import device, positive
from ..errors import DataError, InputError
from . import anyres_view, chat_view, loss_view, scoring_view, square_view, stages_view, teacher_view
from .records import pick_record

VIEWS = (teacher_view, stages_view, loss_view, chat_view, scoring_view, square_view, anyres_view)  # the guide's

DEFAULT_IMAGE_TOKENS = 576  # LLaVA-1.5: 336 px / patch 14 = 24 x 24


# ---------------------------------------------------------------- records

def chosen_record(args):
    """The record --data/--index/--id or --conversation name, or None."""
    if getattr(args, "conversation", None) is not None:
        try:
            value = json.loads(args.conversation)
        except json.JSONDecodeError as e:
            raise InputError(f"--conversation is not JSON: {e}") from e
        record = value if isinstance(value, dict) else {"conversations": value}
        if not isinstance(record.get("conversations"), list):
            raise InputError("--conversation is neither a list of turns nor a record with 'conversations'")
        return record
    if args.data is None:
        return None
    if args.index is None and args.id is None:
        raise InputError("--data needs --index N or --id ID")
    return pick_record(args.data, args.index, args.id)


def record_image(record, image_folder):
    from ..data.image import load_image
    if not record.get("image"):
        raise InputError(f"record {record['id']!r} has no image" if record.get("id") else "the record has no image")
    return load_image(record["image"], image_folder=image_folder)


# ---------------------------------------------------------------- labels

def labels_settings(args, record) -> tuple:
    """(tokenizer, template, image_token_id, num_image_tokens) from the flags and the --model config."""
    from ..checkpoint.configs import llava_hf_config, read_config
    from ..checkpoint.official import stage1_projector_file
    from ..tokenizer import Tokenizer
    cfg = None
    if args.model is not None:
        raw = read_config(args.model)
        if stage1_projector_file(args.model):  # a stage-1 directory: its plain template, CLIP's patches
            cfg = stages_view.stage1_config(args.model, raw)
        elif raw.get("model_type") not in ("llava", "llava_next"):
            raise InputError(f"{args.model}: labels reads llava-hf configs and stage-1 directories; for this layout "
                             "pass --tokenizer and --num-image-tokens")
        else:
            cfg = llava_hf_config(raw)
    tok_path = args.tokenizer or (args.model / "tokenizer.model" if args.model else None)
    if tok_path is None:
        raise InputError("give --tokenizer or --model (its tokenizer.model)")
    tok = Tokenizer(tok_path)
    template = args.template or (cfg.template if cfg else "vicuna_v1")
    image_token_id = cfg.image_token_id if cfg else -200
    count = args.num_image_tokens
    if count is None and cfg is not None:
        from ..data.image import ImageSettings, image_input
        settings = ImageSettings.of(cfg)
        count = settings.view_tokens
        if settings.anyres and record.get("image"):  # AnyRes: the count depends on the image's size
            count = image_input(record_image(record, args.image_folder), settings).num_tokens
    return tok, template, image_token_id, DEFAULT_IMAGE_TOKENS if count is None else count


def run_labels(args) -> None:
    from ..conversation import tokenize_conversation
    from ..data.dataset import check_record, truncate
    from . import labels_view as view
    record = chosen_record(args)
    if record is None:
        raise InputError("give --data F with --index N or --id ID, or --conversation JSON")
    tok, template, image_token_id, count = labels_settings(args, record)
    if "image" in record or args.data is not None:
        check_record(record, template)
    has_image = bool(record.get("image")) if "image" in record else None
    ids, labels = tokenize_conversation(record["conversations"], tok, template, count, image_token_id, has_image)
    try:
        truncate(ids, labels, args.max_length, image_token_id)
        skip = None
    except DataError as e:  # shown as the record's skip reason, as training would skip it
        skip = str(e)
    texts = view.token_texts(tok, ids)
    summary = [f"template {template}"] + view.counts(ids, labels, image_token_id, args.max_length, skip)
    if args.html:
        title = f"labels of {record.get('id', 'a conversation')} ({template})"
        args.html.write_text(view.render_html(tok, ids, labels, texts, image_token_id, args.max_length, title,
                                              summary), encoding="utf-8")
        print(f"wrote {args.html}")
    color = not args.plain and (args.color if args.color is not None else sys.stdout.isatty())
    render = view.render_ansi if color else view.render_plain
    print(render(ids, labels, texts, image_token_id, args.max_length))
    print("\n".join(summary))


# ---------------------------------------------------------------- shapes and attention

def model_and_image(args):
    """The model of --model, the image of --image (or of the chosen record), and that image as the model
    takes it (data.image.ImageInput, its pixels on --device)."""
    import dataclasses

    import torch

    from ..checkpoint.peft import load_model
    from ..data.image import ImageSettings, image_input, load_image
    record = chosen_record(args)
    if args.image is None and record is None:
        raise InputError("give --image IMG, or --data F with --index N or --id ID")
    image = load_image(args.image) if args.image is not None else record_image(record, args.image_folder)
    if not args.model.is_dir():
        raise InputError(f"model directory {args.model} does not exist")
    model = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)  # an adapter: on its base
    view = image_input(image, ImageSettings.of(model.cfg))
    return model, image, dataclasses.replace(view, pixel_values=view.pixel_values.to(args.device)), record


def prompt_ids(model, tok, question: str, view) -> list:
    """The question about the image (`view`, an ImageInput) in the model's template, the assistant's turn open."""
    from ..conversation import tokenize_prompt
    return tokenize_prompt([{"from": "human", "value": "<image>\n" + question}], tok, model.cfg.template,
                           num_image_tokens=view.num_tokens, image_token_id=model.cfg.image_token_id)


def question_of(args, record) -> str:
    if args.question is not None:
        return args.question
    if record is not None:
        from ..conversation import check_turns
        return check_turns(record.get("conversations"))[0][1].replace("<image>", "").strip()
    return "Describe the image."


def run_shapes(args) -> None:
    import torch

    from . import shapes_view as view
    model, image, given, record = model_and_image(args)
    ids = torch.tensor([prompt_ids(model, tokenizer_of(args.model), question_of(args, record), given)],
                       device=args.device)
    seen = view.trace(model, ids, given.pixel_values, [given.size])
    print(view.format_table(view.rows(model, image, seen, ids, given.pixel_values)))


def tokenizer_of(model_dir):
    from ..tokenizer import Tokenizer
    return Tokenizer(model_dir / "tokenizer.model")


def expected_answer(record):
    """The record's reference answer, if it has one."""
    if record is None:
        return None
    turns = record.get("conversations", [])
    return record.get("answer") or (turns[1]["value"] if len(turns) > 1 else None)


def run_attention(args) -> None:
    import numpy as np

    from . import attention_map, heatmap
    model, image, given, record = model_and_image(args)
    tok, question = tokenizer_of(args.model), question_of(args, record)
    layers = model.cfg.text.num_hidden_layers
    if args.layer is not None and not -layers <= args.layer < layers:
        raise InputError(f"--layer {args.layer} is outside the model's {layers} layers (0..{layers - 1})")
    answer, amap = attention_map.answer_attention(model, tok, prompt_ids(model, tok, question, given),
                                                  given.pixel_values, [given.size], args.max_new_tokens)
    cells = amap.cells(args.layer).numpy().astype(np.float64)
    views, notes = heatmap.panels(model, image, cells)
    which = f"layer {args.layer % layers}" if args.layer is not None else f"mean of {layers} layers"
    text = tok.decode(answer).strip()
    expected = expected_answer(record)
    caption = [f"Q: {question}", f"A: {text}" + (f"   (expected: {expected})" if expected else ""),
               f"{which}, mean of {model.cfg.text.num_attention_heads} heads and {len(answer)} answer "
               f"token{'s' * (len(answer) != 1)}; "
               f"image's share of attention {cells.sum():.1%}, largest cell {cells.max():.1%}"] + notes
    heatmap.figure(views, max(float(cells.max()), 1e-9), caption).save(args.out)
    print("\n".join(caption))
    if len(cells) <= 100:  # small grids in numbers too
        for name, (_, grid) in zip(["global view", "tiles"] if model.anyres else ["image"], views):
            print(f"{name}:\n" + "\n".join("  ".join("   .  " if np.isnan(v) else f"{v:6.1%}" for v in row)
                                            for row in grid))
    print(f"wrote {args.out}")


# ---------------------------------------------------------------- the command line

def add_record_flags(p, image: bool) -> None:
    p.add_argument("--data", type=Path, help="a LLaVA-format JSON / JSONL file")
    p.add_argument("--index", type=positive(int, zero_ok=True), help="the record's position in --data (from 0)")
    p.add_argument("--id", help="the record's id in --data")
    p.add_argument("--image-folder", type=Path, help="where the records' image paths start")
    if image:
        p.add_argument("--image", type=Path, help="an image file (instead of a record's)")
        p.add_argument("--question", help="default: the record's first question, else 'Describe the image.'")
        p.add_argument("--model", type=Path, required=True, help="any layout llava_min.load reads")
        p.add_argument("--device", type=device, default="cpu")
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                       help="the weights' (attention weights are recomputed in float32 either way)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m llava_min.tools.inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="view", required=True)
    labels = sub.add_parser("labels", help="what is supervised, token by token")
    add_record_flags(labels, image=False)
    labels.add_argument("--conversation", help="a JSON list of turns (or a record) instead of --data")
    labels.add_argument("--model", type=Path, help="a llava-hf directory: its tokenizer, template, image tokens")
    labels.add_argument("--tokenizer", type=Path, help="a sentencepiece tokenizer.model")
    labels.add_argument("--template", help="default: the model's, else vicuna_v1")
    labels.add_argument("--num-image-tokens", type=int, help=f"default: the model's, else {DEFAULT_IMAGE_TOKENS}")
    labels.add_argument("--max-length", type=int, default=2048, help="training's cut (default 2048)")
    labels.add_argument("--plain", action="store_true", help="supervised runs in [brackets], no colour")
    labels.add_argument("--color", action=argparse.BooleanOptionalAction, help="ANSI colours (default: on a terminal)")
    labels.add_argument("--html", type=Path, help="also write a self-contained HTML page here")
    shapes = sub.add_parser("shapes", help="the tensors along Fig. 1")
    add_record_flags(shapes, image=True)
    attention = sub.add_parser("attention", help="a heatmap of the answer's attention on the image")
    add_record_flags(attention, image=True)
    attention.add_argument("--layer", type=int, help="one LLM layer (default: the mean over all)")
    attention.add_argument("--out", type=Path, default=Path("attention.png"))
    attention.add_argument("--max-new-tokens", type=int, default=32)
    for view in VIEWS:
        view.add_parser(sub)
    args = p.parse_args(argv)
    for flag in ("num_image_tokens", "max_length", "max_new_tokens"):
        if getattr(args, flag, 1) is not None and getattr(args, flag, 1) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    run = getattr(args, "show", None) or {"labels": run_labels, "shapes": run_shapes,
                                          "attention": run_attention}[args.view]
    try:
        run(args)
    except InputError as e:  # bad input, named (CheckpointError, ImageError and DataError are InputErrors)
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    from ..cli import run
    run(main)
