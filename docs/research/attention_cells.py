"""Does the answer attend to the object the question names? (docs/inspect.md, "The toy's attention")

The toy world puts each object in one cell of a 3 x 3 grid, and the toy CLIP cuts its 96 px images into
3 x 3 patches of 32 px: visual token row * 3 + col sees exactly that cell. For every held-out short
colour or shape question on an image with 3 or more objects that names exactly one of them, this takes
the greedy answer and the attention map of `python -m llava_min.tools.inspect attention` (per layer and
the mean over layers), and counts how often the map's largest cell is the named object's cell, or any
object's cell, for right and for wrong answers.

    PYTHONPATH=. python docs/research/attention_cells.py runs/toy/full/stage2 data/toy
"""
import argparse
import json
from pathlib import Path

import torch

from llava_min import load
from llava_min.conversation import tokenize_prompt
from llava_min.data.image import ImageSettings, image_input, load_image
from llava_min.tokenizer import Tokenizer
from llava_min.tools.attention_map import answer_attention


def named_object(record: dict, objects: list):
    """The one object the question names (by its shape for a colour question, by its colour otherwise)."""
    question = record["conversations"][0]["value"].split("\n")[1].rstrip("?")
    key = "shape" if record["question_type"] == "color" else "color"
    named = [o for o in objects if o[key] in question.split()]
    return named[0] if len(named) == 1 else None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("data", type=Path, help="the toy world's directory (eval.json, scenes.json, images/)")
    args = p.parse_args()
    scenes = {s["image"]: s["objects"] for s in json.loads((args.data / "scenes.json").read_text())}
    model, tok = load(args.model, dtype=torch.float32), Tokenizer(args.model / "tokenizer.model")
    layers = list(range(model.cfg.text.num_hidden_layers)) + [None]
    counts, occupied = {}, []  # (right, layer) -> [questions, top is the named object, top is an object]
    for record in json.loads((args.data / "eval.json").read_text()):
        if record.get("format") != "short" or record.get("question_type") not in ("color", "shape") or \
                len(scenes[record["image"]]) < 3 or named_object(record, scenes[record["image"]]) is None:
            continue
        objects = scenes[record["image"]]
        target = named_object(record, objects)
        view = image_input(load_image(record["image"], image_folder=args.data / "images"), ImageSettings.of(model.cfg))
        prompt = tokenize_prompt(record["conversations"][:1], tok, model.cfg.template,
                                 num_image_tokens=view.num_tokens, image_token_id=model.cfg.image_token_id)
        answer, amap = answer_attention(model, tok, prompt, view.pixel_values, max_new_tokens=8)
        right = tok.decode(answer).strip() == record["answer"]
        occupied.append(len({o["row"] * 3 + o["col"] for o in objects}))
        for layer in layers:
            top = int(amap.cells(layer).argmax())
            c = counts.setdefault((right, layer), [0, 0, 0])
            c[0] += 1
            c[1] += top == target["row"] * 3 + target["col"]
            c[2] += top in {o["row"] * 3 + o["col"] for o in objects}
    print(f"{'answers':<8}{'layer':<8}{'n':>4}{'top = named object':>20}{'top = any object':>18}")
    for (right, layer), (n, named, any_object) in sorted(counts.items(), key=lambda kv: (not kv[0][0], str(kv[0][1]))):
        print(f"{'right' if right else 'wrong':<8}{'mean' if layer is None else layer:<8}{n:>4}"
              f"{named / n:>20.0%}{any_object / n:>18.0%}")
    print(f"a cell drawn at random: the named object's 1/9 = 11%, an object's {sum(occupied) / 9 / len(occupied):.0%}; "
          f"an object drawn at random is the named one {sum(1 / k for k in occupied) / len(occupied):.0%} of the time")


if __name__ == "__main__":
    main()
