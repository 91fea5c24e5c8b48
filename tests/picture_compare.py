"""Comparing two fused pictures of the same pair from different kernels (runtime, CPU, precision), tests only.

The model's output is the luminance; the colour merge (models/images/colour.py) then keeps the functional hue and
scales the chroma to fit the RGB cube, and near the cube's bright yellow corner that scale moves with Y: one grey
level of Y moves the saturation by a few percent, and so the smallest channel by up to ~8 levels. So two runs
that differ by a grey level of luminance are compared as a reader sees them: luminance within the kernels'
tolerance, hue the same wherever the picture is coloured. RGB values are compared bit for bit elsewhere (same CPU).
"""

from __future__ import annotations

import numpy as np

from models.evaluation.colour import hue_chroma, hue_turn
from models.images.colour import rgb_to_ycbcr

COLOURED = 0.04  # chroma above which both pictures count as coloured (half the colour metric's 0.08)
HUE_DEG = 5.0  # 8-bit rounding alone turns a hue of chroma 0.04 by up to ~3 degrees


def picture_differences(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Luminance difference in grey levels (max, mean) and the largest hue turn (degrees) over pixels coloured
    in both; gray (H, W) pictures compare luminance only. ``a``, ``b``: 8-bit or [0, 1] floats."""
    a, b = (x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64) for x in (a, b))
    if a.ndim == 2:
        dy = np.abs(a - b) * 255
        return {"y_max": float(dy.max()), "y_mean": float(dy.mean()), "hue_max": 0.0}
    ya, yb = rgb_to_ycbcr(a.astype(np.float32)), rgb_to_ycbcr(b.astype(np.float32))
    dy = np.abs(ya[..., 0].astype(np.float64) - yb[..., 0]) * 255
    (hue_a, c_a), (hue_b, c_b) = (hue_chroma(x[..., 1:].astype(np.float64)) for x in (ya, yb))
    both = (c_a > COLOURED) & (c_b > COLOURED)
    return {"y_max": float(dy.max()), "y_mean": float(dy.mean()),
            "hue_max": float(hue_turn(hue_a, hue_b)[both].max()) if both.any() else 0.0}
