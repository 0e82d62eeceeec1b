"""Images in: safe loading, CLIP's preprocessing X_v -> pixel_values (CLIPImageProcessor; the official
llava/mm_utils.py), and `image_input`, the one path from an image to what the model takes.

CLIP's processor: RGB, resize the shortest side to `size` (bicubic, Pillow), center crop, /255,
normalize with CLIP's mean and std. LLaVA-1.5's `pad` mode first pastes the image centred on a square
canvas of the mean colour, so nothing is cropped away. Both match transformers' Pillow CLIP processor
exactly (tests/test_image.py).

Transparency is composited on white, as transformers' `convert_to_rgb` does (the official LLaVA loader's
`.convert("RGB")` would keep whatever colour hides under transparent pixels, often black).
"""
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from ..errors import ImageError
from ..model.anyres import AnyRes, fit_size, select_best_resolution
from ..model.clip import num_features
from ..model.llava import anyres_of

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104), as the official expand2square
MAX_PIXELS = 64 * 2**20  # refuse larger images before decoding them (64 megapixels of RGB is 200 MB)
MAX_WORK_PIXELS = 256 * 2**20  # the largest intermediate image preprocess may build (pad canvas, resize)
BROKEN_FILE = (OSError, ValueError, SyntaxError)  # what Pillow raises for a broken file, at open and at load


# ---------------------------------------------------------------- loading

def resolve_in_folder(name, image_folder) -> Path:
    """`name` inside `image_folder`; refuses `..`, absolute paths and symlinks that lead outside."""
    folder = Path(image_folder).resolve()
    try:
        path = (folder / name).resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte
        raise ImageError(f"image path {name!r} cannot be resolved in the image folder {image_folder}: {e}") from e
    if not path.is_relative_to(folder):
        raise ImageError(f"image path {name!r} leads outside the image folder {image_folder} (to {path})")
    return path


