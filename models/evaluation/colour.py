"""Does a fused PET/SPECT show the tracer the scan has? Two counts over the functional image's clearly coloured
pixels (issue #46), reported beside Speckle and not counted among the nine metrics:

HueShift%   share whose hue moved by more than 12 degrees: the fused Y with the functional Cb/Cr keeps the hue
            exactly unless R, G or B clip, and where they clip (bright MR under coloured tracer) the hue moves:
            low-uptake blue over white matter turns cyan, warm tracer under a skull edge yellow, which these
            colour maps read as more uptake than there is.
ColourLost% share that came out nearly grey (the tracer is there, the fused image does not show it).

Hue and colourfulness are read in the BT.601 CbCr plane (the plane the colour merge keeps): hue is the angle of
(Cb - 0.5, Cr - 0.5), chroma its length. A gray functional image has no coloured pixels and scores 0 on both.
"""

from __future__ import annotations

import numpy as np

from models.images.colour import rgb_to_ycbcr

COLOUR_METRICS = ("HueShift%", "ColourLost%")
CLEAR_CHROMA = 0.08  # functional chroma above which a pixel is clearly coloured (the hot map's 10% red is 0.16)
GREY_CHROMA = 0.02  # fused chroma below which a pixel reads as grey (about 5 of 255 grey levels)
HUE_LIMIT_DEG = 12.0


def hue_chroma(cbcr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hue in degrees, chroma) of (..., 2) Cb/Cr in [0, 1]."""
    cb, cr = cbcr[..., 0] - 0.5, cbcr[..., 1] - 0.5
    return np.degrees(np.arctan2(cr, cb)), np.hypot(cb, cr)


def hue_turn(hue_a: np.ndarray, hue_b: np.ndarray) -> np.ndarray:
    """Absolute angle between two hues in degrees, 0-180."""
    return np.abs((hue_a - hue_b + 180.0) % 360.0 - 180.0)


def colour_faults(functional_cbcr: np.ndarray, fused_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel masks (clearly coloured, hue shifted, colour lost) of one fused image against the functional
    Cb/Cr: what :func:`colour_fidelity` counts, and what a contact sheet can point at."""
    hue_in, chroma_in = hue_chroma(np.asarray(functional_cbcr, np.float64))
    hue_out, chroma_out = hue_chroma(rgb_to_ycbcr(np.asarray(fused_rgb, np.float32))[..., 1:].astype(np.float64))
    coloured = chroma_in > CLEAR_CHROMA
    lost = coloured & (chroma_out < GREY_CHROMA)
    shifted = coloured & ~lost & (hue_turn(hue_out, hue_in) > HUE_LIMIT_DEG)  # a grey pixel's hue is noise
    return coloured, shifted, lost


def colour_fidelity(functional_cbcr: np.ndarray | None, fused_rgb: np.ndarray) -> dict[str, float]:
    """HueShift% and ColourLost% of one fused image (RGB in [0, 1]) against the functional image's Cb/Cr
    ((H, W, 2) in [0, 1], as :func:`models.images.colour.split_luma` keeps it; None for a gray functional image)."""
    if functional_cbcr is None or fused_rgb.ndim != 3:
        return dict.fromkeys(COLOUR_METRICS, 0.0)
    coloured, shifted, lost = colour_faults(functional_cbcr, fused_rgb)
    n = int(coloured.sum())
    if n == 0:
        return dict.fromkeys(COLOUR_METRICS, 0.0)
    return {"HueShift%": 100.0 * shifted.sum() / n, "ColourLost%": 100.0 * lost.sum() / n}


def clipped_merge(y: np.ndarray, chroma: np.ndarray) -> np.ndarray:
    """The merge before #46, and every peer's: Y plus the chroma, R, G and B clipped one by one (the reference
    the gamut-aware merge is compared with)."""
    cb, cr = chroma[..., 0] - 0.5, chroma[..., 1] - 0.5
    return np.clip(np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1), 0.0, 1.0)
