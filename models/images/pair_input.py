"""A pair ready for fusion: decoding both files, checking sizes and modality, splitting the colour (one place
for the CLI, the service, evaluation and training)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.images.colour import luminance, merge_luma, split_luma
from models.images.imaging import DEFAULT_MAX_PIXELS, DecodedImage, ImageError, OpenedImage, decode_image, resize_to

MODALITIES = ("ct", "pet", "spect")


@dataclass
class FusionResult:
    """Fused image in [0, 1] (gray (H, W) or RGB (H, W, 3)) and what produced it (here, not in the torch
    pipeline module, so that the HTTP process can hold results without importing torch)."""

    pixels: np.ndarray
    modality: str


def with_colour(lumas: list[np.ndarray | None], pairs: list[PairInput]) -> list[FusionResult | None]:
    """Fused luminances with each pair's functional colour put back (gray sources stay gray); None stays None
    (a dropped pair)."""
    return [None if y is None else FusionResult(merge_luma(y, p.chroma), p.modality)
            for y, p in zip(lumas, pairs, strict=True)]


@dataclass
class PairInput:
    """A validated pair ready for fusion: luminances of equal size plus the functional chroma."""

    mri_y: np.ndarray
    func_y: np.ndarray
    chroma: np.ndarray | None
    modality: str
    size: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        self.size = self.mri_y.shape  # type: ignore[assignment]


def infer_modality(functional: DecodedImage) -> str:
    """Without a declared modality: pseudo-colour means PET-like functional imaging, gray means CT."""
    return "pet" if functional.is_color else "ct"


def prepare_pair(
    mri: DecodedImage, functional: DecodedImage, modality: str | None = None, resize: bool = False
) -> PairInput:
    """Check sizes and modality, split colour; raises :class:`ImageError` with a clear message."""
    if modality is None:
        modality = infer_modality(functional)
    modality = modality.lower()
    if modality not in MODALITIES:
        raise ImageError("bad_modality", f"modality must be one of {', '.join(MODALITIES)}, not {modality!r}")
    if mri.size != functional.size:
        if not resize:
            raise ImageError(
                "size_mismatch",
                f"mri is {mri.size[1]}x{mri.size[0]} but {modality} is {functional.size[1]}x{functional.size[0]} "
                "(width x height); co-register them first or ask for resize",
            )
        functional = resize_to(functional, mri.size)
    func_y, chroma = split_luma(functional)
    return PairInput(luminance(mri), func_y, chroma, modality)


def decode_pair(mri: bytes | str | Path | OpenedImage, functional: bytes | str | Path | OpenedImage,
                modality: str | None = None, resize: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                labels: tuple[str, str] = ("mri", "functional")) -> PairInput:
    """Decode two files (PNG/JPEG/TIFF bytes, paths or opened images) and prepare them; raises
    :class:`ImageError`."""
    return prepare_pair(decode_image(mri, max_pixels, labels[0]), decode_image(functional, max_pixels, labels[1]),
                        modality, resize)
