"""Crop or pad: the square a non-square image becomes before CLIP sees it.

    python -m llava_min.tools.inspect square --image IMG --model DIR --out square.png

CLIP's processor center-crops (the official stage 1, and the toy presets); LLaVA-1.5's stage 2 pads
the image to a square of the mean colour first (`expand_to_square`, the official expand2square), so
nothing is cut away. Prints what each does to this image, and draws the image, the padded and the
cropped view side by side.
"""
from pathlib import Path

from ..files import InputError

GAP, HEIGHT = 8, 192  # the picture: space between panels, and the height each panel is drawn at


def add_parser(sub) -> None:
    p = sub.add_parser("square", help="pad vs crop: the square view the encoder gets of a non-square image")
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--model", type=Path, help="its encoder size and its aspect mode (default: 336 px)")
    p.add_argument("--out", type=Path, help="also draw image | pad | crop into this PNG")
    p.set_defaults(show=run)


def model_settings(model_dir) -> tuple:
    """(encoder size, the aspect mode the model was tuned with, or None) from a checkpoint's config."""
    if model_dir is None:
        return 336, None
    from ..checkpoint.configs import llava_hf_config, read_config
    from ..checkpoint.official import official_aspect
    raw = read_config(model_dir)
    if raw.get("model_type") in ("llava", "llava_next"):
        cfg = llava_hf_config(raw)
        return cfg.vision.image_size, cfg.image_aspect_ratio
    raise InputError(f"{model_dir}: square reads llava-hf configs (a stage-2 directory); official ones say "
                     f"image_aspect_ratio {official_aspect(raw.get('image_aspect_ratio', 'pad'))!r}")


def describe(w: int, h: int, size: int) -> list:
    from ..data.image import PAD_COLOR, shortest_side_size
    long, short = max(w, h), min(w, h)
    rw, rh = shortest_side_size(w, h, size)
    kept = size / max(rw, rh)
    cut = round((1 - kept) * long / 2)
    sides = "left and right" if w > h else "top and bottom"
    band = (long - short) // 2
    return [f"image {w}x{h} (width x height); the encoder takes {size}x{size}",
            f"crop: shortest side to {size} ({rw}x{rh}), then the center {size}x{size}: about {cut} px of the "
            f"image cut off at the {sides} each, {kept:.0%} of its {'width' if w > h else 'height'} kept",
            f"pad:  the image centred on a {long}x{long} square of {PAD_COLOR} ({band} px bands at the "
            f"{'top and bottom' if w > h else 'left and right'}), then resized to {size}x{size}: nothing cut, "
            f"{short / long:.0%} of the square is image"]


def picture(image, size: int):
    """image | pad | crop, each HEIGHT px high, with a title above each."""
    from PIL import Image, ImageDraw

    from ..data.image import square_view
    from .heatmap import font
    views = [("image", image), ("pad", square_view(image, size, "pad")), ("crop", square_view(image, size, "crop"))]
    views = [(name, v.resize((round(HEIGHT * v.width / v.height), HEIGHT), Image.NEAREST)) for name, v in views]
    out = Image.new("RGB", (sum(v.width for _, v in views) + GAP * 2, HEIGHT + 24), (255, 255, 255))
    draw, x = ImageDraw.Draw(out), 0
    for name, view in views:
        draw.text((x + 4, 4), name, fill=(0, 0, 0), font=font(14))
        out.paste(view, (x, 24))
        x += view.width + GAP
    return out


def run(args) -> None:
    from ..data.image import load_image
    size, aspect = model_settings(args.model)
    image = load_image(args.image)
    if image.width == image.height:
        print(f"image {image.width}x{image.height} is square: crop and pad both only resize it to {size}x{size}")
    else:
        print("\n".join(describe(image.width, image.height, size)))
    if aspect is not None:
        print(f"{args.model} was tuned on {aspect!r} (its config's image_aspect_ratio); stage 1 always crops")
    if args.out is not None:
        picture(image, size).save(args.out)
        print(f"wrote {args.out}")
