"""Noise schedules, SR3's continuous-noise-level forward process, and the Stage I objective."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from models.nets.configs import DiffusionConfig


def make_betas(cfg: DiffusionConfig) -> np.ndarray:
    """Beta schedule: linear (the reference's 1e-6..1e-2 over 2000 steps) or cosine (Nichol & Dhariwal 2021)."""
    if cfg.schedule == "linear":
        return np.linspace(cfg.linear_start, cfg.linear_end, cfg.n_timestep, dtype=np.float64)
    s = 0.008
    steps = np.arange(cfg.n_timestep + 1, dtype=np.float64) / cfg.n_timestep
    f = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return np.clip(1 - f[1:] / f[:-1], 0, 0.999)


class Diffusion:
    """Holds ``sqrt(alpha_bar)`` per step (SR3's ``sqrt_alphas_cumprod_prev``) and samples noisy images."""

    def __init__(self, cfg: DiffusionConfig) -> None:
        self.cfg = cfg
        alphas_cumprod = np.cumprod(1.0 - make_betas(cfg))
        # Index t gives the noise level *before* step t (t=0: clean), as SR3 does.
        self.sqrt_alpha_bar = torch.tensor(np.sqrt(np.append(1.0, alphas_cumprod)), dtype=torch.float32)

    def level(self, t: int) -> float:
        """Continuous noise level sqrt(alpha_bar) used for a fixed timestep at fusion time."""
        return float(self.sqrt_alpha_bar[t])

    def q_sample(self, x0: torch.Tensor, gamma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = gamma * x0 + sqrt(1 - gamma^2) * noise, gamma of shape (B,) or scalar."""
        gamma = torch.as_tensor(gamma, dtype=x0.dtype, device=x0.device).reshape(-1, 1, 1, 1)
        return gamma * x0 + (1 - gamma**2).sqrt() * noise

    def sample_levels(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """SR3 training: t ~ U{1..T}, then gamma ~ U(sqrt_alpha_bar[t], sqrt_alpha_bar[t-1])."""
        t = torch.randint(1, self.cfg.n_timestep + 1, (batch,), generator=generator)
        lo, hi = self.sqrt_alpha_bar[t], self.sqrt_alpha_bar[t - 1]
        u = torch.rand(batch, generator=generator)
        return lo + (hi - lo) * u

    def stage1_loss(
        self, unet: torch.nn.Module, x0: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Stage I loss: noise x0 at a random level; the UNet predicts x0 (reference) or the noise."""
        b = x0.shape[0]
        gamma = self.sample_levels(b, generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        x_t = self.q_sample(x0, gamma, noise)
        pred, _ = unet(x_t, noise_level=gamma)
        target = x0 if self.cfg.objective == "x0" else noise
        pred = pred.float()
        return F.l1_loss(pred, target) if self.cfg.loss == "l1" else F.mse_loss(pred, target)
