"""Fuser: what every torch fusion model shares, whatever its network and runtime.

Tiling, padding, colour, cancellation and provenance are :class:`~models.inference.luma_fusion.LumaFuser`'s
(torch-free); this adds the device and precision, and the padded batch's call: torch, or the exported graph on
another runtime (:mod:`models.inference.runtimes`). A model (:mod:`models.inference.pipeline`,
:mod:`models.inference.fast_pipeline`) implements only ``fuse_luma`` for one padded batch of luminances.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from models.inference.hardware import resolve_channels_last, resolve_precision
from models.inference.luma_fusion import Alive, FusionCancelled, LumaFuser
from models.inference.tiling import DEFAULT_OVERLAP, DEFAULT_TILE

__all__ = ["Alive", "Fuser", "FusionCancelled", "default_chunk_size"]


class Fuser(LumaFuser):
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
        super().__init__(size_multiple, weights_path, weights_sha256, tile_size, tile_overlap)
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.channels_last = resolve_channels_last(channels_last, self.precision)
        self.chunk_size = chunk_size or default_chunk_size(self.device, self.precision)
        self.random_init = random_init
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

    def _fuse_padded(self, mri_y: np.ndarray, func_y: np.ndarray, stop: Callable[[], bool]) -> np.ndarray:
        """:meth:`fuse_luma` on torch, or the exported graph on the chosen runtime, pair by pair -> (N, 1, H, W)."""
        a, b = torch.from_numpy(mri_y), torch.from_numpy(func_y)
        if self._graph is None:
            return self.fuse_luma(a, b, stop=stop).numpy()
        graph = self._graph

        def run_one(i: int) -> np.ndarray:
            return graph({k: v.numpy() for k, v in self.graph_feeds(a[i : i + 1], b[i : i + 1]).items()})

        return self._pair_by_pair(a.shape[0], run_one, stop)


def default_chunk_size(device: torch.device, precision: str) -> int:
    """Images per UNet forward call when not configured.

    GPU: 48 (big calls fill the device). CPU fp32: 1 - measured on a 2-core AVX2 EPYC with the small
    config at 256 px, one pair: 2.4 s with chunk 1 vs 3.3 s with chunk 6 (a single image's activations
    stay in cache); at 128 px the two are within noise. CPU bf16 (AMX): 6, measured fastest there.
    """
    if device.type != "cpu":
        return 48
    return 6 if precision == "bf16" else 1
