"""The gamut-aware colour merge (models/images/colour.py): the functional image's hue is kept exactly, saturation
is given up only as far as the RGB cube requires and never below KEEP_CHROMA, then luminance moves."""

from __future__ import annotations

import numpy as np
import pytest

from models.evaluation.colour import clipped_merge, colour_fidelity, hue_chroma, hue_turn
from models.images.colour import KEEP_CHROMA, merge_luma, rgb_to_ycbcr, split_luma
from models.images.imaging import DecodedImage, to_uint


def _random_pair(seed: int, n: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Any fused Y in [0, 1] under any colour a functional image can hold (random RGB: chroma of every size)."""
    rng = np.random.default_rng(seed)
    _, chroma = split_luma(DecodedImage(rng.random((1, n, 3)).astype(np.float32), 8))
    return rng.random((1, n)).astype(np.float32), chroma


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_merged_pixel_is_in_the_cube_with_the_functional_hue(seed):
    y, chroma = _random_pair(seed)
    rgb = merge_luma(y, chroma)
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    hue_in, c_in = hue_chroma(chroma.astype(np.float64))
    hue_out, c_out = hue_chroma(rgb_to_ycbcr(rgb)[..., 1:].astype(np.float64))
    coloured = c_in > 0.01
    assert hue_turn(hue_out, hue_in)[coloured].max() < 0.05  # exact up to float rounding (8-bit: the next test)
    ratio = (c_out / np.maximum(c_in, 1e-9))[coloured]
    assert ratio.min() >= KEEP_CHROMA - 1e-4 and ratio.max() <= 1.0 + 1e-4


def test_after_8_bit_rounding_no_clearly_coloured_pixel_shifts_or_turns_grey():
    y, chroma = _random_pair(7, 20000)
    scores = colour_fidelity(chroma, to_uint(merge_luma(y, chroma), 8) / 255.0)
    assert scores == {"HueShift%": 0.0, "ColourLost%": 0.0}


def test_inside_the_cube_nothing_changes_and_outside_saturation_goes_before_luminance():
    blue = split_luma(DecodedImage(np.tile(np.float32([0.1, 0.25, 0.85]), (1, 3, 1)), 8))[1]
    y_fit, y_bright, y_white = 0.4, 0.65, 1.0
    rgb = merge_luma(np.float32([[y_fit, y_bright, y_white]]), blue)
    ycc = rgb_to_ycbcr(rgb)[0]
    _, c_in = hue_chroma(blue[0].astype(np.float64))
    _, c_out = hue_chroma(ycc[:, 1:].astype(np.float64))
    # fits: the plain BT.601 merge, saturation and luminance kept
    assert c_out[0] == pytest.approx(c_in[0], abs=1e-5) and ycc[0, 0] == pytest.approx(y_fit, abs=1e-5)
    # bright MR: less saturation, the same luminance (the nine metrics read Y)
    assert KEEP_CHROMA * c_in[1] - 1e-5 <= c_out[1] < c_in[1] and ycc[1, 0] == pytest.approx(y_bright, abs=1e-5)
    # white MR: KEEP_CHROMA of the colour stays, so Y comes down only as far as that needs
    assert c_out[2] == pytest.approx(KEEP_CHROMA * c_in[2], abs=1e-5) and ycc[2, 0] < y_white
    assert rgb[0, 2].max() == pytest.approx(1.0, abs=1e-6)  # the brightest it can be: one channel at the top


def test_keep_one_moves_only_luminance_and_keep_zero_only_saturation():
    y, chroma = _random_pair(3)
    for keep in (0.0, 1.0):
        ycc = rgb_to_ycbcr(merge_luma(y, chroma, keep))[0]
        if keep == 0.0:
            np.testing.assert_allclose(ycc[:, 0], y[0], atol=1e-5)
        else:
            np.testing.assert_allclose(ycc[:, 1:], chroma[0], atol=1e-5)


def test_no_chroma_is_plain_grey_even_at_the_ends():
    y = np.float32([[0.0, 0.5, 1.0, 1.3, -0.2]])
    flat = np.full((1, 5, 2), 0.5, np.float32)
    rgb = merge_luma(y, flat)
    np.testing.assert_allclose(rgb, np.repeat(np.clip(y, 0, 1)[..., None], 3, axis=-1), atol=1e-6)


def test_picture_comparison_sees_luminance_and_hue_not_the_saturation_the_merge_scales():
    """tests/picture_compare.py, which the cross-kernel tests use: a grey level of Y near the cube's yellow corner
    moves single channels by several levels but neither the luminance nor the hue; a clipped merge turns the hue."""
    from tests.picture_compare import HUE_DEG, picture_differences

    yellow = split_luma(DecodedImage(np.tile(np.float32([0.9, 0.8, 0.1]), (1, 64, 1)), 8))[1]
    y = np.linspace(0.90, 0.99, 64, dtype=np.float32)[None]
    a, b = merge_luma(y, yellow), merge_luma(y + np.float32(1 / 255), yellow)
    assert np.abs(to_uint(a, 8).astype(int) - to_uint(b, 8).astype(int)).max() >= 3  # channels move more
    d = picture_differences(to_uint(a, 8), to_uint(b, 8))
    assert d["y_max"] <= 2.0 and d["hue_max"] <= HUE_DEG, d
    clipped = clipped_merge(y, yellow)
    assert picture_differences(to_uint(a, 8), to_uint(clipped, 8))["hue_max"] > HUE_DEG
    assert picture_differences(to_uint(a, 8), to_uint(np.clip(a - 5 / 255, 0, 1), 8))["y_max"] >= 4
