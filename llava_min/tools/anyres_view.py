"""AnyRes step by step: how an image's size becomes its number of visual tokens (LLaVA-NeXT).

    python -m llava_min.tools.inspect anyres --size 640x480             # LLaVA-NeXT's 336-px grids
    python -m llava_min.tools.inspect anyres --size 640x480 --model DIR # an AnyRes model's own grids
"""
import re
from pathlib import Path

from ..files import InputError


def add_parser(sub) -> None:
    p = sub.add_parser("anyres", help="an image size -> AnyRes tiles -> unpad -> row ends -> visual tokens")
    p.add_argument("--size", required=True, help="the image's WIDTHxHEIGHT in pixels, e.g. 640x480")
    p.add_argument("--model", type=Path, help="an AnyRes model (default: LLaVA-NeXT's grids, 336-px tiles)")
    p.set_defaults(show=run)


def parse_size(text: str) -> tuple:
    """'640x480' (width x height) -> (height, width), the order the model uses throughout."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m or min(int(m.group(1)), int(m.group(2))) < 1:
        raise InputError(f"--size {text!r}: give WIDTHxHEIGHT in pixels, e.g. 640x480")
    return int(m.group(2)), int(m.group(1))


def anyres_of(model_dir):
    from ..model.anyres import AnyRes
    if model_dir is None:
        return AnyRes()
    from ..checkpoint.configs import llava_hf_config, read_config
    raw = read_config(model_dir)
    cfg = llava_hf_config(raw) if raw.get("model_type") in ("llava", "llava_next") else None
    if cfg is None or not cfg.image_grid_pinpoints:
        raise InputError(f"{model_dir} is not an AnyRes model (one view per image); leave --model out for "
                         "LLaVA-NeXT's grids")
    return AnyRes(cfg.vision.image_size, cfg.vision.patch_size, [tuple(p) for p in cfg.image_grid_pinpoints])


def steps(anyres, size: tuple) -> list:
    """The lines of the walk-through; the total is checked against AnyRes.num_tokens."""
    from ..model.anyres import fit_size, select_best_resolution, unpad_shape
    h, w = size
    t, s = anyres.tile, anyres.side
    bh, bw = select_best_resolution(size, anyres.pinpoints)
    rows, cols = bh // t, bw // t
    nh, nw = fit_size(size, (bh, bw))
    r, c = unpad_shape(size, (rows * s, cols * s))
    grids = ", ".join(f"{pw}x{ph}" for ph, pw in anyres.pinpoints)
    total = s * s + r * c + r
    lines = [f"image {w}x{h} (width x height); tiles of {t} px, each {s}x{s} patches of {anyres.patch} px",
             f"1. best grid among {grids} (select_best_resolution: the most of the image kept, then the least "
             f"padding): {bw}x{bh} = {rows} row{'s' * (rows != 1)} x {cols} column{'s' * (cols != 1)} of tiles",
             f"2. the image resized to fit it: {nw}x{nh}, padded black to {bw}x{bh} "
             f"({(bw - nw) // 2} px left, {(bh - nh) // 2} px top)",
             f"3. {rows * cols} tiles + 1 global view (the whole image squeezed to {t}x{t}): "
             f"{rows * cols + 1} images through CLIP, {s * s} features each",
             f"4. the tiles' features back on one grid: {rows * s} rows x {cols * s} columns",
             f"5. unpad: drop the rows and columns that saw only padding: {r} x {c} = {r * c} features",
             f"6. a learned image_newline after every row: + {r} = {r * c + r}",
             f"7. the global view's {s * s} features first: {s * s} + {r * c + r} = {total} visual tokens"]
    if total != anyres.num_tokens(size):
        raise AssertionError(f"the steps give {total}, AnyRes.num_tokens {anyres.num_tokens(size)}")
    return lines


def run(args) -> None:
    print("\n".join(steps(anyres_of(args.model), parse_size(args.size))))
