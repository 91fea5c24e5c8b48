import numpy as np
import pytest
import torch

from models.nets.configs import DiffusionConfig, get_config
from models.nets.diffusion import Diffusion, make_betas
from models.nets.losses import (
    IntensityTarget,
    LossWeights,
    gaussian_blur,
    gradient_loss,
    hybrid_loss,
    intensity_target,
    sobel_magnitude,
    ssim,
)
from models.nets.unet import UNet


def test_linear_schedule_is_the_references():
    b = make_betas(DiffusionConfig())
    assert len(b) == 2000 and b[0] == 1e-6 and np.isclose(b[-1], 1e-2)
    c = make_betas(DiffusionConfig(schedule="cosine"))
    assert len(c) == 2000 and np.all(np.diff(c[:-10]) >= -1e-12)


def test_noise_levels_monotone_and_q_sample():
    d = Diffusion(DiffusionConfig())
    levels = d.sqrt_alpha_bar
    assert levels[0] == 1.0 and torch.all(levels[1:] <= levels[:-1])
    x0, noise = torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    torch.testing.assert_close(d.q_sample(x0, 0.5, noise), torch.full_like(x0, 0.5))
    assert 0.98 < d.level(20) < 1.0  # the fusion timesteps add only a little noise


def test_stage1_loss_objectives_and_gradients():
    cfg = get_config("tiny")
    unet = UNet(cfg.unet)
    x0 = torch.rand(2, 1, 16, 16) * 2 - 1
    for objective in ("x0", "eps"):
        d = Diffusion(DiffusionConfig(objective=objective, loss="l2"))
        loss = d.stage1_loss(unet, x0, torch.Generator().manual_seed(0))
        loss.backward()
        assert loss.item() > 0 and unet.init_conv.weight.grad is not None


def test_ssim_and_sobel():
    x = torch.rand(1, 1, 32, 32)
    assert torch.allclose(ssim(x, x), torch.ones(1))
    assert ssim(x, torch.rand(1, 1, 32, 32)).item() < 0.5
    assert sobel_magnitude(torch.ones(1, 1, 8, 8)).abs().max() == 0


def test_hybrid_loss_prefers_informative_fusion():
    a = torch.zeros(1, 1, 32, 32)
    a[..., 8:24, 8:24] = 1.0
    b = torch.full((1, 1, 32, 32), 0.3)
    good, parts = hybrid_loss(torch.maximum(a, b), a, b)
    bad, _ = hybrid_loss(torch.zeros_like(a), a, b)
    assert good < bad
    assert set(parts) == {"intensity", "gradient", "ssim"}


def test_signed_gradient_target_penalises_inversion_the_magnitude_target_does_not():
    a = torch.zeros(1, 1, 32, 32)
    a[..., 8:24, 8:24] = 1.0
    b = torch.zeros(1, 1, 32, 32)
    b[..., :, 16:] = 0.2  # a weaker edge elsewhere
    inverted = 1.0 - a
    # sign-blind: the inverted image scores exactly as well as the right one
    assert torch.isclose(gradient_loss(inverted, a, b, "magnitude"), gradient_loss(a, a, b, "magnitude"))
    assert gradient_loss(inverted, a, b, "signed") > 10 * gradient_loss(a, a, b, "signed")


def test_gradient_gain_asks_for_steeper_edges_only_where_a_source_has_one():
    a = torch.zeros(1, 1, 32, 32)
    a[..., 8:24, 8:24] = 0.5
    b = torch.zeros(1, 1, 32, 32)
    for target in ("signed", "magnitude"):
        # At gain 1 the source itself is the optimum; at 1.4 an image with 1.4x its edges is, not the source.
        assert float(gradient_loss(a, a, b, target)) == 0.0
        steeper = 1.4 * a
        assert float(gradient_loss(steeper, a, b, target, gain=1.4)) < 1e-6 < float(gradient_loss(a, a, b, target, 1.4))
        # Speckle where both sources are flat costs as much at gain 1.4 as at gain 1: the gain adds no
        # reward for detail the sources do not have.
        speckle = a.clone()
        speckle[..., 26:30, 26:30] += 0.1 * torch.tensor([[1.0, -1.0, 1.0, -1.0]] * 4)
        extra = float(gradient_loss(speckle, a, b, target, 1.4) - gradient_loss(a, a, b, target, 1.4))
        at_gain_1 = float(gradient_loss(speckle, a, b, target) - gradient_loss(a, a, b, target))
        assert extra > 0 and abs(extra - at_gain_1) < 1e-6
    with pytest.raises(ValueError):
        LossWeights(gradient_gain=3.0)


