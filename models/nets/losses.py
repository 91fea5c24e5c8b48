"""Hybrid Stage II loss (no ground truth): intensity, gradient detail, local contrast and SSIM structure terms.

Colour is preserved by construction: the network fuses luminance only, and the functional image's
Cb/Cr are re-attached (models/images/imaging.py). Images here are luminance in [0, 1].
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from models.nets.filters import gaussian_kernel_1d, separable_blur

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
# How much steeper than its source an edge may be and still count as that source's edge (sharpening), in the
# Speckle metric and the loss term that shares its code.
SPECKLE_MAX_GAIN = 2.0


class IntensityTarget(BaseModel):
    """What the intensity term pulls F toward; the defaults give max(A, B) exactly.

    A soft maximum (per-pixel weight sigmoid(softness * (A - B)) on A) keeps some of the dimmer source
    where the two are close, then a tone curve: blend with smoothstep (mid-tone contrast), gain, and a
    tanh roll-off above ``knee`` instead of hard clipping (so bright bone keeps its texture).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    softness: float | None = Field(None, gt=0)  # None: hard max
    s_curve: float = Field(0.0, ge=-1, le=1)
    gain: float = Field(1.0, gt=0)
    knee: float = Field(1.0, gt=0, le=1)
    # Local contrast (#46, MRI-CT): m + unsharp * (m - Gaussian(m, unsharp_sigma)) after the tone curve. On the
    # MRI-CT validation pairs, usm(0.5 v9 + 0.5 max, sigma 3, amount 0.5) is the one image found that beats every
    # peer on >= 6 of 9 and both baselines on 5 with SSIM and Speckle in bound (scripts/ct_target_probe.py); heads
    # trained toward it took up the max, not the sharpening (model card, v10).
    unsharp: float = Field(0.0, ge=0, le=2)
    unsharp_sigma: float = Field(3.0, gt=0, le=8)


def intensity_target(a: torch.Tensor, b: torch.Tensor, t: IntensityTarget) -> torch.Tensor:
    """The intensity term's target for sources a, b in [0, 1] (see IntensityTarget)."""
    if t.softness is None:
        m = torch.maximum(a, b)
    else:
        w = torch.sigmoid(t.softness * (a - b))
        m = w * a + (1 - w) * b
    m = (1 - t.s_curve) * m + t.s_curve * m * m * (3 - 2 * m)
    m = m * t.gain
    if t.knee < 1:
        roll = t.knee + (1 - t.knee) * torch.tanh((m - t.knee) / (1 - t.knee))
        m = torch.where(m > t.knee, roll, m)
    if t.unsharp > 0:
        m = m + t.unsharp * (m - gaussian_blur(m, t.unsharp_sigma))
    return m.clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (radius 3 sigma, reflect-padded, clipped to the image) of x (B,1,H,W)."""
    radius = max(1, min(round(3 * sigma), x.shape[-1] - 1, x.shape[-2] - 1))
    return separable_blur(x, gaussian_kernel_1d(2 * radius + 1, sigma))


class LossWeights(BaseModel):
    """Weights of the hybrid loss terms (defaults documented in the README)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    intensity: float = 1.0
    intensity_target: IntensityTarget = Field(default_factory=IntensityTarget)
    gradient: float = 10.0
    ssim: float = 1.0
    # "magnitude": |grad F| toward max(|grad A|, |grad B|) (sign-blind: an inverted image scores the same,
    # and at gradient weight 10 Stage II converged to inverted images). "signed": each Sobel component of F
    # toward the component of whichever source has the larger gradient magnitude there, so inversion costs.
    # "intensity": the Sobel components of the intensity target itself (with a tone curve, the gradients
    # of the image the intensity term asks for; with the plain max, those of max(A, B)).
    gradient_target: Literal["magnitude", "signed", "intensity"] = "magnitude"
    # The gradient target times this gain. Above 1 the head is asked for edges steeper than the stronger
    # source's, at the sources' own edges and in their direction (where both sources are flat the target
    # stays 0), i.e. sharpening that cannot put detail where neither source has any.
    gradient_gain: float = Field(1.0, ge=0.5, le=2.0)
    # Local contrast: F's standard deviation in a 9x9 window toward the larger of the sources' there. The
    # gradient term alone let a sharper head trade contrast for edges (SD 86.1 -> 83.5 on MRI-CT at gradient
    # weight 20); this asks for the sources' own regional contrast, so it cannot be met by speckle.
    contrast: float = 0.0
    # Unexplained gradient (the Speckle metric's per-pixel residual, see unexplained_gradient): F's Sobel
    # gradient that no mix c_a grad A + c_b grad B, 0 <= c <= 2, explains. Steeper edges in the sources'
    # direction cost nothing here; speckle, halos, ringing and gradient against a source edge do.
    speckle: float = Field(0.0, ge=0)
    # Local detail (#46, MRI-CT): F's detail layer (F minus its 9x9 local mean) toward the detail layer of
    # whichever source has the larger local contrast there, times ``detail_gain``. Unlike ``contrast`` (a
    # sign-blind standard deviation, which speckle can meet) the target is the stronger source's own signed
    # structure, regional rather than per edge, and a scaled copy of a source's structure is what the Speckle
    # term's mixes (c up to 2) explain: the two do not pull against each other.
    detail: float = Field(0.0, ge=0)
    detail_gain: float = Field(1.0, ge=0.5, le=2.0)


