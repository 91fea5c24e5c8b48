"""Stage II fusion head: per-scale timestep merge, the three fusion modules, output head.

Follows DM-FNet (He et al., IEEE TMM 2025): (1) an attention module on a+b that combines spatial,
channel and pixel attention into a per-pixel, per-channel weight w; (2) cross-modal fusion
w*a + (1-w)*b + a + b; (3) multi-scale aggregation from coarse to fine; conv + tanh output.
With ``FusionConfig.output == "mix"`` the output convs predict a per-pixel weight and residual over the
sources instead, and with "mix_gain" also a per-pixel gain on the mix's local contrast (see
:meth:`FusionHead.forward`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.nets.configs import FusionConfig
from models.nets.filters import LocalContrastGain


def _groups(ch: int) -> int:
    """Largest GroupNorm group count <= 8 dividing ``ch``."""
    return next(g for g in (8, 4, 2, 1) if ch % g == 0)


class TimestepMerge(nn.Module):
    """Concatenated features of all timesteps -> norm, 1x1 conv, 3x3 conv, ReLU (shared by both modalities)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.GroupNorm(_groups(in_ch), in_ch),
            nn.Conv2d(in_ch, out_ch, 1),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SpatialAttention(nn.Module):
    """Mean- and max-pooled channel maps -> 7x7 conv -> one weight map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1))


class ChannelAttention(nn.Module):
    """Global average pooling -> bottleneck -> per-channel weight."""

    def __init__(self, ch: int, reduction: int = 4) -> None:
        super().__init__()
        mid = max(ch // reduction, 4)
        self.net = nn.Sequential(nn.Conv2d(ch, mid, 1), nn.ReLU(inplace=True), nn.Conv2d(mid, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.mean((2, 3), keepdim=True))


class PixelAttention(nn.Module):
    """Grouped 7x7 conv over (feature, coarse attention) per channel -> sigmoid weight."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2 * ch, ch, 7, padding=3, groups=ch)

    def forward(self, x: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # Interleave so that each group sees (x_c, coarse_c) for its own channel c.
        pair = torch.stack([x, coarse.expand_as(x)], dim=2).reshape(b, 2 * c, h, w)
        return torch.sigmoid(self.conv(pair))


class CrossModalFusion(nn.Module):
    """Fusion modules (1) and (2): attention weight w from a+b, then w*a + (1-w)*b + a + b."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.spatial = SpatialAttention()
        self.channel = ChannelAttention(ch)
        self.pixel = PixelAttention(ch)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        s = a + b
        w = self.pixel(s, self.spatial(s) + self.channel(s))
        return w * a + (1 - w) * b + s


class ConvBlock(nn.Module):
    """3x3 conv, GroupNorm, ReLU, twice."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(ch, ch, 3, padding=1),
            nn.GroupNorm(_groups(ch), ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(ch, ch, 3, padding=1),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FusionHead(nn.Module):
    """Fuses per-scale, per-timestep UNet decoder features of two modalities into luminance in [-1, 1]."""

    def __init__(self, cfg: FusionConfig, feature_channels: list[int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.scales = tuple(sorted(cfg.scales))  # fine -> coarse
        ch, n_t = cfg.head_channels, len(cfg.timesteps)
        self.merge = nn.ModuleDict({str(s): TimestepMerge(feature_channels[s] * n_t, ch) for s in self.scales})
        self.fuse = nn.ModuleDict({str(s): CrossModalFusion(ch) for s in self.scales})
        self.aggregate = nn.ModuleDict({str(s): ConvBlock(ch) for s in self.scales})
        self.mix = cfg.output in ("mix", "mix_gain")
        first = nn.Conv2d(ch, ch, 3, padding=1)  # made before the last: seeded random heads stay as they were
        last = nn.Conv2d(ch, 2 if self.mix else 1, 3, padding=1)
        if self.mix:  # starts as the plain average of the sources: w = 0.5, r = 0
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.out = nn.Sequential(first, nn.LeakyReLU(0.2, inplace=True), last, *([] if self.mix else [nn.Tanh()]))
        # "mix_gain": k from the same hidden layer, its own conv (zero: k = 0) so a mix head's weights load as
        # they are and a run can train the gain alone (Stage2Config.train_only).
        self.gain = LocalContrastGain(cfg.gain_sigma) if cfg.output == "mix_gain" else None
        self.gain_out = nn.Conv2d(ch, 1, 3, padding=1) if self.gain is not None else None
        if self.gain_out is not None:
            nn.init.zeros_(self.gain_out.weight)
            nn.init.zeros_(self.gain_out.bias)

    def forward(self, feats_a: dict[int, torch.Tensor], feats_b: dict[int, torch.Tensor],
                a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``feats_x[scale]``: (B, T*C_scale, H/2**s, W/2**s), timesteps concatenated on channels; ``a``, ``b``:
        the source luminances (B, 1, H, W) in [-1, 1] (used by the "mix" outputs only). Returns the fused
        luminance in [-1, 1] (the "mix" outputs are not clamped: training needs the gradient)."""
        coarser: torch.Tensor | None = None
        for s in reversed(self.scales):  # coarse -> fine (module 3: multi-scale aggregation)
            merge = self.merge[str(s)]
            fused = self.fuse[str(s)](merge(feats_a[s]), merge(feats_b[s]))
            if coarser is not None:
                fused = fused + F.interpolate(coarser, size=fused.shape[-2:], mode="bilinear", align_corners=False)
            coarser = self.aggregate[str(s)](fused)
        assert coarser is not None
        if self.gain_out is None:
            out = self.out(coarser)
        else:
            hidden = self.out[1](self.out[0](coarser))
            out = torch.cat([self.out[2](hidden), self.gain_out(hidden)], 1)
        finest = self.scales[0]
        if finest > 0:  # features did not reach full resolution: upsample the prediction
            out = F.interpolate(out, scale_factor=2.0**finest, mode="bilinear", align_corners=False)
        if not self.mix:
            return out
        out = out.float()  # mixed in fp32 under bf16 autocast: a bf16 mix would cost ~1 grey level
        w = torch.sigmoid(out[:, :1])
        mixed = w * a.float() + (1 - w) * b.float()
        if self.gain is None:
            return mixed + out[:, 1:]
        return self.gain(mixed, out[:, 2:3]) + out[:, 1:2]
