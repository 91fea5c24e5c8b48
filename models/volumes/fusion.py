"""Fuse two volumes in patient space: the functional volume resampled onto the MR grid (through a registration
when the two have different Frames of Reference), windowed, and fused slice by slice along the MR's own slices,
in batches. One implementation for the PACS commands and ``dmfnet fuse`` on NIfTI files or DICOM folders."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np
import SimpleITK as sitk

from models.images.imaging import DecodedImage, to_uint8
from models.images.pair_input import prepare_pair
from models.volumes.registration import Registration
from models.volumes.volume import GeometryError, Volume, check_overlap, resample_onto, source_slices
from models.volumes.windowing import mr_exposure_problem, window_for

if TYPE_CHECKING:  # the model's type only: reading and resampling a study never import torch
    from models.inference.fuser import Fuser

MODALITY_OF = {"CT": "ct", "PT": "pet", "NM": "spect"}


class SliceFuser(Protocol):
    """Fuses windowed slice pairs ([0, 1] arrays) into [0, 1] gray or RGB arrays."""

    weights_sha256: str
    model_name: str

    def fuse(self, mri: list[np.ndarray], func: list[np.ndarray], modality: str) -> list[np.ndarray]: ...  # noqa: D102


def quantize(x: np.ndarray) -> np.ndarray:
    """The 8-bit image the service would receive as PNG (so every fuser sees identical inputs)."""
    return np.round(np.clip(x, 0, 1) * 255).astype(np.float32) / 255


class InProcessFuser:
    """The model in this process; one call at a time (studies in flight share it; a service batches instead)."""

    def __init__(self, pipeline: Fuser, batch_size: int = 8) -> None:
        self.pipeline = pipeline
        self.batch_size = batch_size
        self.lock = threading.Lock()
        self.weights_sha256 = str(pipeline.weights_sha256 or pipeline.weights_path)
        self.model_name = pipeline.model_name

    def fuse(self, mri: list[np.ndarray], func: list[np.ndarray], modality: str) -> list[np.ndarray]:  # noqa: D102
        pairs = [prepare_pair(DecodedImage(quantize(m), 8), DecodedImage(quantize(f), 8), modality)
                 for m, f in zip(mri, func, strict=True)]
        out = []
        with self.lock:
            for i in range(0, len(pairs), self.batch_size):
                out += [r.pixels for r in self.pipeline.fuse(pairs[i : i + self.batch_size])]
        return out


GAP_RATIO = 1.8  # functional slice step / SliceThickness beyond which slices are missing: 2-D protocols leave gaps
# of up to ~70% of the thickness (a real GE EPI: 3 mm slices 5 mm apart); one missing slice of a contiguous
# series is 2.0


def check_no_gaps(functional: Volume) -> None:
    """The functional volume is interpolated onto the MR grid: refuse one whose slices are further apart than
    ``GAP_RATIO`` x their thickness (tracer between sampled slices would be invented). The MR is never
    interpolated, so a sparse MR (3 mm slices 12 mm apart) is fused slice by slice as it is."""
    step, thickness = float(functional.spacing[2]), functional.thickness
    if functional.shape[0] > 1 and thickness > 0 and step > GAP_RATIO * thickness:
        raise GeometryError(f"functional slices {step:.2f} mm apart but {thickness:.2f} mm thick: missing slices? "
                            "Refused rather than interpolated across the gaps")


def functional_modality(volume: Volume) -> str:
    """ct / pet / spect from the functional volume's DICOM modality."""
    if volume.modality not in MODALITY_OF:
        raise GeometryError(f"functional series has Modality {volume.modality!r}; expected CT, PT or NM")
    return MODALITY_OF[volume.modality]


@dataclass
class FusedVolume:
    """The fused slices on the MR grid, 8-bit (what every output stores; a quarter of float32's memory):
    ``slices[n]`` belongs to MR slice ``covered[n]``, resampled from functional slices ``sources[n]``."""

    slices: list[np.ndarray]
    covered: list[int]
    sources: list[list[int]]
    modality: str
    registration: Registration | None = None
    reused: int = 0
    cache_keys: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # e.g. an MR window that leaves the anatomy nearly black

    def range_text(self, total: int) -> str:
        """'slices 9-32 of 40' (1-based, MR order): which part of the MR volume was fused (see
        :func:`fused_count`)."""
        return f"slices {self.covered[0] + 1}-{self.covered[-1] + 1} of {total}"

    def full_stack(self, mr_shown: np.ndarray) -> np.ndarray:
        """The whole MR grid (8-bit): fused slices where covered, the MR alone (``mr_shown``, windowed)
        elsewhere."""
        rgb = self.slices[0].ndim == 3
        mr_shown = to_uint8(mr_shown)
        out = np.repeat(mr_shown[..., None], 3, -1) if rgb else mr_shown.copy()
        for k, img in zip(self.covered, self.slices, strict=True):
            out[k] = img
        return out


RANGE = re.compile(r"slices (\d+)-(\d+) of (\d+)")


def fused_count(text: str) -> int | None:
    """How many slices a :meth:`FusedVolume.range_text` in ``text`` names (None when there is none)."""
    m = RANGE.search(text)
    return int(m.group(2)) - int(m.group(1)) + 1 if m else None


def fuse_volumes(mr: Volume, functional: Volume, fuser: SliceFuser, *, registration: Registration | None = None,
                 functional_window: str = "full", suv_max: float = 15.0, batch_size: int = 8,
                 cache: object | None = None, cache_key: Callable[[int, list[int]], str] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> FusedVolume:
    """Resample ``functional`` onto ``mr``'s grid and fuse every MR slice it covers, ``batch_size`` at a time.

    Windows come from the whole source volumes (see models/volumes/windowing.py). ``cache`` (get/put by
    ``cache_key(mr_slice, functional_slices)``) keeps fused slices across a failed run; ``progress`` is
    called after each batch with (slices just fused, slices to fuse in all).
    """
    modality = functional_modality(functional)
    check_no_gaps(functional)
    transform: sitk.Transform | None = registration.transform if registration else None
    covered = check_overlap(functional, mr, transform)
    mr_window = window_for(mr, "mri")
    exposure = mr_exposure_problem(mr.array[covered], mr_window)
    func_window = window_for(functional, "functional", functional_window, suv_max)
    on_grid = resample_onto(functional, mr, transform)
    sources = [source_slices(functional, mr, k, transform) for k in covered]
    keys = [cache_key(k, src) for k, src in zip(covered, sources, strict=True)] if cache and cache_key else None
    fused: list[np.ndarray | None] = [cache.get(key) for key in keys] if keys else [None] * len(covered)
    todo = [n for n, y in enumerate(fused) if y is None]
    for start in range(0, len(todo), max(1, batch_size)):  # cache as we go: an outage loses one batch at most
        part = todo[start : start + batch_size]
        ks = [covered[n] for n in part]
        out = fuser.fuse(list(mr_window.apply(mr.array[ks])), list(func_window.apply(on_grid[ks])), modality)
        for n, y in zip(part, out, strict=True):
            fused[n] = y = to_uint8(y)
            if keys:
                cache.put(keys[n], y)
        if progress:
            progress(len(part), len(todo))
    return FusedVolume([y for y in fused if y is not None], covered, sources, modality, registration,
                       reused=len(covered) - len(todo), cache_keys=keys or [], warnings=[exposure] if exposure else [])