def test_intensity_target_defaults_to_max_and_the_tone_curve_behaves():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 16, 16, generator=g), torch.rand(2, 1, 16, 16, generator=g)
    assert torch.equal(intensity_target(a, b, IntensityTarget()), torch.maximum(a, b))
    soft = intensity_target(a, b, IntensityTarget(softness=4.0))
    # A soft maximum lies between the two sources, below the hard max where they differ.
    assert bool((soft <= torch.maximum(a, b) + 1e-6).all() and (soft >= torch.minimum(a, b) - 1e-6).all())
    assert float((torch.maximum(a, b) - soft).mean()) > 0.01
    x = torch.linspace(0, 1, 101).reshape(1, 1, 1, -1)
    zero = torch.zeros_like(x)
    bright = intensity_target(x, zero, IntensityTarget(gain=1.3, knee=0.9))
    clipped = intensity_target(x, zero, IntensityTarget(gain=1.3))
    # Monotone, in [0, 1]; the knee keeps highlights apart that plain gain would clip to 1.
    assert bool((bright.diff(dim=-1) >= 0).all()) and float(bright.max()) <= 1.0
    assert int((clipped == 1).sum()) > 20 and int((bright == 1).sum()) <= 1
    # The S-curve darkens below mid-grey and brightens above it.
    s = intensity_target(x, zero, IntensityTarget(s_curve=0.5))
    assert float(s[..., 25]) < 0.25 < 0.75 < float(s[..., 75])
    with pytest.raises(ValueError):
        IntensityTarget(knee=1.5)


def test_gaussian_blur_is_scipys_mirror_filter():
    from scipy import ndimage

    x = torch.rand(1, 1, 40, 33, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = gaussian_blur(x, 3.0)[0, 0].numpy()
    ref = ndimage.gaussian_filter(x[0, 0].numpy(), 3.0, mode="mirror", truncate=3.0)
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_unsharp_target_steepens_a_step_and_leaves_flat_regions():
    step = torch.zeros(1, 1, 32, 64)
    step[..., 32:] = 0.6
    zero = torch.zeros_like(step)
    plain = intensity_target(step, zero, IntensityTarget())
    sharp = intensity_target(step, zero, IntensityTarget(unsharp=0.5, unsharp_sigma=2.0))
    # Overshoot on the bright side, undershoot (clamped at 0) on the dark side, nothing far from the edge.
    assert float(sharp[0, 0, 16, 32]) > 0.6 + 0.05 and float(sharp[0, 0, 16, 31]) == 0.0
    assert torch.equal(sharp[..., :20], plain[..., :20]) and torch.allclose(sharp[..., 44:], plain[..., 44:])
    assert bool(((sharp >= 0) & (sharp <= 1)).all())
    with pytest.raises(ValueError):
        IntensityTarget(unsharp=-0.1)


def test_hybrid_loss_uses_the_configured_intensity_target():
    a = torch.zeros(1, 1, 32, 32)
    a[..., 8:24, 8:24] = 0.6
    b = torch.full((1, 1, 32, 32), 0.3)
    target = IntensityTarget(gain=1.5)
    weights = LossWeights(intensity_target=target)
    _, at_max = hybrid_loss(torch.maximum(a, b), a, b, weights)
    _, at_target = hybrid_loss(intensity_target(a, b, target), a, b, weights)
    assert at_target["intensity"] == 0.0 < at_max["intensity"]
    # gradient_target "intensity": the target image has no gradient loss either; max(A, B) has some.
    follow = LossWeights(intensity_target=target, gradient_target="intensity")
    assert hybrid_loss(intensity_target(a, b, target), a, b, follow)[1]["gradient"] == 0.0
    assert hybrid_loss(torch.maximum(a, b), a, b, follow)[1]["gradient"] > 0.0


def test_contrast_term_asks_for_the_sources_regional_contrast():
    """Local standard deviation toward the larger source's: zero for F = the busier source everywhere, positive for
    a flat F or an average (which halves the contrast where only one source has it); off by default."""
    from models.nets.losses import contrast_loss, local_std

    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 32, 32, generator=g)
    b = torch.full_like(a, 0.3)
    assert contrast_loss(a, a, b).item() < 1e-6
    assert contrast_loss(torch.full_like(a, 0.5), a, b) > contrast_loss((a + b) / 2, a, b) > 0.01
    assert torch.allclose(local_std(b), torch.full_like(b, 1e-3), atol=1e-4)  # sqrt(1e-6): flat
    _, parts = hybrid_loss(a, a, b)
    assert "contrast" not in parts
    total, parts = hybrid_loss(b, a, b, LossWeights(contrast=2.0))
    base, _ = hybrid_loss(b, a, b)
    assert parts["contrast"] > 0 and torch.isclose(total, base + 2.0 * parts["contrast"])


