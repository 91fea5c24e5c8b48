"""Where the hot lesion is in a fused image, read back from the pixels (tests only)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from models.images.imaging import hot_colormap, rgb_to_ycbcr

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


def hot_centroid(rgb: np.ndarray, fraction: float = 0.85, min_pixels: float = 0.0) -> tuple[np.ndarray, float, float]:
    """((i, j) centroid of the hottest region, its mean v, the mean v of the rest of the head).

    Hot specks smaller than ``min_pixels`` (8-connected) are left out: where a bright MR edge lies over warm
    tracer, the fused RGB clips and its hue turns towards yellow, so a few edge pixels read hot; a patch smaller
    than the functional image's own voxel cannot be tracer that image resolves."""
    v = tracer_value(rgb)
    hot = v >= fraction * v.max()
    labels, n = ndimage.label(hot, structure=np.ones((3, 3)))
    sizes = ndimage.sum(hot, labels, range(1, n + 1))
    kept = np.flatnonzero(sizes >= min_pixels) + 1
    if kept.size:  # else every hot patch is a speck: judge them all, as before
        hot = np.isin(labels, kept)
    jj, ii = np.nonzero(hot)
    head = (v > 0.05) & ~hot
    return np.array([ii.mean(), jj.mean()]), float(v[hot].mean()), float(v[head].mean()) if head.any() else 0.0


def assert_lesion_in_place(mr, fused, functional_spacing_mm: float, truth_lps: np.ndarray) -> dict:
    """The fused MR slice nearest the lesion shows it at its physical place (in-plane error within one
    functional voxel) and as the hottest region of the slice (specks under half a functional voxel's area in
    MR pixels left out: see :func:`hot_centroid`); returns the numbers."""
    k = int(round(mr.to_index(truth_lps[None])[0, 2]))
    assert k in fused.covered, f"MR slice {k} (the lesion's) was not fused"
    img = fused.slices[fused.covered.index(k)]
    voxel_pixels = functional_spacing_mm ** 2 / float(mr.spacing[0] * mr.spacing[1])
    centre, hot_v, rest_v = hot_centroid(img, min_pixels=0.5 * voxel_pixels)
    found = mr.to_physical(np.array([[centre[0], centre[1], k]]))[0]
    error = found - truth_lps
    in_plane = float(np.linalg.norm(error - np.dot(error, mr.slice_normal()) * mr.slice_normal()))
    assert in_plane <= functional_spacing_mm, (in_plane, found, truth_lps)
    assert hot_v > rest_v + 0.4, (hot_v, rest_v)
    return {"slice": k, "error_mm": in_plane, "hot": hot_v, "rest": rest_v}
