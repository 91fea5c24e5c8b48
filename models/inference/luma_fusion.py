"""Fusion of prepared pairs of any size, whatever runs the network: torch-free.

Pairs up to one tile are grouped by padded size, reflect-padded and cropped back; larger pairs are fused tile by
tile (:mod:`models.inference.tiling`); the colour is put back; ``alive`` is asked between network calls. A
subclass supplies the network call on one padded batch (:meth:`LumaFuser._fuse_padded`): torch
(:class:`models.inference.fuser.Fuser`) or an ONNX graph without torch (:mod:`models.inference.graph_fuser`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from models.images.imaging import png_provenance
from models.images.pair_input import FusionResult, PairInput, with_colour
from models.inference.tiling import DEFAULT_OVERLAP, DEFAULT_TILE, TileAccumulator, tile_grid

Alive = Callable[[int], bool]
"""``alive(i)``: is pair ``i`` of a ``fuse`` call still wanted? (False once its deadline passed or its client left.)"""


class FusionCancelled(Exception):
    """Raised between network calls when no pair of the current call is wanted any more."""


class LumaFuser:
    """Deterministic tiled fusion of prepared pairs, colour put back, cancellation between calls, provenance.
    Subclasses implement :meth:`_fuse_padded` and :attr:`model_name`."""

    runtime = "torch"

    def __init__(self, size_multiple: int, weights_path: str | None = None, weights_sha256: str | None = None,
                 tile_size: int = DEFAULT_TILE, tile_overlap: int = DEFAULT_OVERLAP) -> None:
        m = size_multiple
        if tile_size < 2 * m or tile_size % m:
            raise ValueError(f"tile_size must be a multiple of {m} and at least {2 * m}, not {tile_size}")
        if not 0 <= tile_overlap <= tile_size // 2:
            raise ValueError(f"tile_overlap must be in [0, tile_size/2 = {tile_size // 2}], not {tile_overlap}")
        self.size_multiple = m
        self.weights_path, self.weights_sha256 = weights_path, weights_sha256
        self.tile_size, self.tile_overlap = tile_size, tile_overlap

    @property
    def model_name(self) -> str:
        """Which model fuses (``dmfnet-small``, ``dmfnet-fast``, ...): in /version, headers and provenance."""
        raise NotImplementedError

    @property
    def is_random(self) -> bool:
        """True for an untrained model (callers must say so loudly)."""
        return False

    @property
    def pairs_per_call(self) -> int:
        """Pairs (or tiles) handed to one network call."""
        return 1

    def provenance(self) -> dict[str, str]:
        """Provenance written into every fused PNG (see :func:`models.images.imaging.png_provenance`)."""
        return png_provenance(self.model_name, self.weights_sha256 or self.weights_path or "unknown")

    def _fuse_padded(self, mri_y: np.ndarray, func_y: np.ndarray, stop: Callable[[], bool]) -> np.ndarray:
        """(N, 1, H, W) padded luminances in [0, 1] -> fused (N, 1, H, W) in [0, 1]; ``stop`` asked between
        network calls (True: raise :class:`FusionCancelled`)."""
        raise NotImplementedError

    @staticmethod
    def _pair_by_pair(n: int, run_one: Callable[[int], np.ndarray], stop: Callable[[], bool]) -> np.ndarray:
        """A graph runtime's padded batch: ``run_one(i)`` for each pair -> (N, 1, H, W) clipped to [0, 1]. Pair by
        pair because runtimes pick kernels by batch size, and a pair's output must not depend on its batch-mates."""
        outs = []
        for i in range(n):
            if stop():
                raise FusionCancelled
            outs.append(run_one(i))
        return np.concatenate(outs).clip(0, 1)

    def fuse(self, pairs: list[PairInput], alive: Alive | None = None) -> list[FusionResult | None]:
        """Fuse prepared pairs of any size: fused luminance (:meth:`fuse_lumas`) with the functional image's
        colour put back (gray sources give gray). A dropped pair's result is None."""
        return with_colour(self.fuse_lumas(pairs, alive), pairs)

    def fuse_lumas(self, pairs: list[PairInput], alive: Alive | None = None) -> list[np.ndarray | None]:
        """Fused luminance (H, W) in [0, 1] per pair; deterministic for the same batch composition.

        Batch-mates change nothing but, when several pairs share one network call (``pairs_per_call`` > 1: the
        DM-FNet UNet, and the fast tier on CUDA), the kernels' summation order, which can move an 8-bit pixel
        by one grey level. With one pair per call (the fast tier on CPU, every exported-graph runtime) a pair's
        bytes are the same whatever it is batched with.

        Pairs up to one tile are grouped by padded size, reflect-padded and cropped back; larger pairs are
        fused tile by tile (see :mod:`models.inference.tiling`), so memory grows with the image buffers only. Between
        network calls and tiles ``alive`` is asked whether each pair is still wanted; a dropped pair's result
        is None (without ``alive`` every result is a :class:`FusionResult`).
        """
        alive = alive or (lambda i: True)
        m, tile = self.size_multiple, self.tile_size
        groups: dict[tuple[int, int], list[int]] = {}
        tiled: list[int] = []
        for i, p in enumerate(pairs):
            h, w = p.size
            if h > tile or w > tile:
                tiled.append(i)
            else:
                groups.setdefault((_round_up(h, m), _round_up(w, m)), []).append(i)
        lumas: list[np.ndarray | None] = [None] * len(pairs)
        for (ph, pw), idx in groups.items():
            for k in range(0, len(idx), self.pairs_per_call):
                sub = [i for i in idx[k : k + self.pairs_per_call] if alive(i)]
                if not sub:
                    continue
                a = padded_batch([pairs[i].mri_y for i in sub], ph, pw)
                b = padded_batch([pairs[i].func_y for i in sub], ph, pw)
                try:
                    fused = self._fuse_padded(a, b, stop=lambda sub=sub: not any(alive(i) for i in sub))
                except FusionCancelled:
                    continue
                for j, i in enumerate(sub):
                    h, w = pairs[i].size
                    lumas[i] = fused[j, 0, :h, :w]
        for i in tiled:
            lumas[i] = self._fuse_tiled(pairs[i], lambda i=i: alive(i))
        return lumas

    def _fuse_tiled(self, pair: PairInput, wanted: Callable[[], bool]) -> np.ndarray | None:
        """Fused luminance of a pair larger than one tile, blended from overlapping tiles; None if dropped."""
        m, tile = self.size_multiple, self.tile_size
        h, w = pair.size
        th, tw = min(tile, _round_up(h, m)), min(tile, _round_up(w, m))
        tiles = tile_grid(h, w, th, tw, self.tile_overlap)
        acc = TileAccumulator(h, w, self.tile_overlap)
        for k in range(0, len(tiles), self.pairs_per_call):
            if not wanted():
                return None
            chunk = tiles[k : k + self.pairs_per_call]
            a = padded_batch([pair.mri_y[t.y : t.y + th, t.x : t.x + tw] for t in chunk], th, tw)
            b = padded_batch([pair.func_y[t.y : t.y + th, t.x : t.x + tw] for t in chunk], th, tw)
            try:
                fused = self._fuse_padded(a, b, stop=lambda: not wanted())
            except FusionCancelled:
                return None
            for t, out in zip(chunk, fused, strict=True):
                acc.add(t, out[0])
        return acc.result()


def _round_up(n: int, m: int) -> int:
    return math.ceil(n / m) * m


def padded_batch(images: list[np.ndarray], ph: int, pw: int) -> np.ndarray:
    """(H, W) images (each at most ph x pw) -> one float32 (N, 1, ph, pw) batch, padded at bottom/right by
    reflection (replicating the edge where reflection cannot reach)."""
    out = np.empty((len(images), 1, ph, pw), np.float32)
    for dst, y in zip(out, images, strict=True):
        h, w = y.shape
        dh, dw = ph - h, pw - w
        if dh or dw:
            dst[0] = np.pad(y, ((0, dh), (0, dw)), mode="reflect" if dh < h and dw < w else "edge")
        else:
            dst[0] = y
    return out
