"""Images in: safe loading, and the CLIP preprocessing X_v -> pixel_values (SPEC section 4).

CLIP's processor: RGB, resize the shortest side to `size` (bicubic), center crop, /255, normalize with
CLIP's mean and std. LLaVA-1.5's `pad` mode first pastes the image centred on a square canvas of the
mean colour, so nothing is cropped away.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104)
MAX_PIXELS = 64 * 2**20  # refuse larger images before decoding them (a 64-megapixel RGB image is 200 MB)


class ImageError(ValueError):
    """An image that cannot be used; the message names the file."""


def resolve_in_folder(name, image_folder) -> Path:
    """`name` inside `image_folder`; refuses `..`, absolute paths and symlinks that lead outside."""
    folder = Path(image_folder).resolve()
    path = (folder / name).resolve()
    if not path.is_relative_to(folder):
        raise ImageError(f"image path {name!r} leads outside the image folder {image_folder}")
    return path


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Transparency is composited on white; 16-bit and float images are
    scaled to 8 bits instead of being clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or array.max() > 255 else 255.0
        img = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("LA", "PA"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        canvas = Image.new("RGB", img.size, (255, 255, 255))
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    return img.convert("RGB")


def load_image(name, image_folder=None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Opens an image as RGB. With `image_folder`, `name` is relative to it and must stay inside it."""
    path = resolve_in_folder(name, image_folder) if image_folder is not None else Path(name)
    if not path.is_file():
        raise ImageError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            w, h = img.size  # read from the header: nothing decoded yet
            if w * h > max_pixels:
                raise ImageError(f"image {path} is {w}x{h} pixels, more than the limit of {max_pixels}")
            img.load()
            return to_rgb(img)
    except ImageError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"image {path} cannot be read: {e}") from e


def expand_to_square(img: Image.Image, color=PAD_COLOR) -> Image.Image:
    """LLaVA-1.5's `pad` aspect mode: the image centred on a square of the mean colour."""
    w, h = img.size
    if w == h:
        return img
    canvas = Image.new(img.mode, (max(w, h),) * 2, color)
    canvas.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return canvas


def resize_shortest_side(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    return img.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def normalize(img: Image.Image) -> torch.Tensor:
    """uint8 HWC -> float32 CHW, scaled to [0, 1] and normalized with CLIP's mean and std."""
    x = (np.asarray(img, dtype=np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def preprocess(img: Image.Image, size: int = 336, aspect: str = "crop") -> torch.Tensor:
    """X_v -> pixel_values [3, size, size]. aspect "crop": CLIP's center crop; "pad": LLaVA-1.5's square."""
    if aspect not in ("crop", "pad"):
        raise ValueError(f"aspect must be 'crop' or 'pad', got {aspect!r}")
    if aspect == "pad":
        img = expand_to_square(img)
    return normalize(center_crop(resize_shortest_side(img, size), size))
