"""FastPipeline: the ``dmfnet-fast`` network behind the same :class:`~models.inference.fuser.Fuser` as DM-FNet.

Decoding, YCbCr, padding, tiling, cancellation and provenance are the shared code; only
:meth:`FastPipeline.fuse_luma` differs (one network call per chunk instead of UNet features + head).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch

from models.inference.fuser import Fuser, FusionCancelled
from models.inference.hardware import autocast
from models.inference.state import load_state
from models.nets.fast_net import FastConfig, FastFusionNet


class FastPipeline(Fuser):
    """The distilled fast tier; ``fuse`` maps pairs to fused images deterministically."""

    def __init__(self, cfg: FastConfig, net: FastFusionNet, device: str | torch.device = "cpu", **kw) -> None:
        if kw.get("chunk_size") is None:  # pairs per network call
            # CPU: one pair per call, so a pair's bytes never depend on its batch-mates (oneDNN may pick other
            # kernels for another batch size; a probe on a Xeon saw 1-grey-level flips). Measured on the EPYC:
            # 175 pairs/s one by one vs 184 in fours, 5% for exact batch independence.
            kw["chunk_size"] = 1 if torch.device(device).type == "cpu" else 64
        super().__init__(cfg.size_multiple, device, **kw)
        self.cfg = cfg
        self.net = self._frozen(net)

    @staticmethod
    def networks_from(obj: dict) -> tuple[FastConfig, FastFusionNet, dict]:
        """(config, network, metadata) of a ``dmfnet-fast-weights/1`` file's object."""
        cfg = FastConfig.model_validate(obj["config"])
        net = FastFusionNet(cfg)
        load_state(net, obj["net"], "fast network")
        return cfg, net, json.loads(obj.get("meta") or "{}")

    @classmethod
    def from_weights(cls, obj: dict, **kw) -> FastPipeline:
        """The pipeline of a read weights file (models/inference/weights.py checked its checksum and format)."""
        cfg, net, _ = cls.networks_from(obj)
        return cls(cfg, net, **kw)

    def export_graph(self) -> torch.nn.Module:
        """The fast network with the pipeline's final clamp, as one module (ONNX export)."""
        return FastGraph(self)

    @classmethod
    def random_init(cls, cfg: FastConfig | None = None, seed: int = 0, **kw) -> FastPipeline:
        """An untrained, seeded fast network: for tests and speed benchmarks, never for images."""
        torch.manual_seed(seed)
        cfg = cfg or FastConfig()
        net = FastFusionNet(cfg)
        for p in net.out.parameters():  # the zero-initialised output layer would make every output the average
            torch.nn.init.normal_(p, std=0.05)
        return cls(cfg, net, weights_path=f"random:fast (seed {seed})", random_init=True, **kw)

    @property
    def model_name(self) -> str:
        """Always ``dmfnet-fast``."""
        return "dmfnet-fast"

    @property
    def pairs_per_call(self) -> int:
        """Pairs per network call (one image pair per batch item, not 2 x timesteps as in DM-FNet)."""
        return self.chunk_size

    def describe(self) -> dict:
        """Model, device, dtype, weights and the network's size."""
        return {**super().describe(), "config": self.cfg.name, "widths": list(self.cfg.widths),
                "params": sum(p.numel() for p in self.net.parameters())}

    @torch.inference_mode()
    def fuse_luma(
        self, mri_y: torch.Tensor, func_y: torch.Tensor, stop: Callable[[], bool] | None = None
    ) -> torch.Tensor:
        """Fuse (N, 1, H, W) luminances in [0, 1] of one padded size -> fused (N, 1, H, W) in [0, 1]."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        outs = []
        for i in range(0, mri_y.shape[0], self.chunk_size):
            if stop is not None and stop():
                raise FusionCancelled
            a = self._to_device(mri_y[i : i + self.chunk_size]).contiguous(memory_format=fmt)
            b = self._to_device(func_y[i : i + self.chunk_size]).contiguous(memory_format=fmt)
            with autocast(self.device, self.precision):
                outs.append(self.net(a, b).float())
        return torch.cat(outs).clamp(0, 1).cpu()


class FastGraph(torch.nn.Module):
    """The fast network with the pipeline's final clamp."""

    def __init__(self, pipe: FastPipeline) -> None:
        super().__init__()
        self.net = pipe.net

    def forward(self, mri: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) x 2 in [0, 1] -> fused (N, 1, H, W) in [0, 1]."""
        return self.net(mri, other).clamp(0, 1)
