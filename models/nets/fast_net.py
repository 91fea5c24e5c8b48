"""``dmfnet-fast``: a compact fusion network distilled from DM-FNet, for real-time use on a CPU.

Why this shape: on a 2-core CPU the full model's cost is the UNet run 6 times per pair (2 modalities x 3
timesteps, 232 GFLOP at 256 px); only less work makes it faster. This network sees both luminances once
and spends its work at half resolution and below, where convolutions with 32+ channels use the CPU well:

- the two sources are folded 2x2 into channels (pixel unshuffle), so no layer runs at full resolution;
- a three-level encoder/decoder (1/2, 1/4, 1/8) with residual blocks and squeeze-excitation channel
  attention gives a receptive field of about 150 px (contrast decisions need context, as in the teacher);
- the output, unfolded back to full resolution (pixel shuffle), is a per-pixel soft weight w and a detail
  residual r: fused = w * MRI + (1 - w) * other + r. Sharp structure comes straight from the sources, so a
  small network can match the teacher's edges; r carries the teacher's local contrast changes.

With the default (shipped) widths: 0.57 M parameters, 3.1 GFLOP per 256 px pair (the full ``small``
DM-FNet: 84 with ``reuse_timestep``, 232 without).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from models.nets.filters import LocalContrastGain


class FastConfig(BaseModel):
    """Width and depth of the fast network; stored inside its weights file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "fast"
    widths: tuple[int, int, int] = (32, 64, 96)  # channels at 1/2, 1/4, 1/8 resolution
    blocks: tuple[int, int, int] = (1, 1, 2)  # residual blocks per level (encoder side)
    # When set, a third output: a per-pixel gain k on the mix's own local contrast (as the teacher's
    # "mix_gain" head), fused = m + k (m - G * m) + r with G a Gaussian of this many px.
    gain_sigma: float | None = Field(None, gt=0.0, le=4.0)

    @property
    def size_multiple(self) -> int:
        """Inputs are padded to a multiple of this (1/8 resolution at the bottom level)."""
        return 8


class _SqueezeExcite(nn.Module):
    """Channel attention: a per-channel gate from the global average (Hu et al., CVPR 2018)."""

    def __init__(self, ch: int, reduction: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(ch, max(4, ch // reduction), 1)
        self.fc2 = nn.Conv2d(max(4, ch // reduction), ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * g


class _ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.se = _SqueezeExcite(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.se(self.conv2(F.leaky_relu(self.conv1(x), 0.1)))


class FastFusionNet(nn.Module):
    """(MRI luminance, other luminance), each (N, 1, H, W) in [0, 1] -> fused luminance (N, 1, H, W).

    H and W must be multiples of ``cfg.size_multiple``. The output is not clamped (training needs the
    gradient); the pipeline clamps to [0, 1].
    """

    def __init__(self, cfg: FastConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or FastConfig()
        c1, c2, c3 = cfg.widths
        self.stem = nn.Conv2d(2 * 4 + 2 * 4, c1, 3, padding=1)  # unshuffled sources + their 2x2 contrasts
        self.enc1 = nn.Sequential(*[_ResBlock(c1) for _ in range(cfg.blocks[0])])
        self.down2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.enc2 = nn.Sequential(*[_ResBlock(c2) for _ in range(cfg.blocks[1])])
        self.down3 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)
        self.enc3 = nn.Sequential(*[_ResBlock(c3) for _ in range(cfg.blocks[2])])
        self.up2 = nn.Conv2d(c3, c2, 1)
        self.dec2 = nn.Conv2d(c2, c2, 3, padding=1)
        self.up1 = nn.Conv2d(c2, c1, 1)
        self.dec1 = nn.Conv2d(c1, c1, 3, padding=1)
        self.gain = LocalContrastGain(cfg.gain_sigma) if cfg.gain_sigma else None
        # (weight logit, residual[, gain]) per pixel of each 2x2 cell
        self.out = nn.Conv2d(c1, (3 if self.gain else 2) * 4, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)  # starts as the plain average: w = 0.5, r = 0, k = 0

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Fused luminance from the two sources (see the class docstring)."""
        x = torch.cat([a, b], 1) * 2 - 1
        cells = F.pixel_unshuffle(x, 2)  # (N, 8, H/2, W/2)
        contrast = cells - F.avg_pool2d(x, 2).repeat_interleave(4, 1)  # sub-pixel detail of each source
        e1 = self.enc1(F.leaky_relu(self.stem(torch.cat([cells, contrast], 1)), 0.1))
        e2 = self.enc2(F.leaky_relu(self.down2(e1), 0.1))
        e3 = self.enc3(F.leaky_relu(self.down3(e2), 0.1))
        d2 = F.leaky_relu(self.dec2(e2 + self.up2(F.interpolate(e3, scale_factor=2.0, mode="nearest"))), 0.1)
        d1 = F.leaky_relu(self.dec1(e1 + self.up1(F.interpolate(d2, scale_factor=2.0, mode="nearest"))), 0.1)
        wr = F.pixel_shuffle(self.out(d1), 2)  # (N, 2 or 3, H, W)
        w = torch.sigmoid(wr[:, :1])
        mixed = w * a + (1 - w) * b
        if self.gain is None:
            return mixed + wr[:, 1:]
        return self.gain(mixed, wr[:, 2:3]) + wr[:, 1:2]