def to_8_bit(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float grey image -> 8-bit "L", scaled from its range (Pillow's own
    conversion clips, turning most 16-bit images white). The range: 16 bits for I;16; for I and F,
    what the values reach (F up to 1.0 is taken as [0, 1])."""
    array = np.asarray(img, dtype=np.float64)
    top = array.max(initial=0)
    peak = 65535.0 if img.mode.startswith("I;16") or top > 255 else 1.0 if img.mode == "F" and top <= 1 else 255.0
    return Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white. An RGB image is left as it is, even
    with a `transparency` colour key (which Pillow keeps after P -> RGB), as transformers' convert_to_rgb."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = to_8_bit(img)
    if img.mode == "RGB":
        return img
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def check_image_folder(image_folder) -> None:
    """A given image folder must be a directory (else every image in it would be reported missing, one by one)."""
    if image_folder is not None and not Path(image_folder).is_dir():
        raise ImageError(f"image folder {image_folder} "
                         + ("is not a directory" if Path(image_folder).exists() else "does not exist"))


def find_image(name, image_folder=None) -> Path:
    """The file an image name stands for (inside `image_folder` when one is given), checked to be there;
    nothing is decoded (the check every record gets before training)."""
    path = resolve_in_folder(name, image_folder) if image_folder is not None else Path(name)
    if not path.is_file():
        raise ImageError(f"image {path} does not exist" + (" (it is not a file)" if path.exists() else ""))
    return path


def load_image(name, image_folder=None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Opens an image as RGB. With `image_folder`, `name` is relative to it and must stay inside it.
    The size is read from the header and checked before any pixel is decoded (decompression bombs).
    EXIF orientation is not applied, as neither the official code nor transformers applies it."""
    with decode(find_image(name, image_folder), max_pixels) as img:
        return to_rgb(img)


def read_header(name, image_folder=None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image opened by its header alone and closed again: its format, mode and size, the pixel limit
    checked, nothing decoded (the check every record's image gets before training)."""
    img = opened(find_image(name, image_folder), max_pixels)
    img.close()
    return img


def opened(path: Path, max_pixels: int) -> Image.Image:
    """The file opened by Pillow, its header's size within `max_pixels`; no pixel decoded yet."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit below
            img = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {path} is too large, more than the limit of {max_pixels} pixels ({e})") from e
    except BROKEN_FILE as e:
        raise ImageError(f"image {path} cannot be read: {e}") from e
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise ImageError(f"image {path} is {w}x{h} pixels, more than the limit of {max_pixels}")
    return img


def decode(path: Path, max_pixels: int) -> Image.Image:
    """The file's pixels, decoded once the header's size is within `max_pixels`. Pillow's errors for a broken
    file are caught at its two calls that read the file, and nowhere else."""
    img = opened(path, max_pixels)
    try:
        img.load()
    except BROKEN_FILE as e:
        img.close()
        raise ImageError(f"image {path} cannot be read: {e}") from e
    return img


# ---------------------------------------------------------------- CLIP preprocessing

def expand_to_square(img: Image.Image, color=PAD_COLOR) -> Image.Image:
    """LLaVA-1.5's `pad` aspect mode: the image centred on a square of the mean colour."""
    w, h = img.size
    if w == h:
        return img
    canvas = Image.new(img.mode, (max(w, h),) * 2, color)
    canvas.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return canvas


def shortest_side_size(w: int, h: int, size: int) -> tuple:
    """(width, height) with the shortest side `size`; the long side truncated, as transformers does."""
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    return (size, new_long) if w <= h else (new_long, size)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def normalize(img: Image.Image) -> torch.Tensor:
    """uint8 HWC -> float32 CHW: x / 255 (in float64, then float32, as transformers rescales), then
    (x - mean) / std with CLIP's statistics."""
    x = (np.asarray(img, dtype=np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def check_work_size(w: int, h: int, size: int, aspect: str) -> None:
    """An extreme aspect ratio makes a huge pad canvas or resized image from a small file: refuse it."""
    side = max(w, h) if aspect == "pad" else None
    work = side * side if side else size * max(shortest_side_size(w, h, size))
    if work > MAX_WORK_PIXELS:
        raise ImageError(f"a {w}x{h} image would need a {work}-pixel intermediate image in {aspect!r} mode "
                         f"(limit {MAX_WORK_PIXELS}): its aspect ratio is too extreme")


def square_view(img: Image.Image, size: int = 336, aspect: str = "crop") -> Image.Image:
    """The size x size RGB image the encoder sees. aspect "crop": CLIP's center crop; "pad": LLaVA-1.5's square."""
    if aspect not in ("crop", "pad"):
        raise ValueError(f"aspect must be 'crop' or 'pad', got {aspect!r}")
    img = to_rgb(img)
    check_work_size(*img.size, size, aspect)
    if aspect == "pad":
        img = expand_to_square(img)
    img = img.resize(shortest_side_size(*img.size, size), Image.BICUBIC)
    return center_crop(img, size)


def preprocess(img: Image.Image, size: int = 336, aspect: str = "crop") -> torch.Tensor:
    """X_v -> pixel_values [3, size, size] (`square_view`, then CLIP's normalization)."""
    return normalize(square_view(img, size, aspect))


# ---------------------------------------------------------------- AnyRes tiles (LLaVA-NeXT)

def anyres_tiles(img: Image.Image, anyres: AnyRes) -> list:
    """[global view, tile, tile, ...] as PIL images, tiles in row-major order: the image resized to fit the
    best grid (`select_best_resolution`), padded black, cut into tiles of the encoder's size."""
    size, tile = (img.height, img.width), anyres.tile
    bh, bw = select_best_resolution(size, anyres.pinpoints)
    nh, nw = fit_size(size, (bh, bw))
    canvas = Image.new("RGB", (bw, bh), (0, 0, 0))
    canvas.paste(img.resize((nw, nh), Image.BICUBIC), ((bw - nw) // 2, (bh - nh) // 2))
    crops = [canvas.crop((x, y, x + tile, y + tile)) for y in range(0, bh, tile) for x in range(0, bw, tile)]
    return [img.resize((tile, tile), Image.BICUBIC)] + crops


def anyres_pixels(img: Image.Image, anyres: AnyRes) -> torch.Tensor:
    """pixel_values [1 + tiles, 3, tile, tile] for one image."""
    return torch.stack([normalize(t) for t in anyres_tiles(img, anyres)])


# ---------------------------------------------------------------- the model's input

@dataclass(frozen=True)
class ImageSettings:
    """How a model takes an image: the encoder's input side, how one view is squared ("crop": CLIP's
    center crop, "pad": LLaVA-1.5's), AnyRes tiles instead of one view (None: one view), and the
    visual tokens of one view."""
    image_size: int = 336
    aspect: str = "crop"
    anyres: Optional[AnyRes] = None
    view_tokens: int = 576

    @classmethod
    def of(cls, cfg) -> "ImageSettings":
        """The settings of a model's LlavaConfig (`model.cfg`)."""
        return cls(cfg.vision.image_size, cfg.image_aspect_ratio, anyres_of(cfg), num_features(cfg.vision,
                                                                                               cfg.select_feature))


@dataclass(frozen=True)
class ImageInput:
    pixel_values: torch.Tensor  # [views, 3, S, S]: one view, or AnyRes's global view then its tiles
    size: tuple  # the image's (height, width): AnyRes merges the tiles by it (the model's image_sizes)
    num_tokens: int  # the visual tokens the model splices in for it: what `<image>` expands to


def image_input(image: Image.Image, settings: ImageSettings) -> ImageInput:
    """X_v as the model takes it. A batch's pixel_values are its images' concatenated (torch.cat), with
    their sizes in order; the token count is the model's (`Llava.image_token_count`)."""
    size = (image.height, image.width)
    if settings.anyres is not None:
        return ImageInput(anyres_pixels(image, settings.anyres), size, settings.anyres.num_tokens(size))
    return ImageInput(preprocess(image, settings.image_size, settings.aspect)[None], size, settings.view_tokens)
