"""Classical fusion baselines on luminance (same YCbCr handling as the model): the floor to beat."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pywt
from scipy import ndimage

from models.images.colour import merge_luma
from models.images.pair_input import FusionResult, PairInput


def average(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pixel mean."""
    return (a + b) / 2


def maximum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise maximum."""
    return np.maximum(a, b)


def _pyr_down(x: np.ndarray) -> np.ndarray:
    return ndimage.gaussian_filter(x, 1.0, mode="reflect")[::2, ::2]


def _pyr_up(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    up = np.zeros(shape, x.dtype)
    up[::2, ::2] = x
    return ndimage.gaussian_filter(up, 1.0, mode="reflect") * 4


def laplacian(a: np.ndarray, b: np.ndarray, levels: int = 4, base: Callable = average) -> np.ndarray:
    """Laplacian-pyramid fusion (Burt & Adelson 1983): max-abs detail, base fused by ``base`` (the mean)."""
    details, ga, gb = [], a.astype(np.float64), b.astype(np.float64)
    for _ in range(levels):
        if min(ga.shape) < 8:
            break
        da, db = _pyr_down(ga), _pyr_down(gb)
        la, lb = ga - _pyr_up(da, ga.shape), gb - _pyr_up(db, gb.shape)
        details.append(np.where(np.abs(la) >= np.abs(lb), la, lb))
        ga, gb = da, db
    out = base(ga, gb)
    for d in reversed(details):
        out = _pyr_up(out, d.shape) + d
    return np.clip(out, 0, 1)


def dwt(a: np.ndarray, b: np.ndarray, wavelet: str = "db2", levels: int = 3) -> np.ndarray:
    """Wavelet fusion (Li et al. 1995) with PyWavelets: averaged approximation, max-abs details."""
    ca = pywt.wavedec2(a.astype(np.float64), wavelet, level=levels, mode="symmetric")
    cb = pywt.wavedec2(b.astype(np.float64), wavelet, level=levels, mode="symmetric")
    fused = [(ca[0] + cb[0]) / 2]
    for da, db in zip(ca[1:], cb[1:], strict=True):
        fused.append(tuple(np.where(np.abs(x) >= np.abs(y), x, y) for x, y in zip(da, db, strict=True)))
    out = pywt.waverec2(fused, wavelet, mode="symmetric")[: a.shape[0], : a.shape[1]]
    return np.clip(out, 0, 1)


BASELINES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "average": average,
    "max": maximum,
    "laplacian": laplacian,
    "dwt": dwt,
}


def fuse_baseline(method: str, pairs: list[PairInput]) -> list[FusionResult]:
    """Fuse prepared pairs with a named baseline; colour handled exactly as the model's pipeline does."""
    fn = BASELINES[method]
    return [FusionResult(merge_luma(fn(p.mri_y, p.func_y).astype(np.float32), p.chroma), p.modality) for p in pairs]