def sobel(x: torch.Tensor) -> torch.Tensor:
    """Sobel (dx, dy) as two channels, replicate-padded; x (B,1,H,W) -> (B,2,H,W)."""
    k = torch.stack([_SOBEL_X, _SOBEL_X.t()]).unsqueeze(1).to(x)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k)


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """|dx| + |dy| with Sobel kernels, replicate-padded; x (B,1,H,W)."""
    return sobel(x).abs().sum(1, keepdim=True)


def gradient_loss(
    fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor, target: str = "magnitude", gain: float = 1.0
) -> torch.Tensor:
    """L1 between the fused image's Sobel gradients and ``gain`` x the stronger source's (see LossWeights)."""
    if target == "magnitude":
        return F.l1_loss(sobel_magnitude(fused), gain * torch.maximum(sobel_magnitude(a), sobel_magnitude(b)))
    ga, gb = sobel(a), sobel(b)
    pick_a = ga.abs().sum(1, keepdim=True) >= gb.abs().sum(1, keepdim=True)
    return F.l1_loss(sobel(fused), gain * torch.where(pick_a, ga, gb))


def unexplained_gradient(grad_f: torch.Tensor, grad_a: torch.Tensor, grad_b: torch.Tensor,
                         cap: float = SPECKLE_MAX_GAIN, eps: float = 0.0) -> torch.Tensor:
    """Per pixel, min over 0 <= c_a, c_b <= cap of |grad_f - c_a grad_a - c_b grad_b|; gradients (..., 2, H, W)
    with (dx, dy) on dim -3, result (..., H, W). One implementation for the Speckle metric (float64, eps 0) and
    the loss term (eps > 0 keeps the square root differentiable where the residual is 0).

    A 2-D box-constrained least squares: the interior optimum where it lies in the box, else the best of the
    box's four edges (one coefficient fixed at 0 or cap, the other's 1-D optimum clipped). The coefficients are
    chosen without autograd: at the optimum the residual's derivative in them vanishes or they sit on the box,
    so the gradient reaching grad_f is the same and nothing divides by a vanishing source gradient."""
    (ax, ay), (bx, by), (fx, fy) = grad_a.unbind(-3), grad_b.unbind(-3), grad_f.unbind(-3)

    def residual(ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
        rx, ry = fx - ca * ax - cb * bx, fy - ca * ay - cb * by
        return torch.sqrt(rx * rx + ry * ry + eps)

    def safe(d: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, d, torch.ones_like(d))

    with torch.no_grad():
        aa, bb, ab = ax * ax + ay * ay, bx * bx + by * by, ax * bx + ay * by
        fa, fb = fx * ax + fy * ay, fx * bx + fy * by
        zero = torch.zeros_like(aa)
        coeffs = [(zero, zero)]
        for fixed in (0.0, cap):  # where a source is flat (aa = 0) its products are 0 too: the optimum is c = 0
            coeffs.append((((fa - fixed * ab) / safe(aa, aa > 0)).clamp(0, cap), zero + fixed))
            coeffs.append((zero + fixed, ((fb - fixed * ab) / safe(bb, bb > 0)).clamp(0, cap)))
        det = aa * bb - ab * ab
        regular = det > 1e-9 * aa * bb
        ca, cb = (fa * bb - fb * ab) / safe(det, regular), (fb * aa - fa * ab) / safe(det, regular)
        inside = regular & (ca >= 0) & (ca <= cap) & (cb >= 0) & (cb <= cap)
        coeffs.append((torch.where(inside, ca, zero), torch.where(inside, cb, zero)))
        ca_all, cb_all = torch.stack([c for c, _ in coeffs]), torch.stack([c for _, c in coeffs])
        best = residual(ca_all, cb_all).argmin(0, keepdim=True)
        ca, cb = ca_all.gather(0, best)[0], cb_all.gather(0, best)[0]
    return residual(ca, cb)


def speckle_loss(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean unexplained gradient of the fused image (see :func:`unexplained_gradient`); x (B,1,H,W) in [0, 1]."""
    return unexplained_gradient(sobel(fused), sobel(a), sobel(b), eps=1e-10).mean()


def local_mean(x: torch.Tensor, size: int = 9) -> torch.Tensor:
    """Mean in a size x size window around each pixel (replicate-padded); x (B,1,H,W)."""
    pad = size // 2
    return F.avg_pool2d(F.pad(x, (pad, pad, pad, pad), mode="replicate"), size, stride=1)


def local_std(x: torch.Tensor, size: int = 9) -> torch.Tensor:
    """Standard deviation in a size x size window around each pixel (replicate-padded); x (B,1,H,W)."""
    mean = local_mean(x, size)
    return (local_mean(x * x, size) - mean * mean).clamp_min(0).add(1e-6).sqrt()


def contrast_loss(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the fused image's local standard deviation and the larger of the two sources'."""
    return F.l1_loss(local_std(fused), torch.maximum(local_std(a), local_std(b)))


def detail_layer(x: torch.Tensor, size: int = 9) -> torch.Tensor:
    """x minus its size x size local mean: the regional structure; x (B,1,H,W)."""
    return x - local_mean(x, size)


def detail_loss(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """L1 between F's detail layer and ``gain`` x the detail layer of the source with more local contrast."""
    stronger = torch.where(local_std(a) >= local_std(b), detail_layer(a), detail_layer(b))
    return F.l1_loss(detail_layer(fused), gain * stronger)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004, 11x11 Gaussian window, sigma 1.5, valid region) per item; x,y (B,1,H,W)."""
    x, y = x.float(), y.float()
    g = gaussian_kernel_1d().to(x.device)
    # The five local statistics filtered together: one grouped separable convolution pair.
    maps = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    maps = F.conv2d(maps, g.reshape(1, 1, 1, -1).expand(5, 1, 1, -1), groups=5)
    mu_x, mu_y, exx, eyy, exy = F.conv2d(maps, g.reshape(1, 1, -1, 1).expand(5, 1, -1, 1), groups=5).unbind(1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    sxx, syy, sxy = exx - mu_x**2, eyy - mu_y**2, exy - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.mean((1, 2))


def hybrid_loss(
    fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor, weights: LossWeights | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts. fused, a, b: luminance (B,1,H,W) in [0, 1], a = MRI, b = other."""
    w = weights or LossWeights()
    fused, a, b = fused.float(), a.float(), b.float()
    target = intensity_target(a, b, w.intensity_target)
    l_int = F.l1_loss(fused, target)
    if w.gradient_target == "intensity":
        l_grad = F.l1_loss(sobel(fused), w.gradient_gain * sobel(target))
    else:
        l_grad = gradient_loss(fused, a, b, w.gradient_target, w.gradient_gain)
    l_ssim = (2 - ssim(fused, a) - ssim(fused, b)).mean() / 2
    total = w.intensity * l_int + w.gradient * l_grad + w.ssim * l_ssim
    parts = {"intensity": l_int.item(), "gradient": l_grad.item(), "ssim": l_ssim.item()}
    if w.contrast:
        l_con = contrast_loss(fused, a, b)
        total = total + w.contrast * l_con
        parts["contrast"] = l_con.item()
    if w.detail:
        l_det = detail_loss(fused, a, b, w.detail_gain)
        total = total + w.detail * l_det
        parts["detail"] = l_det.item()
    if w.speckle:
        l_sp = speckle_loss(fused, a, b)
        total = total + w.speckle * l_sp
        parts["speckle"] = l_sp.item()
    return total, parts
