"""Where the hot lesion is in a fused image, read back from the pixels (tests only)."""

from __future__ import annotations

import numpy as np

from models.images.colour import hot_colormap, rgb_to_ycbcr

_V = np.linspace(0, 1, 301, dtype=np.float32)
_CHROMA = rgb_to_ycbcr(hot_colormap(_V))[:, 1:]


def tracer_value(rgb: np.ndarray) -> np.ndarray:
    """The hot-colormap value v of each fused pixel, from its chroma (the fused image keeps the functional
    image's Cb/Cr). Black and white share neutral chroma, so neutral pixels read as 0: a white lesion core
    still shows as the hottest ring around it, while grey MR outside the functional volume never reads hot."""
    ycc = rgb_to_ycbcr(rgb / 255 if rgb.dtype == np.uint8 else rgb)
    d = np.linalg.norm(ycc[..., None, 1:] - _CHROMA, axis=-1)
    v = _V[np.argmin(d, axis=-1)]
    neutral = np.linalg.norm(ycc[..., 1:] - 0.5, axis=-1) < 0.02
    return np.where(neutral, 0.0, v)


def hot_centroid(rgb: np.ndarray, fraction: float = 0.85) -> tuple[np.ndarray, float, float]:
    """((i, j) centroid of the hottest region, its mean v, the mean v of the rest of the head). Every hot pixel
    counts: the colour merge keeps the functional hue (models/images/colour.py), so a bright MR edge over warm
    tracer no longer clips into hot-looking specks that would pull the centroid away."""
    v = tracer_value(rgb)
    hot = v >= fraction * v.max()
    jj, ii = np.nonzero(hot)
    head = (v > 0.05) & ~hot
    return np.array([ii.mean(), jj.mean()]), float(v[hot].mean()), float(v[head].mean()) if head.any() else 0.0


def assert_lesion_in_place(mr, fused, functional_spacing_mm: float, truth_lps: np.ndarray) -> dict:
    """The fused MR slice nearest the lesion shows it at its physical place (in-plane error within one
    functional voxel) and as the hottest region of the slice; returns the numbers."""
    k = int(round(mr.to_index(truth_lps[None])[0, 2]))
    assert k in fused.covered, f"MR slice {k} (the lesion's) was not fused"
    img = fused.slices[fused.covered.index(k)]
    centre, hot_v, rest_v = hot_centroid(img)
    found = mr.to_physical(np.array([[centre[0], centre[1], k]]))[0]
    error = found - truth_lps
    in_plane = float(np.linalg.norm(error - np.dot(error, mr.slice_normal()) * mr.slice_normal()))
    assert in_plane <= functional_spacing_mm, (in_plane, found, truth_lps)
    assert hot_v > rest_v + 0.4, (hot_v, rest_v)
    return {"slice": k, "error_mm": in_plane, "hot": hot_v, "rest": rest_v}
