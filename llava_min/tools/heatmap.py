"""An attention map laid over the image the encoder saw, drawn with Pillow alone.

One cell per visual token, on the patch it came from: the square view for a one-view model (after the
model's pad or crop), and for AnyRes (LLaVA-NeXT) the global view beside the tile canvas, whose unpadded
feature grid is what the LLM reads. Tokens with no place in the image (CLIP's CLS with select_feature
"cls_patch", AnyRes's row ends) are reported as shares, not drawn.
"""
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..data.image import anyres_tiles, square_view
from ..model.anyres import unpad_shape

INFERNO = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float64)
PANEL = 336  # the height each view is drawn at


def colormap(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB along matplotlib's "inferno" (its five anchor colours, linearly between)."""
    x = np.clip(v, 0, 1) * (len(INFERNO) - 1)
    lo = np.minimum(x.astype(int), len(INFERNO) - 2)
    t = (x - lo)[..., None]
    return INFERNO[lo] * (1 - t) + INFERNO[lo + 1] * t


def overlay(view: Image.Image, grid: np.ndarray, vmax: float) -> Image.Image:
    """`view` at PANEL px high, in grey, with `grid` (rows x cols; NaN: no visual token) coloured over it."""
    w = round(PANEL * view.width / view.height)
    grey = np.asarray(view.convert("L").convert("RGB").resize((w, PANEL), Image.BICUBIC), dtype=np.float64)
    cells = Image.fromarray(np.nan_to_num(grid / vmax, nan=-1.0).astype(np.float32), "F")
    v = np.asarray(cells.resize((w, PANEL), Image.NEAREST))[..., None]  # one block per cell, no blur
    out = Image.fromarray(np.where(v >= 0, 0.45 * grey + 0.55 * colormap(v[..., 0]), 0.3 * grey).astype(np.uint8))
    rows, cols = grid.shape
    if PANEL / rows >= 24:  # cell borders, where cells are large enough to show them
        draw = ImageDraw.Draw(out)
        for r in range(1, rows):
            draw.line([(0, r * PANEL / rows), (w, r * PANEL / rows)], fill=(255, 255, 255), width=1)
        for c in range(1, cols):
            draw.line([(c * w / cols, 0), (c * w / cols, PANEL)], fill=(255, 255, 255), width=1)
    return out


def panels(model, image: Image.Image, cells: np.ndarray) -> tuple:
    """([(view, grid), ...], notes): where each visual token's cell goes, and the shares not drawn."""
    cfg, notes = model.cfg, []
    side = cfg.vision.image_size // cfg.vision.patch_size
    if model.anyres is None:
        if cfg.select_feature == "cls_patch":
            notes.append(f"CLS token (no place in the image): {cells[0]:.1%}")
            cells = cells[1:]
        return [(square_view(image, cfg.vision.image_size, cfg.image_aspect_ratio), cells.reshape(side, side))], notes
    a, size = model.anyres, (image.height, image.width)
    rows, cols = a.grid(size)
    r, c = unpad_shape(size, (rows * side, cols * side))
    top, left = (rows * side - r) // 2, (cols * side - c) // 2
    tiles = anyres_tiles(image, a)
    canvas = Image.new("RGB", (cols * a.tile, rows * a.tile))
    for k, tile in enumerate(tiles[1:]):
        canvas.paste(tile, ((k % cols) * a.tile, (k // cols) * a.tile))
    grid = np.full((rows * side, cols * side), np.nan)
    lines = cells[side * side:].reshape(r, c + 1)  # each row of the unpadded grid, then its row-end token
    grid[top: top + r, left: left + c] = lines[:, :c]
    notes.append(f"row-end tokens (image_newline, no place in the image): {lines[:, c].sum():.1%}")
    return [(tiles[0], cells[: side * side].reshape(side, side)), (canvas, grid)], notes


def font(size: int):
    try:
        return ImageFont.load_default(size)
    except (TypeError, OSError):  # a Pillow without FreeType has only its fixed bitmap font
        return ImageFont.load_default()


def wrap(draw, text: str, fnt, width: int) -> list:
    """The text's lines, each broken into lines no wider than `width` pixels."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            if line and draw.textlength(line + " " + word, font=fnt) > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
    return lines


def figure(views: list, vmax: float, caption: list) -> Image.Image:
    """The first view as it is, then every view with its map, a colour bar from 0 to `vmax`, the caption below."""
    first = views[0][0]
    tinted = [first.resize((round(PANEL * first.width / first.height), PANEL), Image.BICUBIC)]
    tinted += [overlay(view, grid, vmax) for view, grid in views]
    width = sum(t.width for t in tinted) + 8 * (len(tinted) - 1)
    fnt = font(14)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text = [line for item in caption for line in wrap(probe, item, fnt, width - 16)]
    out = Image.new("RGB", (width, PANEL + 40 + 20 * len(text) + 8), (255, 255, 255))
    x = 0
    for t in tinted:
        out.paste(t, (x, 0))
        x += t.width + 8
    bar = colormap(np.linspace(0, 1, width - 120)[None].repeat(10, 0)).astype(np.uint8)
    out.paste(Image.fromarray(bar), (40, PANEL + 10))
    draw = ImageDraw.Draw(out)
    draw.text((8, PANEL + 8), "0", fill=(0, 0, 0), font=fnt)
    draw.text((width - 76, PANEL + 8), f"{vmax:.1%}", fill=(0, 0, 0), font=fnt)
    for k, line in enumerate(text):
        draw.text((8, PANEL + 32 + 20 * k), line, fill=(0, 0, 0), font=fnt)
    return out
