"""HueShift% and ColourLost%: whether a fused PET/SPECT shows the tracer the scan has (models/evaluation/colour.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.evaluation.colour import COLOUR_METRICS, clipped_merge, colour_fidelity
from models.images.colour import merge_luma, split_luma
from models.images.imaging import DecodedImage


def _functional(rgb: tuple[float, float, float], size: int = 16) -> np.ndarray:
    """The Cb/Cr a decoded functional image of one colour keeps."""
    _, chroma = split_luma(DecodedImage(np.tile(np.float32(rgb), (size, size, 1)), 8))
    return chroma


@pytest.mark.parametrize("rgb", [(0.1, 0.25, 0.85), (0.9, 0.35, 0.05), (0.55, 0.1, 0.0)])
def test_a_merge_inside_the_gamut_keeps_every_hue(rgb):
    chroma = _functional(rgb)
    fused = merge_luma(np.full((16, 16), 0.4, np.float32), chroma)
    assert colour_fidelity(chroma, fused) == {"HueShift%": 0.0, "ColourLost%": 0.0}


def test_bright_mr_under_blue_tracer_clipped_channel_by_channel_turns_the_hue_and_ours_does_not():
    """Y near white under a blue (low-uptake) chroma: B clips first, the pixel turns towards cyan/white."""
    chroma = _functional((0.1, 0.25, 0.85))
    y = np.full((16, 16), 0.4, np.float32)
    y[:4] = 0.97  # a quarter of the image under bright white matter
    scores = colour_fidelity(chroma, clipped_merge(y, chroma))
    assert scores["HueShift%"] == pytest.approx(25.0) and scores["ColourLost%"] == 0.0
    assert colour_fidelity(chroma, merge_luma(y, chroma)) == {"HueShift%": 0.0, "ColourLost%": 0.0}


def test_tracer_shown_grey_is_counted_lost_not_shifted():
    """A fused image grey where the functional image is clearly coloured (e.g. a method that drops chroma)."""
    chroma = _functional((0.9, 0.35, 0.05))
    fused = merge_luma(np.full((16, 16), 0.4, np.float32), chroma)
    fused[:, :8] = 0.4  # half the image grey
    assert colour_fidelity(chroma, fused) == {"HueShift%": 0.0, "ColourLost%": 50.0}


def test_a_gray_functional_image_has_nothing_to_lose():
    assert colour_fidelity(None, np.zeros((8, 8))) == dict.fromkeys(COLOUR_METRICS, 0.0)
    chroma = _functional((0.5, 0.5, 0.5))  # RGB but gray: no clearly coloured pixel
    assert colour_fidelity(chroma, merge_luma(np.full((16, 16), 0.9, np.float32), chroma)) == \
        dict.fromkeys(COLOUR_METRICS, 0.0)


def test_eval_reports_both_counts_per_method(pair_dir, tmp_path, capsys):
    from dmfnet.cli import main

    out = tmp_path / "report"
    assert main(["eval", "--pairs", str(pair_dir), "--method", "average,max", "--out", str(out), "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "HueShift%" in printed and "ColourLost%" in printed
    summary = json.loads((out / "summary.json").read_text())
    for method in ("average", "max"):
        assert summary[method]["MRI-CT"]["HueShift%"] == 0.0  # gray CT: nothing coloured
        assert 0.0 <= summary[method]["MRI-PET"]["HueShift%"] <= 100.0
    assert "HueShift%" in (out / "per_image.csv").read_text().splitlines()[0]
