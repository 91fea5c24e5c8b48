"""Overlapping tiles and their blend weights: how images larger than one tile are fused.

Why tiles: the UNet's self-attention costs (tokens x tokens) memory, so an untiled 2048x2048 image asked for
17 GB and 4096x4096 would ask for hundreds; it also sees a global context it never saw in training. Fusing
fixed-size tiles keeps both memory and context what the model was built for, and cost grows linearly with
the pixel count. Tiles overlap and are blended with a smooth window (a raised-cosine ramp over the overlap,
the same idea as sliding-window inference in medical imaging toolkits), then normalised by the summed
weights, so there is no seam and every pixel's weights add up to exactly one.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

DEFAULT_TILE = 256  # the scale Stage II is validated at (Harvard slices are 256x256)
DEFAULT_OVERLAP = 32  # measured in bench/sizes.py: see the README's size table


@dataclass(frozen=True)
class Tile:
    """One tile: top-left corner (y, x) in the image and its extent (h, w)."""

    y: int
    x: int
    h: int
    w: int


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread start offsets so that tiles of ``tile`` px cover ``length`` with >= ``overlap`` px shared."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(k * (length - tile) / (n - 1)) for k in range(n)]


def tile_grid(height: int, width: int, tile_h: int, tile_w: int, overlap: int) -> list[Tile]:
    """All tiles (row-major) covering a height x width image."""
    return [Tile(y, x, tile_h, tile_w)
            for y in tile_starts(height, tile_h, overlap) for x in tile_starts(width, tile_w, overlap)]


@functools.lru_cache(maxsize=16)
def blend_window(tile_h: int, tile_w: int, overlap: int) -> np.ndarray:
    """(tile_h, tile_w) float32 weights: 1 in the middle, raised-cosine ramps over ``overlap`` px at each edge.

    The ramp never reaches 0 (a pixel covered by one tile only, at the image border, keeps its value).
    """
    def axis(n: int) -> np.ndarray:
        w = np.ones(n, np.float32)
        r = min(overlap, n // 2)
        if r > 0:
            ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(r, dtype=np.float32) + 0.5) / r)
            w[:r] = ramp
            w[n - r:] = ramp[::-1]
        return w

    win = np.outer(axis(tile_h), axis(tile_w))
    win.setflags(write=False)
    return win


class TileAccumulator:
    """Sums weighted tile outputs into image-sized buffers; ``result`` divides by the summed weights."""

    def __init__(self, height: int, width: int, overlap: int) -> None:
        self.overlap = overlap
        self.total = np.zeros((height, width), np.float32)
        self.weight = np.zeros((height, width), np.float32)

    def add(self, tile: Tile, values: np.ndarray) -> None:
        """Blend ``values`` (at least tile.h x tile.w; padding beyond the image is ignored) into place."""
        h = min(tile.h, self.total.shape[0] - tile.y)
        w = min(tile.w, self.total.shape[1] - tile.x)
        win = blend_window(tile.h, tile.w, self.overlap)[:h, :w]
        self.total[tile.y:tile.y + h, tile.x:tile.x + w] += values[:h, :w] * win
        self.weight[tile.y:tile.y + h, tile.x:tile.x + w] += win

    def result(self) -> np.ndarray:
        """The blended image (float32, image size)."""
        np.divide(self.total, self.weight, out=self.total)
        return self.total
