"""FastPipeline: the ``dmfnet-fast`` network behind the same :class:`~models.inference.fuser.Fuser` as DM-FNet.

Decoding, YCbCr, padding, tiling, cancellation and provenance are the shared code; only
:meth:`FastPipeline.fuse_luma` differs (one network call per chunk instead of UNet features + head).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.inference.fuser import Fuser, FusionCancelled
from models.inference.hardware import autocast
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