def test_detail_term_asks_for_the_stronger_sources_own_signed_structure():
    """Detail layer toward the busier source's, region by region: zero for F = that source (and, with gain 1.5,
    for 1.5x its structure on any mean), positive for an inverted or flat F, speckle or the weaker source's
    structure; the Speckle term explains the scaled copy (it is a source's gradient times 1.5); off by default."""
    from models.nets.losses import detail_loss, speckle_loss

    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 1, 32, 32, generator=g)  # busy everywhere (the CT's bone, the MR's texture)
    b = 0.5 + 0.05 * torch.rand(1, 1, 32, 32, generator=g)  # nearly flat
    assert detail_loss(a, a, b).item() < 1e-6
    sharper = 0.2 + 1.5 * a  # 1.5x the structure of a, another mean
    assert detail_loss(sharper, a, b, gain=1.5).item() < 1e-5
    assert speckle_loss(sharper / sharper.max(), a, b).item() < 1e-4
    inverted, flat, weaker = 1 - a, torch.full_like(a, 0.5), b
    noisy = a + 0.1 * torch.randn(1, 1, 32, 32, generator=g)
    for wrong in (inverted, flat, weaker, noisy):
        assert detail_loss(wrong, a, b).item() > 0.02
    _, parts = hybrid_loss(a, a, b)
    assert "detail" not in parts
    total, parts = hybrid_loss(b, a, b, LossWeights(detail=3.0))
    base, _ = hybrid_loss(b, a, b)
    assert parts["detail"] > 0 and torch.isclose(total, base + 3.0 * parts["detail"])


def test_speckle_term_is_the_metrics_own_code_and_trains_speckle_away():
    """The loss term and the Speckle metric share unexplained_gradient: on the same image the loss (0-1 data) is
    the metric (0-255) / 255. Blends and steeper edges cost nothing; noise costs; a few descent steps on the term
    alone remove most of the noise, with finite gradients where a source is flat; off by default."""
    from models.evaluation.metrics import speckle
    from models.nets.losses import speckle_loss

    size = 48
    yy, xx = np.mgrid[0:size, 0:size]
    a = np.where((abs(yy - 24) < 12) & (abs(xx - 24) < 12), 200.0, 40.0) + 10 * np.sin(xx / 5)
    b = np.where(xx < 30, 90.0, 20.0)  # flat on either side of one edge
    noisy = 0.4 * a + 0.6 * b + np.random.default_rng(1).normal(0, 4, (size, size))
    t = [torch.tensor(x / 255, dtype=torch.float32)[None, None] for x in (a, b, noisy)]
    assert speckle_loss(t[2], t[0], t[1]).item() * 255 == pytest.approx(speckle(a, b, noisy), rel=1e-3)
    assert speckle_loss(1.7 * (0.4 * t[0] + 0.6 * t[1]), t[0], t[1]).item() < 1e-4
    f = t[2].clone().requires_grad_(True)
    opt = torch.optim.Adam([f], lr=2e-3)
    start = speckle_loss(f, t[0], t[1]).item()
    for _ in range(60):
        opt.zero_grad()
        loss = speckle_loss(f, t[0], t[1])
        loss.backward()
        assert torch.isfinite(f.grad).all()
        opt.step()
    assert speckle_loss(f, t[0], t[1]).item() < 0.5 * start
    _, parts = hybrid_loss(t[2], t[0], t[1])
    assert "speckle" not in parts
    total, parts = hybrid_loss(t[2], t[0], t[1], LossWeights(speckle=3.0))
    base, _ = hybrid_loss(t[2], t[0], t[1])
    assert parts["speckle"] > 0 and torch.isclose(total, base + 3.0 * parts["speckle"])
