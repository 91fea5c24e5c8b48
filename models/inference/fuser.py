"""Fuser: what every fusion model shares, whatever its network and runtime.

Deterministic tiled fusion of prepared pairs of any size on a device and precision, the colour put back,
cancellation between chunks (``alive``), provenance for the PNG. A model (:mod:`models.inference.pipeline`,
:mod:`models.inference.fast_pipeline`) implements only ``fuse_luma`` for one padded batch of luminances.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from models.images.imaging import png_provenance
from models.images.pair_input import FusionResult, PairInput, with_colour
from models.inference.hardware import resolve_channels_last, resolve_precision
from models.inference.tiling import DEFAULT_OVERLAP, DEFAULT_TILE, TileAccumulator, tile_grid

Alive = Callable[[int], bool]
"""``alive(i)``: is pair ``i`` of a ``fuse`` call still wanted? (False once its deadline passed or its client left.)"""


class FusionCancelled(Exception):
    """Raised between UNet chunks when no pair of the current call is wanted any more."""

class Fuser:
    """What every fusion model shares: device and precision, deterministic tiled fusion of prepared pairs of
    any size, colour put back, cancellation between chunks, provenance. A model implements
    :meth:`fuse_luma` (one padded batch of luminances) and :attr:`model_name`.
    """

    def __init__(
        self,
        size_multiple: int,
        device: str | torch.device = "cpu",
        precision: str = "auto",
        channels_last: bool | None = None,
        chunk_size: int | None = None,
        weights_path: str | None = None,
        weights_sha256: str | None = None,
        random_init: bool = False,
        tile_size: int = DEFAULT_TILE,
        tile_overlap: int = DEFAULT_OVERLAP,
    ) -> None:
        self.size_multiple = m = size_multiple
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.channels_last = resolve_channels_last(channels_last, self.precision)
        self.chunk_size = chunk_size or default_chunk_size(self.device, self.precision)
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256
        self.random_init = random_init
        if tile_size < 2 * m or tile_size % m:
            raise ValueError(f"tile_size must be a multiple of {m} and at least {2 * m}, not {tile_size}")
        if not 0 <= tile_overlap <= tile_size // 2:
            raise ValueError(f"tile_overlap must be in [0, tile_size/2 = {tile_size // 2}], not {tile_overlap}")
        self.tile_size, self.tile_overlap = tile_size, tile_overlap
        self.runtime = "torch"
        self._graph: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None  # set by models.inference.runtimes

    def use_graph(self, runtime: str, graph: Callable[[dict[str, np.ndarray]], np.ndarray]) -> None:
        """Run the exported graph on another runtime instead of torch (see :mod:`models.inference.runtimes`)."""
        self.runtime, self._graph = runtime, graph

    def graph_feeds(self, mri_y: torch.Tensor, func_y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named inputs of the exported graph for padded luminances (N, 1, H, W) (see
        :mod:`models.inference.export`)."""
        return {"mri": mri_y, "other": func_y}

    def _frozen(self, net: torch.nn.Module) -> torch.nn.Module:
        """A network in eval mode, without gradients, on this device and memory format."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return net.eval().requires_grad_(False).to(self.device, memory_format=fmt)

    @property
    def model_name(self) -> str:
        """Which model fuses (``dmfnet-small``, ``dmfnet-fast``, ...): in /version, headers and provenance."""
        raise NotImplementedError

    @property
    def is_random(self) -> bool:
        """True for an untrained model (callers must say so loudly)."""
        return self.random_init

    def describe(self) -> dict:
        """Model, device, dtype and weights (for ``dmfnet info`` and ``/version``); models add their own."""
        return {
            "model": self.model_name,
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": self.channels_last,
            "chunk_size": self.chunk_size,
            "tile_size": self.tile_size,
            "tile_overlap": self.tile_overlap,
            "weights": self.weights_path,
            "weights_sha256": self.weights_sha256,
            "random_init": self.is_random,
            "runtime": self.runtime,
        }

    def export_graph(self) -> torch.nn.Module:
        """The model as one exportable module (each kind's pipeline defines it; models/inference/export.py)."""
        raise NotImplementedError

    def graph_input_dims(self) -> list[tuple[str, str]]:
        """The exported graph's inputs and their dims (Triton's notation); kinds with more inputs add theirs."""
        return [("mri", "[ -1, 1, -1, -1 ]"), ("other", "[ -1, 1, -1, -1 ]")]

    def provenance(self) -> dict[str, str]:
        """Provenance written into every fused PNG (see :func:`models.images.imaging.png_provenance`)."""
        return png_provenance(self.model_name, self.weights_sha256 or self.weights_path or "unknown")

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host -> device copy; on CUDA from pinned memory without blocking (the GPU queues it behind its work;
        the one model thread uses the default stream, so the copy is ordered before the model reads it)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def fuse_luma(
        self, mri_y: torch.Tensor, func_y: torch.Tensor, stop: Callable[[], bool] | None = None
    ) -> torch.Tensor:
        """Fuse (N, 1, H, W) luminances in [0, 1] of one padded size -> fused (N, 1, H, W) in [0, 1] on the CPU.

        ``stop`` is asked between chunks; when it says True, :class:`FusionCancelled` is raised.
        """
        raise NotImplementedError

    @property
    def pairs_per_call(self) -> int:
        """Pairs (or tiles) handed to one :meth:`fuse_luma` call."""
        return max(1, self.chunk_size // 2)

    def _fuse_padded(self, mri_y: torch.Tensor, func_y: torch.Tensor, stop: Callable[[], bool]) -> np.ndarray:
        """:meth:`fuse_luma` on torch, or the exported graph on the chosen runtime, pair by pair -> (N, 1, H, W)."""
        if self._graph is None:
            return self.fuse_luma(mri_y, func_y, stop=stop).numpy()
        outs = []
        for i in range(mri_y.shape[0]):  # pair by pair: runtimes pick kernels by batch size, and a pair's
            if stop():                   # output must not depend on its batch-mates
                raise FusionCancelled
            feeds = self.graph_feeds(mri_y[i : i + 1], func_y[i : i + 1])
            outs.append(self._graph({k: v.numpy() for k, v in feeds.items()}))
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
        UNet chunks and tiles ``alive`` is asked whether each pair is still wanted; a dropped pair's result
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
                a = _padded_batch([pairs[i].mri_y for i in sub], ph, pw)
                b = _padded_batch([pairs[i].func_y for i in sub], ph, pw)
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
            a = _padded_batch([pair.mri_y[t.y : t.y + th, t.x : t.x + tw] for t in chunk], th, tw)
            b = _padded_batch([pair.func_y[t.y : t.y + th, t.x : t.x + tw] for t in chunk], th, tw)
            try:
                fused = self._fuse_padded(a, b, stop=lambda: not wanted())
            except FusionCancelled:
                return None
            for t, out in zip(chunk, fused, strict=True):
                acc.add(t, out[0])
        return acc.result()

def _round_up(n: int, m: int) -> int:
    return math.ceil(n / m) * m


def default_chunk_size(device: torch.device, precision: str) -> int:
    """Images per UNet forward call when not configured.

    GPU: 48 (big calls fill the device). CPU fp32: 1 - measured on a 2-core AVX2 EPYC with the small
    config at 256 px, one pair: 2.4 s with chunk 1 vs 3.3 s with chunk 6 (a single image's activations
    stay in cache); at 128 px the two are within noise. CPU bf16 (AMX): 6, measured fastest there.
    """
    if device.type != "cpu":
        return 48
    return 6 if precision == "bf16" else 1


def _padded_batch(images: list[np.ndarray], ph: int, pw: int) -> torch.Tensor:
    """(H, W) images (each at most ph x pw) -> one (N, 1, ph, pw) batch, reflect-padded at bottom/right."""
    return torch.stack([_pad(y, ph, pw) for y in images])


def _pad(y: np.ndarray, ph: int, pw: int) -> torch.Tensor:
    """(H, W) -> (1, ph, pw) reflect-padded at bottom/right (replicate where reflect cannot reach)."""
    t = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))[None, None]
    h, w = y.shape
    dh, dw = ph - h, pw - w
    if dh or dw:
        mode = "reflect" if dh < h and dw < w else "replicate"
        t = F.pad(t, (0, dw, 0, dh), mode=mode)
    return t[0]
