"""Synthetic phantom pairs (MRI-like anatomy + CT or pseudo-colour PET/SPECT) for tests, demos and benchmarks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from models.images.pair_input import PairInput


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return (y - h / 2) / (h / 2), (x - w / 2) / (w / 2)


def _ellipse(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return (((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1).astype(np.float32)


def mri_phantom(h: int = 256, w: int = 256, seed: int = 0) -> np.ndarray:
    """Head-like gray phantom in [0, 1]: skull ring, grey/white matter, ventricles, fine texture."""
    rng = np.random.default_rng(seed)
    y, x = _grid(h, w)
    img = 0.25 * _ellipse(y, x, 0, 0, 0.9, 0.75)
    img += 0.35 * _ellipse(y, x, 0, 0, 0.8, 0.65)
    img -= 0.3 * _ellipse(y, x, -0.05, -0.15, 0.25, 0.08) + 0.3 * _ellipse(y, x, -0.05, 0.15, 0.25, 0.08)
    for _ in range(6):
        cy, cx = rng.uniform(-0.5, 0.5, 2)
        img += rng.uniform(0.05, 0.2) * _ellipse(y, x, cy, cx, *rng.uniform(0.05, 0.15, 2))
    img += 0.03 * np.sin(25 * x + 3 * y) * _ellipse(y, x, 0, 0, 0.8, 0.65)
    img += rng.normal(0, 0.01, (h, w)).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def ct_phantom(h: int = 256, w: int = 256, seed: int = 0) -> np.ndarray:
    """CT-like gray phantom: bright skull, dim soft tissue."""
    y, x = _grid(h, w)
    skull = _ellipse(y, x, 0, 0, 0.9, 0.75) - _ellipse(y, x, 0, 0, 0.82, 0.67)
    img = 0.95 * skull + 0.2 * _ellipse(y, x, 0, 0, 0.82, 0.67)
    img += np.random.default_rng(seed + 1).normal(0, 0.01, (h, w)).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def functional_phantom(h: int = 256, w: int = 256, seed: int = 0) -> np.ndarray:
    """Pseudo-colour PET/SPECT-like RGB in [0, 1]: smooth tracer blobs through a hot colormap."""
    rng = np.random.default_rng(seed + 2)
    y, x = _grid(h, w)
    act = 0.3 * _ellipse(y, x, 0, 0, 0.8, 0.65)
    for _ in range(4):
        cy, cx = rng.uniform(-0.5, 0.5, 2)
        s = rng.uniform(0.1, 0.25)
        act += rng.uniform(0.4, 0.8) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * s**2))
    from models.images.colour import hot_colormap  # lazy: keeps this module numpy-only for its other users

    return hot_colormap(np.clip(act, 0, 1)).astype(np.float32)


def phantom_pair(modality: str = "pet", h: int = 256, w: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(MRI, other) phantoms; CT is gray, PET/SPECT pseudo-colour RGB."""
    other = ct_phantom(h, w, seed) if modality == "ct" else functional_phantom(h, w, seed)
    return mri_phantom(h, w, seed), other


def phantom_inputs(n: int, size: int, modality: str = "pet") -> list[PairInput]:
    """``n`` prepared size x size phantom pairs (seeds 0..n-1, 8-bit), ready for ``Fuser.fuse``."""
    from models.images.imaging import DecodedImage  # lazy: keeps this module numpy-only for its other users
    from models.images.pair_input import prepare_pair

    return [prepare_pair(DecodedImage(m, 8), DecodedImage(f, 8), modality)
            for m, f in (phantom_pair(modality, size, size, seed=i) for i in range(n))]
