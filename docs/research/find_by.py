"""Which attribute the toy model finds an object by (docs/toy.md, "Where it fails").

1. Answers by the number of objects in the image, for the questions that find an object by its shape
   (colour, position) or by its colour (shape), against the chance of naming a random object's value.
2. The share of the visual tokens' variance that each attribute explains at object cells (R^2 of the
   class means): at CLIP's selected layer, at the projector's output (the LLM's input) and at the
   LLM's first-layer keys.

    PYTHONPATH=. python docs/research/find_by.py runs/toy/full/stage2 data/toy
"""
import argparse
import json
from collections import defaultdict
from pathlib import Path


import torch

import llava_min
from llava_min.eval.score import evaluate, is_correct
from llava_min.data.image import load_image, preprocess
from llava_min.tokenizer import Tokenizer

ATTRIBUTES = ("color", "shape", "size", "position")
FOUND_BY = {"color": "shape", "position": "shape", "shape": "color"}  # question type -> the key it names


def answers_by_object_count(model, tok, data: Path, scenes: dict) -> None:
    records = {r["id"]: r for r in json.loads((data / "eval.json").read_text())}
    predictions = evaluate(model, tok, data / "eval.json", data / "images")["predictions"]
    print("question   found by   right/asked by objects in the image   2-4 objects: accuracy, chance")
    for qtype, key in FOUND_BY.items():
        tally, right, chance, n = defaultdict(lambda: [0, 0]), 0, 0.0, 0
        for p in predictions:
            r = records[p["id"]]
            if r.get("format") != "short" or r["question_type"] != qtype:
                continue
            objects = scenes[r["image"]]["objects"]
            ok = is_correct(r, p["prediction"])
            tally[len(objects)][0] += ok
            tally[len(objects)][1] += 1
            if len(objects) > 1:
                right, n = right + ok, n + 1
                chance += 1 / len({o[qtype] for o in objects})
        counts = "  ".join(f"{k}: {c}/{t}" for k, (c, t) in sorted(tally.items()))
        print(f"{qtype:<10} {key:<10} {counts:<38} {100 * right / n:.1f}, {100 * chance / n:.1f}")


def variance_share(features: torch.Tensor, labels: list) -> float:
    """R^2 of the class means: the share of the features' variance that the labels explain."""
    x = features.double() - features.double().mean(0)
    between = 0.0
    for value in set(labels):
        rows = [i for i, label in enumerate(labels) if label == value]
        between += len(rows) * float((x[rows].mean(0) ** 2).sum())
    return between / float((x ** 2).sum())


@torch.no_grad()
def attribute_shares(model, data: Path, scenes: list) -> None:
    pixels = torch.stack([preprocess(load_image(s["image"], data / "images"), model.vision_tower.cfg.image_size,
                                     "crop") for s in scenes])
    grid = model.vision_tower.cfg.image_size // model.vision_tower.cfg.patch_size
    z = model.vision_tower(pixels)
    h = model.projector(z)
    block = model.language_model.layers[0]
    keys = block.self_attn.k_proj(block.input_layernorm(h))
    cells = [(i, o["row"] * grid + o["col"], o) for i, s in enumerate(scenes) for o in s["objects"]]
    print("\nshare of the variance at object cells (%)   " + "  ".join(ATTRIBUTES))
    for name, f in [("CLIP, selected layer", z), ("projector output (LLM input)", h), ("LLM first-layer keys", keys)]:
        at_cells = torch.stack([f[i, c] for i, c, _ in cells])
        shares = [100 * variance_share(at_cells, [o[a] for _, _, o in cells]) for a in ATTRIBUTES]
        print(f"{name:<44}" + "  ".join(f"{v:.1f}" for v in shares))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="a stage-2 directory of the toy pipeline")
    p.add_argument("data", type=Path, help="the toy world (eval.json, scenes.json, images/)")
    p.add_argument("--images", type=int, default=600, help="training images for the variance shares")
    args = p.parse_args()
    model = llava_min.load(args.model, dtype=torch.float32).eval()
    tok = Tokenizer(args.model / "tokenizer.model")
    scenes = json.loads((args.data / "scenes.json").read_text())
    answers_by_object_count(model, tok, args.data, {s["image"]: s for s in scenes})
    attribute_shares(model, args.data, [s for s in scenes if s["split"] == "train"][:args.images])


if __name__ == "__main__":
    main()
