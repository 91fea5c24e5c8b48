"""Real-world values -> the [0, 1] images the model fuses (one implementation for the PACS and the CLI).

Documented choices, applied to real-world values (RescaleSlope/Intercept per slice already applied):
One window per series, whatever the order of its files: "the series' window" below is the WindowCenter/Width
(first values) that **every** slice carries; when slices disagree (Siemens and GE write an automatic window on
each slice, and an edge slice's can be 4/9) or some have none, the series has no window of its own and the
rule's fallback applies, computed from all of the volume's values. So one odd slice can never window the rest.
* MR: the series' window, else from its values: 0.5th percentile of all voxels to the 99.5th percentile of
  the head's voxels (those above the volume's mean), so at most 0.5% of the head's voxels clip at white. Voxels
  at the padding value, and voxels at the stored maximum when they are under 2% of the head (saturation: a field
  map's 4095s), are left out of both: 22 saturated voxels set white at 4095 over a head at most ~385 and the
  fused study came out black. A windowed MR
  whose head is still nearly black or white is reported (:func:`mr_exposure_problem`), never written silently.
* RGB MR (colour FA maps): fused as its BT.601 luminance, shown gray.
* CT: the series' window, else soft tissue (40/400 HU).
* PT/NM grayscale: the range ``functional_window`` in real-world units, then the "hot" colormap
  (black-red-yellow-white, piecewise linear: R = 3v, G = 3v - 1, B = 3v - 2, clipped; the mean of R, G, B
  is the tracer value v) to make the pseudo-colour image the model's colour path expects. "full" (default):
  0 to the volume's maximum, so a hot spot stays the hottest thing in the image (a percentile cap clipped a
  lesion at 2.7x cortex to cortex level); "suv": a fixed SUVbw range 0..``suv_max`` when SUVbw can be computed
  (Units BQML, PatientWeight, dose, half-life and injection time), else "full"; "series": the series' own
  window, else "full".
* RGB (already coloured) volumes are used as they are.
Ranges come from the whole source volume (before any resampling, which would soften a small hot spot), so
intensities are comparable from slice to slice and a resampled study keeps the same window as the original.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from models.images.colour import hot_colormap
from models.volumes.volume import Volume

log = logging.getLogger("dmfnet.volumes")


def first_value(v) -> float | None:
    """The first value of a (possibly multi-valued) DICOM number, or None."""
    if v is None:
        return None
    try:
        return float(v[0]) if hasattr(v, "__len__") and not isinstance(v, str) else float(v)
    except (TypeError, ValueError, IndexError):
        return None


def _seconds(tm) -> float | None:
    """DICOM TM (HHMMSS.frac) -> seconds since midnight."""
    text = str(tm or "").strip()
    if len(text) < 4:
        return None
    try:
        return int(text[0:2]) * 3600 + int(text[2:4]) * 60 + float(text[4:] or 0)
    except ValueError:
        return None


def suv_bw_factor(header) -> float | None:
    """Bq/ml -> SUVbw multiplier (weight / decay-corrected dose), or None when the headers cannot give it."""
    try:
        if str(getattr(header, "Units", "")).upper() != "BQML":
            return None
        weight_g = float(header.PatientWeight) * 1000
        rp = header.RadiopharmaceuticalInformationSequence[0]
        dose, half_life = float(rp.RadionuclideTotalDose), float(rp.RadionuclideHalfLife)
        start, scan = _seconds(rp.RadiopharmaceuticalStartTime), _seconds(getattr(header, "SeriesTime", None))
    except (AttributeError, IndexError, TypeError, ValueError, KeyError):
        return None
    if None in (start, scan) or dose <= 0 or half_life <= 0 or weight_g <= 0:
        return None
    elapsed = (scan - start) % 86400  # injection before midnight, scan after
    return weight_g / (dose * math.exp(-math.log(2) * elapsed / half_life))


def dicom_window(center, width) -> tuple[float, float] | None:
    """(lo, hi) from a WindowCenter/Width pair (their first values), or None."""
    c, w = first_value(center), first_value(width)
    return None if c is None or not w else (c - w / 2, c + w / 2)


def _series_window(header) -> tuple[float, float] | None:
    return dicom_window(getattr(header, "WindowCenter", None), getattr(header, "WindowWidth", None))


def agreed_window(volume: Volume) -> tuple[float, float] | None:
    """The (lo, hi) window every slice of a DICOM volume carries, or None (no window, or slices disagree)."""
    windows = volume.windows
    if not windows or any(w is None for w in windows):
        return None
    first = np.array(windows[0])
    if any(np.abs(np.array(w) - first).max() > 1e-3 * max(1.0, float(np.abs(first).max())) for w in windows):
        return None
    return windows[0]


SATURATED_SHARE = 0.02  # voxels at the volume's maximum are saturation (left out) when fewer than this share
# of the head; more is a tissue at the top of the range (a phantom's white matter), kept


def mr_range(values: np.ndarray, padding: float | None = None) -> tuple[float, float]:
    """An MR window from the whole volume's values (see the module docstring): 0.5th percentile of all voxels
    to the 99.5th percentile of the head (voxels above the mean), leaving out voxels at ``padding`` and, when they
    are few (``SATURATED_SHARE`` of the head), voxels at the stored maximum."""
    flat = values.ravel()
    if padding is not None and (flat != padding).any():
        flat = flat[flat != padding]
    top = flat.max()
    at_top = flat == top
    if at_top.sum() < SATURATED_SHARE * (flat > flat.mean()).sum() and not at_top.all():
        flat = flat[~at_top]
    lo = float(np.percentile(flat, 0.5))
    head = flat[flat > flat.mean()]
    hi = float(np.percentile(head, 99.5)) if head.size else float(flat.max())
    return lo, max(hi, lo + 1e-6)


def mr_exposure_problem(values: np.ndarray, window: Window) -> str | None:
    """An MR volume (real-world values) whose anatomy ``window`` shows nearly black or nearly white, named; else
    None. The anatomy is the voxels above the volume's mean (as for :func:`mr_range`); nearly black: 95% of it
    under 0.15 of the window, nearly white: 95% of it over 0.85 (a piecewise-constant phantom whose white matter
    is most of the head, at the window's top, is neither)."""
    if window.rgb_input or values.size == 0:
        return None
    head = values[values > values.mean()]
    if head.size == 0:
        return None
    shown = window.apply(head)
    if float(np.percentile(shown, 95)) < 0.15:
        return "the windowed MR is nearly black (95% of the head under 15% of the window): a bad window?"
    if float(np.percentile(shown, 5)) > 0.85:
        return "the windowed MR is nearly white (95% of the head over 85% of the window): a bad window?"
    return None


def _padding(header) -> float | None:
    """The real-world value of a DICOM header's PixelPaddingValue, or None."""
    pad = first_value(getattr(header, "PixelPaddingValue", None)) if header is not None else None
    if pad is None:
        return None
    slope = first_value(getattr(header, "RescaleSlope", None)) or 1.0
    return pad * slope + (first_value(getattr(header, "RescaleIntercept", None)) or 0.0)


_HEADER = object()


def functional_range(header, values: np.ndarray, mode: str = "full", suv_max: float = 15.0,
                     series_window=_HEADER) -> tuple[float, float]:
    """(lo, hi) in real-world units for a grayscale PT/NM volume (see the module docstring); ``series_window``
    is the series' agreed window (default: ``header``'s own)."""
    window = _series_window(header) if series_window is _HEADER else series_window
    if mode == "series" and window is not None:
        return window
    if mode == "suv":
        factor = suv_bw_factor(header)
        if factor:
            return 0.0, suv_max / factor
        log.warning("SUVbw cannot be computed from the headers; using the full range", extra={"window": "suv"})
    return min(0.0, float(values.min())), float(values.max())


@dataclass(frozen=True)
class Window:
    """How one volume becomes [0, 1] images: ``lo``..``hi`` in real-world units, hot-coloured or gray."""

    lo: float
    hi: float
    hot: bool
    rgb_input: bool = False
    luminance: bool = False  # an RGB input shown as its BT.601 luminance (an RGB MR)

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Real-world values (any shape; RGB volumes as they are) -> [0, 1] gray, or RGB when ``hot``."""
        if self.rgb_input:
            rgb = values.astype(np.float32)
            return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2] if self.luminance else rgb
        v = np.clip((values - self.lo) / max(self.hi - self.lo, 1e-6), 0, 1)
        return hot_colormap(v) if self.hot else v


def window_for(volume: Volume, role: str, functional_window: str = "full", suv_max: float = 15.0) -> Window:
    """The window of a volume: ``role`` 'mri' or 'functional' (whose modality decides CT vs PT/NM)."""
    if volume.is_rgb:
        return Window(0.0, 1.0, hot=False, rgb_input=True, luminance=role == "mri" or volume.modality == "MR")
    series = agreed_window(volume)
    if role == "mri" or volume.modality == "MR":
        return Window(*(series or mr_range(volume.array, _padding(volume.header))), hot=False)
    if volume.modality == "CT":
        return Window(*(series or (40.0 - 200.0, 40.0 + 200.0)), hot=False)
    return Window(*functional_range(volume.header, volume.array, functional_window, suv_max, series), hot=True)
