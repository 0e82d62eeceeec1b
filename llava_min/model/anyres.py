"""AnyRes (LLaVA-1.5-HD, LLaVA-NeXT): see detail by encoding a large image as tiles of the encoder's size.

1. choose the grid resolution that keeps the most of the image (`select_best_resolution`);
2. resize the image to fit it, pad the rest black, cut it into tiles of the encoder's size, and add a
   global view: the whole image squeezed to one tile (data/image.py: pixels are not the model's);
3. encode every tile; put the tiles' features back on one (channels, rows, cols) grid, drop the rows or
   columns that only saw padding (`unpad`), append a learned `image_newline` vector to every row so the
   LLM knows where rows end, and flatten; the global view's features go first.
The number of visual tokens therefore depends on the image's size (`num_tokens`).
"""
import math
from dataclasses import dataclass, field

import torch

PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]  # (height, width), LLaVA-NeXT's


def select_best_resolution(size: tuple, pinpoints: list) -> tuple:
    """The (height, width) that keeps the most pixels of an image of `size` once fitted inside it;
    ties go to the one that wastes the least area."""
    h, w = size
    best, best_key = None, None
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        key = (effective, -(ph * pw - effective))
        if best_key is None or key > best_key:
            best, best_key = (ph, pw), key
    return best


def fit_size(size: tuple, target: tuple) -> tuple:
    """(height, width) of the image resized to fit inside `target`, keeping its aspect ratio."""
    h, w = size
    th, tw = target
    if tw / w < th / h:  # the reference's float arithmetic (an exact integer ceiling differs by 1 px at times)
        return min(math.ceil(h * (tw / w)), th), tw
    return th, min(math.ceil(w * (th / h)), tw)


def unpad_shape(size: tuple, grid: tuple) -> tuple:
    """Rows and columns of a (rows, cols) feature grid that saw the image rather than the padding."""
    h, w = size
    rows, cols = grid
    if w / h > cols / rows:  # wider than the grid: padding above and below
        pad = (rows - int(round(h * (cols / w), 7))) // 2
        return rows - 2 * pad, cols
    pad = (cols - int(round(w * (rows / h), 7))) // 2
    return rows, cols - 2 * pad


@dataclass
class AnyRes:
    tile: int = 336  # the vision tower's input size
    patch: int = 14
    pinpoints: list = field(default_factory=lambda: list(PINPOINTS))

    @property
    def side(self) -> int:
        return self.tile // self.patch  # feature rows (and columns) per tile

    def grid(self, size: tuple) -> tuple:
        """(rows, cols) of tiles for an image of (height, width) `size`."""
        bh, bw = select_best_resolution(size, self.pinpoints)
        return bh // self.tile, bw // self.tile

    def num_tokens(self, size: tuple) -> int:
        """Visual tokens for an image of (height, width) `size`: global view + unpadded grid + row ends."""
        rows, cols = self.grid(size)
        r, c = unpad_shape(size, (rows * self.side, cols * self.side))
        return self.side ** 2 + r * c + r

    def merge(self, features: torch.Tensor, size: tuple, newline: torch.Tensor) -> torch.Tensor:
        """Projected features [1 + tiles, tokens, D] of one image -> its visual tokens [num_tokens, D]."""
        base, tiles = features[0], features[1:]
        rows, cols = self.grid(size)
        s, d = self.side, features.shape[-1]
        grid = tiles.view(rows, cols, s, s, d).permute(0, 2, 1, 3, 4).reshape(rows * s, cols * s, d)
        r, c = unpad_shape(size, (rows * s, cols * s))
        top, left = (rows * s - r) // 2, (cols * s - c) // 2
        grid = grid[top: top + r, left: left + c]
        grid = torch.cat([grid, newline.to(grid.dtype).expand(r, 1, d)], dim=1)  # a row-end token per row
        return torch.cat([base, grid.reshape(-1, d)])
