"""Fusion metrics: closed-form cases, symmetries, and recorded values on a fixed synthetic pair."""

import numpy as np
import pytest

from models.evaluation import metrics as M
from models.evaluation.baselines import BASELINES


def _pair(seed: int = 0, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Two smooth-ish synthetic sources in [0, 255] with different structures."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    a = 127 + 100 * np.sin(6 * xx) * np.cos(4 * yy) + rng.normal(0, 5, (size, size))
    b = np.where((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1, 200.0, 30.0) + rng.normal(0, 5, (size, size))
    return np.clip(a, 0, 255), np.clip(b, 0, 255)


def test_constant_image_has_no_information():
    f = np.full((32, 32), 77.0)
    assert M.entropy(f) == 0.0
    assert M.std_dev(f) == 0.0
    assert M.spatial_frequency(f) == 0.0
    assert M.average_gradient(f) == 0.0


def test_entropy_of_two_equal_levels_is_one_bit():
    f = np.zeros((16, 16))
    f[:, 8:] = 200
    assert M.entropy(f) == pytest.approx(1.0)


def test_identical_images_give_ssim_and_vif_of_one_per_source():
    a, _ = _pair()
    assert M.ssim_sum(a, a, a) == pytest.approx(2.0, abs=1e-4)
    assert M.vif(a, a, a) == pytest.approx(2.0, abs=1e-6)
    # Perfect edge preservation (g = alpha = 1) hits the sigmoids' ceiling, the largest Qabf possible.
    ceiling = 0.9994 / (1 + np.exp(-15 * 0.5)) * 0.9879 / (1 + np.exp(-22 * 0.2))
    assert M.qabf(a, a, a) == pytest.approx(ceiling, abs=1e-4)
    assert M.psnr(a, a, a) == float("inf")


def test_mutual_information_with_itself_is_entropy():
    a, b = _pair()
    ea = M.entropy(a)
    # MI(A,F) + MI(B,F) with A = B = F is twice the entropy (through the public metric only).
    assert M.mutual_information(a, a, a) == pytest.approx(2 * ea, rel=1e-9)
    # Symmetric: MI(A,B) + MI(A,B) read either way round.
    assert M.mutual_information(a, a, b) == pytest.approx(M.mutual_information(b, b, a), rel=1e-9)


def test_source_symmetric_metrics_do_not_depend_on_source_order():
    a, b = _pair()
    f = (a + b) / 2
    for name in ("MI", "SCD", "VIF", "Qabf", "SSIM", "PSNR"):
        assert M.all_metrics(a, b, f)[name] == pytest.approx(M.all_metrics(b, a, f)[name], rel=1e-6), name


def test_sharper_fusion_scores_higher_on_detail_metrics():
    a, b = _pair()
    blurred = (a + b) / 2
    sharp = np.maximum(a, b)
    m_blur, m_sharp = M.all_metrics(a, b, blurred), M.all_metrics(a, b, sharp)
    assert m_sharp["SD"] > m_blur["SD"]
    assert m_sharp["Qabf"] > m_blur["Qabf"]


def test_speckle_is_zero_for_blends_and_steeper_edges_and_counts_invented_detail():
    size = 64
    yy, xx = np.mgrid[0:size, 0:size]
    a = np.where((abs(yy - 32) < 16) & (abs(xx - 32) < 16), 200.0, 40.0) + 10 * np.sin(xx / 5)
    b = np.where(xx < 40, 90.0, 20.0) + 8 * np.cos(yy / 7)
    mix = 0.3 * a + 0.7 * b
    for blend in (mix, (a + b) / 2, a, b):
        assert M.speckle(a, b, blend) < 1e-6
    steeper = 1.8 * mix  # every edge of the blend 1.8x as steep, in its own direction: sharpening, not speckle
    assert M.speckle(a, b, steeper) < 1e-6
    assert M.speckle(a, b, 3.0 * a) > 1.0  # beyond SPECKLE_MAX_GAIN it counts
    noisy = mix + np.random.default_rng(3).normal(0, 3, (size, size))
    assert M.speckle(a, b, noisy) > 5.0
    # max(A, B) switches source mid-window only where they cross: a little, far below noise.
    assert M.speckle(a, b, np.maximum(a, b)) < 0.1 * M.speckle(a, b, noisy)
    # A ripple beside the square's edge (gradients against the edge's own): what the metric-frontier probe made.
    ripple = mix + 6.0 * ((abs(yy - 32) < 18) & (abs(xx - 32) >= 16) & (abs(xx - 32) < 18)) * (-1.0) ** xx
    assert M.speckle(a, b, ripple) > 3 * M.speckle(a, b, np.maximum(a, b))


def test_source_stats_reuse_gives_the_same_numbers():
    a, b = _pair()
    f = np.maximum(a, b)
    sources = M.SourceStats(a, b)
    assert M.all_metrics(a, b, f, sources) == M.all_metrics(a, b, f)


def test_shape_mismatch_is_rejected():
    a, b = _pair()
    with pytest.raises(ValueError, match="shape mismatch"):
        M.all_metrics(a, b, a[:10])


# Recorded on the fixed synthetic pair above, average fusion (regressions in any metric show here).
RECORDED = {
    "EN": 7.38134, "SD": 47.2058, "SF": 18.6135, "AG": 6.80801, "MI": 5.67792,
    "SCD": 1.41582, "VIF": 0.689503, "Qabf": 0.335447, "SSIM": 1.23768, "PSNR": 13.5996,
}


def test_recorded_values_on_fixed_pair():
    a, b = _pair()
    got = M.all_metrics(a, b, (a + b) / 2)
    for name, value in RECORDED.items():
        assert got[name] == pytest.approx(value, rel=1e-4), name


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baselines_keep_range_shape_and_identity(name):
    a, b = (x / 255 for x in _pair(size=48))
    out = BASELINES[name](a, b)
    assert out.shape == a.shape and out.min() >= 0 and out.max() <= 1
    # Fusing an image with itself gives it back (up to filter rounding).
    np.testing.assert_allclose(BASELINES[name](a, a), a, atol=1e-6)


def test_metric_ssim_matches_the_training_loss_ssim():
    import torch

    from models.nets.losses import ssim as loss_ssim

    a, b = _pair()
    f = np.maximum(a, b)
    t = lambda x: torch.from_numpy(np.asarray(x / 255, np.float32))[None, None]  # noqa: E731
    want = float(loss_ssim(t(a), t(f))[0] + loss_ssim(t(b), t(f))[0])
    assert M.ssim_sum(a, b, f) == pytest.approx(want, abs=1e-4)


def _vifp_literal(ref: np.ndarray, dist: np.ndarray) -> float:
    """Sheikh & Bovik's pixel-domain VIF transcribed literally (special cases as a chain of masks)."""
    from scipy import ndimage

    sigma_nsq, eps, num, den = 2.0, 1e-10, 0.0, 0.0
    ref, dist = ref.astype(np.float64), dist.astype(np.float64)
    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        filt = lambda x, n=n: ndimage.gaussian_filter(x, n / 5.0, truncate=(n // 2) / (n / 5.0), mode="constant")  # noqa: E731
        if scale > 1:
            ref, dist = filt(ref)[::2, ::2], filt(dist)[::2, ::2]
        mu1, mu2 = filt(ref), filt(dist)
        s1 = np.maximum(filt(ref * ref) - mu1**2, 0)
        s2 = np.maximum(filt(dist * dist) - mu2**2, 0)
        s12 = filt(ref * dist) - mu1 * mu2
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        g, sv = np.where(s1 < eps, 0, g), np.where(s1 < eps, s2, sv)
        s1 = np.where(s1 < eps, 0, s1)
        g, sv = np.where(s2 < eps, 0, g), np.where(s2 < eps, 0, sv)
        sv = np.where(g < 0, s2, sv)
        g, sv = np.maximum(g, 0), np.maximum(sv, eps)
        num += np.sum(np.log10(1 + g * g * s1 / (sv + sigma_nsq)))
        den += np.sum(np.log10(1 + s1 / sigma_nsq))
    return num / den


def test_vif_matches_a_literal_transcription_including_flat_regions():
    a, b = _pair()
    a[:20, :20] = 100.0  # flat patches exercise the s1 < eps / s2 < eps branches
    f = np.maximum(a, b)
    f[40:, 40:] = 30.0
    want = _vifp_literal(a, f) + _vifp_literal(b, f)
    assert M.vif(a, b, f) == pytest.approx(want, rel=1e-5)


def test_quality_bar_counts_the_nine_metrics_against_the_best_baseline():
    from models.evaluation.report import best_baseline, wins_against_baselines

    assert "PSNR" not in M.QUALITY_METRICS and len(M.QUALITY_METRICS) == 9
    flat = dict.fromkeys(M.METRICS, 1.0)
    summary = {"average": {"T": {**flat, "SD": 2.0}}, "max": {"T": {**flat, "SF": 3.0}},
               "model": {"T": {**dict.fromkeys(M.METRICS, 1.5), "EN": 1.0, "SF": 4.0, "PSNR": 9.0}}}
    assert best_baseline(summary, "T") == {**dict.fromkeys(M.QUALITY_METRICS, 1.0), "SD": 2.0, "SF": 3.0}
    # SD loses to average, EN only ties (not a win), PSNR is never counted.
    assert wins_against_baselines(summary)["T"] == [m for m in M.QUALITY_METRICS if m not in ("SD", "EN")]
