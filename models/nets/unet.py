"""SR3-style UNet (Saharia et al. 2021) that can also return its decoder features per scale.

Written from the SR3 / DM-FNet descriptions: residual blocks (GroupNorm, Swish, dropout), optional
sinusoidal noise-level embedding, self-attention at configured resolutions and in the middle block,
skip connections from every encoder block to the decoder.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.nets.configs import UNetConfig


class NoiseLevelEmbedding(nn.Module):
    """Sinusoidal embedding of the continuous noise level (SR3 conditions on sqrt(alpha_bar))."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, noise_level: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        step = torch.arange(half, dtype=noise_level.dtype, device=noise_level.device) / half
        freq = noise_level.unsqueeze(1) * torch.exp(-math.log(1e4) * step.unsqueeze(0))
        return torch.cat([freq.sin(), freq.cos()], dim=-1)


class ResBlock(nn.Module):
    """GroupNorm-Swish-Conv twice with a residual path; adds the noise embedding when present."""

    def __init__(self, dim_in: int, dim_out: int, emb_dim: int | None, groups: int, dropout: float) -> None:
        super().__init__()
        self.emb = nn.Linear(emb_dim, dim_out) if emb_dim else None
        self.block1 = nn.Sequential(nn.GroupNorm(groups, dim_in), nn.SiLU(), nn.Conv2d(dim_in, dim_out, 3, padding=1))
        self.block2 = nn.Sequential(
            nn.GroupNorm(groups, dim_out),
            nn.SiLU(),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Conv2d(dim_out, dim_out, 3, padding=1),
        )
        self.skip = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = self.block1(x)
        if self.emb is not None and emb is not None:
            h = h + self.emb(emb)[:, :, None, None]
        return self.block2(h) + self.skip(x)


class SelfAttention(nn.Module):
    """Single-head spatial self-attention with a residual connection."""

    def __init__(self, dim: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim)
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=False)
        self.out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        y = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.out(y.transpose(-1, -2).reshape(b, c, h, w))


class ResAttnBlock(nn.Module):
    """A residual block, optionally followed by self-attention."""

    def __init__(self, dim_in: int, dim_out: int, emb_dim: int | None, groups: int, dropout: float, attn: bool):
        super().__init__()
        self.res = ResBlock(dim_in, dim_out, emb_dim, groups, dropout)
        self.attn = SelfAttention(dim_out, groups) if attn else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class Downsample(nn.Module):
    """Stride-2 3x3 convolution."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 convolution."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """SR3 UNet. ``forward`` returns the output and, on request, decoder features per scale.

    Decoder feature of level ``l`` (resolution 1/2**l) = output of that level's last residual block,
    before its upsampling; this is the multi-level representation that Stage II fuses.
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ch = cfg.inner_channel
        emb_dim = None
        if cfg.with_noise_level_emb:
            emb_dim = ch
            self.noise_mlp = nn.Sequential(
                NoiseLevelEmbedding(ch), nn.Linear(ch, ch * 4), nn.SiLU(), nn.Linear(ch * 4, ch)
            )
        else:
            self.noise_mlp = None
        g, p = cfg.norm_groups, cfg.dropout
        self.init_conv = nn.Conv2d(cfg.in_channel, ch, 3, padding=1)

        skip_channels = [ch]
        self.down_blocks = nn.ModuleList()  # one ModuleList of blocks per level
        self.downsamples = nn.ModuleList()
        now, res = ch, cfg.image_size
        for level, mult in enumerate(cfg.channel_multiplier):
            out = ch * mult
            blocks = nn.ModuleList()
            for _ in range(cfg.res_blocks):
                blocks.append(ResAttnBlock(now, out, emb_dim, g, p, attn=res in cfg.attn_res))
                skip_channels.append(out)
                now = out
            self.down_blocks.append(blocks)
            if level < cfg.levels - 1:
                self.downsamples.append(Downsample(now))
                skip_channels.append(now)
                res //= 2

        self.mid = nn.ModuleList(
            [ResAttnBlock(now, now, emb_dim, g, p, attn=True), ResAttnBlock(now, now, emb_dim, g, p, attn=False)]
        )

        self.up_blocks = nn.ModuleList()  # ordered coarsest level first
        self.upsamples = nn.ModuleList()
        self.feature_channels: list[int] = [0] * cfg.levels
        for level in reversed(range(cfg.levels)):
            out = ch * cfg.channel_multiplier[level]
            blocks = nn.ModuleList()
            for _ in range(cfg.res_blocks + 1):
                blocks.append(ResAttnBlock(now + skip_channels.pop(), out, emb_dim, g, p, attn=res in cfg.attn_res))
                now = out
            self.up_blocks.append(blocks)
            self.feature_channels[level] = now
            if level > 0:
                self.upsamples.append(Upsample(now))
                res *= 2
        self.final = nn.Sequential(nn.GroupNorm(g, now), nn.SiLU(), nn.Conv2d(now, cfg.out_channel, 3, padding=1))

    def forward(
        self,
        x: torch.Tensor,
        noise_level: torch.Tensor | None = None,
        feature_scales: tuple[int, ...] | None = None,
        return_output: bool = True,
    ) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
        """Run the UNet.

        Args:
            x: (B, in_channel, H, W), H and W multiples of ``cfg.size_multiple``.
            noise_level: (B,) continuous sqrt(alpha_bar); used only with the noise-level embedding.
            feature_scales: decoder levels to return (0 = full resolution); None returns none.
            return_output: compute the final output conv (skip it when only features are needed).

        Returns:
            (output or None, {level: decoder feature}).
        """
        m = self.cfg.size_multiple
        if x.shape[-1] % m or x.shape[-2] % m:
            raise ValueError(f"input size {tuple(x.shape[-2:])} must be a multiple of {m}")
        emb = None
        if self.noise_mlp is not None:
            if noise_level is None:
                raise ValueError("this UNet has a noise-level embedding: pass noise_level")
            emb = self.noise_mlp(noise_level.reshape(-1).to(x.dtype))
        wanted = set(feature_scales or ())
        h = self.init_conv(x)
        skips = [h]
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = block(h, emb)
                skips.append(h)
            if level < self.cfg.levels - 1:
                h = self.downsamples[level](h)
                skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        feats: dict[int, torch.Tensor] = {}
        finest_needed = min(wanted) if wanted and not return_output else 0
        for i, blocks in enumerate(self.up_blocks):
            level = self.cfg.levels - 1 - i
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if level in wanted:
                feats[level] = h
            # Levels finer than every requested feature are wasted work when the output is not needed.
            if level == finest_needed and not return_output:
                return None, feats
            if level > 0:
                h = self.upsamples[i](h)
        return self.final(h), feats
