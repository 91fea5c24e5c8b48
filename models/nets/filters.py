"""Fixed Gaussian filters shared by the networks and the loss, and the learned sharpening gain built on them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kernel_1d(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps (odd), centred."""
    r = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def separable_blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """x (B,1,H,W) filtered by the 1-D kernel ``g`` along W then H, reflect-padded (len(g) // 2 < H, W)."""
    r, g = len(g) // 2, g.to(x)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), g.reshape(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), g.reshape(1, 1, -1, 1))


class LocalContrastGain(nn.Module):
    """x + k (x - G_sigma * x), k = 2 tanh(logit) per pixel (|k| < 2; k < 0 smooths): a learned unsharp mask.

    The kernel is a fixed buffer (radius 3 sigma), so the op exports to ONNX as two convolutions; reflect padding
    needs H and W larger than that radius.
    """

    def __init__(self, sigma: float) -> None:
        super().__init__()
        radius = max(1, round(3 * sigma))
        self.register_buffer("kernel", gaussian_kernel_1d(2 * radius + 1, sigma), persistent=False)  # not saved

    def detail(self, x: torch.Tensor) -> torch.Tensor:
        """x - G_sigma * x: what the gain scales."""
        return x - separable_blur(x, self.kernel)

    def forward(self, x: torch.Tensor, logit: torch.Tensor) -> torch.Tensor:
        return x + 2.0 * torch.tanh(logit) * self.detail(x)
