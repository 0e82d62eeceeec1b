"""What the whitened toy CLIP tokens hold at object cells (docs/research/toy-research.md).

The CLIP features of a world's training images (layer -2), whitened as `--whiten-features` does, then at
each object's cell: the share of their variance that least squares explains from each group of the scene's
facts (one-hot attributes, their combinations, the other objects, the jitter, the background tint).

    PYTHONPATH=. python docs/research/feature_variance.py data/toy runs/toy/clip
"""
import argparse
import json
from pathlib import Path

import torch

import llava_min
from llava_min.toy.whiten import feature_statistics
from llava_min.toy.world import COLORS, SHAPES, SIZES
from cached_features import clip_features

GROUPS = [("attributes", ["attributes"]), ("colour x shape x size", ["joint"]),
          ("attributes + colour x shape x size", ["attributes", "joint"]), ("jitter", ["jitter"]),
          ("background tint", ["background"]), ("the other objects", ["others"]),
          ("cell x colour x shape x size", ["cell_joint"]),
          ("all of these", ["cell_joint", "others", "jitter", "background"])]


def one_hot(n: int, k: int) -> list:
    return [float(j == k) for j in range(n)]


def facts(scene: dict, o: dict, cell_px: float) -> dict:
    """Regressors for one object: its attributes, their combinations, the rest of the scene, the nuisances."""
    color, shape, size, cell = list(COLORS).index(o["color"]), SHAPES.index(o["shape"]), SIZES.index(o["size"]), \
        o["row"] * 3 + o["col"]
    joint = (color * len(SHAPES) + shape) * len(SIZES) + size
    others = [0.0] * 20
    for p in scene["objects"]:
        if p is not o:
            for k in (list(COLORS).index(p["color"]), 6 + SHAPES.index(p["shape"]), 9 + SIZES.index(p["size"]),
                      11 + p["row"] * 3 + p["col"]):
                others[k] += 1
    x1, y1, x2, y2 = o["box"]
    dx, dy = (x1 + x2) / 2 - (o["col"] + 0.5) * cell_px, (y1 + y2) / 2 - (o["row"] + 0.5) * cell_px
    return {"attributes": one_hot(6, color) + one_hot(3, shape) + one_hot(2, size) + one_hot(9, cell),
            "joint": one_hot(36, joint), "cell_joint": one_hot(36 * 9, cell * 36 + joint), "others": others,
            "jitter": [dx, dy, dx * dx, dy * dy, dx * dy], "background": [c / 255 for c in scene["background"]]}


def explained(y: torch.Tensor, x: torch.Tensor) -> float:
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    residual = y - x @ (torch.linalg.pinv(x) @ y)
    return 100 * (1 - float((residual ** 2).sum() / (y ** 2).sum()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="a toy world (scenes.json, images/)")
    p.add_argument("clip", type=Path, help="its toy CLIP directory")
    p.add_argument("--images", type=int, default=3000, help="training images used")
    args = p.parse_args()
    scenes = [s for s in json.loads((args.data / "scenes.json").read_text()) if s["split"] == "train"][: args.images]
    vision = llava_min.load_vision(args.clip, select_layer=-2).eval()
    f = clip_features(vision, [s["image"] for s in scenes], args.data / "images")
    mu, whitening = feature_statistics(f.reshape(-1, f.shape[-1]), 1e-5)
    z = ((f - mu) @ whitening).double()
    cell_px = scenes[0]["size"] / 3
    cells = [(i, o) for i, s in enumerate(scenes) for o in s["objects"]]
    y = torch.stack([z[i, o["row"] * 3 + o["col"]] for i, o in cells])
    y = y - y.mean(0)
    rows = [facts(scenes[i], o, cell_px) for i, o in cells]
    print(f"{len(cells)} object cells; share of the whitened features' variance explained (%)")
    for name, keys in GROUPS:
        x = torch.tensor([sum((r[k] for k in keys), []) for r in rows], dtype=torch.float64)
        print(f"{name:<40}{explained(y, x):.1f}")


if __name__ == "__main__":
    main()
