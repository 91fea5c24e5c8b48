"""Volumes in patient space: an array with its physical geometry, and the two operations fusion needs on it
(which MR slices a functional volume covers, and the functional volume resampled onto the MR's grid).

Coordinates are DICOM patient coordinates (LPS, mm) throughout; NIfTI's RAS is converted on reading and
writing (models/volumes/io.py). Index order of ``array`` is (slice k, row j, column i), as SimpleITK's
``GetArrayFromImage`` gives it; a voxel's centre is ``origin + direction @ (spacing * (i, j, k))``.
Resampling and transforms are SimpleITK's (the field's standard, tested against known points in mm).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

GRID_TOLERANCE_MM = 1e-3  # two grids closer than this everywhere are the same grid (no resampling)


MAX_VOXELS = 2**28  # 268 M voxels (1 GiB as float32): a 512 x 512 x 1000 MR fits, a hostile header does not


class GeometryError(ValueError):
    """A volume cannot be built or placed in patient space; the message says what is wrong."""


@dataclass
class Volume:
    """Voxel values with their place in the patient.

    ``array``: (k, j, i) real-world values (float32), or (k, j, i, 3) RGB in [0, 1] for colour series.
    ``spacing``: mm along i (columns), j (rows), k (slices). ``direction``: 3x3, column a is the unit vector of
    index axis a in LPS. ``header``: the DICOM header of the first slice along the normal (SUV, copied
    attributes) or None (NIfTI).
    ``sources``: per slice k, the (SOP Class UID, SOP Instance UID) it came from (DICOM only).
    ``windows``: per slice k, the (lo, hi) of its own WindowCenter/Width or None (DICOM only; windowing uses
    them only when every slice agrees). ``thickness``: the median SliceThickness (DICOM; 0 when unknown).
    """

    array: np.ndarray
    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    modality: str = ""
    frame_of_reference: str = ""
    header: Any = None
    sources: list[tuple[str, str]] = field(default_factory=list)
    windows: list[tuple[float, float] | None] = field(default_factory=list)
    thickness: float = 0.0  # median SliceThickness of a DICOM series (0: unknown)

    def __post_init__(self) -> None:
        self.origin = np.asarray(self.origin, float).reshape(3)
        self.spacing = np.asarray(self.spacing, float).reshape(3)
        self.direction = np.asarray(self.direction, float).reshape(3, 3)
        if self.array.ndim not in (3, 4):
            raise GeometryError(f"a volume needs 3 dimensions, got shape {self.array.shape}")
        if np.any(self.spacing <= 0) or not np.all(np.isfinite(self.spacing)):
            raise GeometryError(f"voxel spacing must be positive, got {self.spacing.tolist()} mm")
        if not np.allclose(self.direction.T @ self.direction, np.eye(3), atol=1e-3):
            raise GeometryError("direction cosines are not orthonormal (sheared or degenerate geometry)")

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns)."""
        return tuple(self.array.shape[:3])  # type: ignore[return-value]

    @property
    def is_rgb(self) -> bool:
        """True for a colour (already pseudo-coloured) volume."""
        return self.array.ndim == 4

    def to_physical(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) continuous (i, j, k) indices -> (N, 3) LPS points in mm."""
        return self.origin + (np.asarray(ijk, float) * self.spacing) @ self.direction.T

    def to_index(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) LPS points in mm -> (N, 3) continuous (i, j, k) indices."""
        return ((np.asarray(points, float) - self.origin) @ self.direction) / self.spacing

    def slice_normal(self) -> np.ndarray:
        """Unit vector of the slice axis (k) in LPS."""
        return self.direction[:, 2]

    def to_sitk(self) -> sitk.Image:
        """The same volume as a SimpleITK image (a vector image for RGB)."""
        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array, dtype=np.float32), isVector=self.is_rgb)
        img.SetOrigin(tuple(self.origin))
        img.SetSpacing(tuple(self.spacing))
        img.SetDirection(tuple(self.direction.ravel()))
        return img

    def corners(self) -> np.ndarray:
        """(8, 3) LPS corners of the volume's extent (voxel edges, half a voxel beyond the outer centres)."""
        ni, nj, nk = self.shape[2], self.shape[1], self.shape[0]
        grid = np.array([[i, j, k] for i in (-0.5, ni - 0.5) for j in (-0.5, nj - 0.5) for k in (-0.5, nk - 0.5)])
        return self.to_physical(grid)


def different_frames(a: str, b: str) -> bool:
    """Two Frames of Reference that are both known and differ (an unknown one is not taken as a difference)."""
    return bool(a and b and a != b)


def same_grid(a: Volume, b: Volume, tol: float = GRID_TOLERANCE_MM) -> bool:
    """True when every voxel of ``a`` sits where the same voxel of ``b`` sits (within ``tol`` mm)."""
    if a.shape != b.shape:
        return False
    return bool(np.abs(a.corners() - b.corners()).max() <= tol)


def _map(transform: sitk.Transform | None, points: np.ndarray) -> np.ndarray:
    if transform is None:
        return np.asarray(points, float)
    return np.array([transform.TransformPoint(tuple(map(float, p))) for p in points])


def covered_slices(functional: Volume, mr: Volume, transform: sitk.Transform | None = None) -> list[int]:
    """MR slice indices whose plane lies within the functional volume's extent along the MR slice normal.

    ``transform`` maps MR points to functional points (identity when both share a frame of reference).
    """
    corners = functional.corners()
    if transform is not None:
        corners = _map(transform.GetInverse(), corners)
    k = mr.to_index(corners)[:, 2]
    lo, hi = k.min() - 1e-3, k.max() + 1e-3
    return [s for s in range(mr.shape[0]) if lo <= s <= hi]


def source_slices(functional: Volume, mr: Volume, mr_slice: int,
                  transform: sitk.Transform | None = None) -> list[int]:
    """Functional slice indices that the resampled values on MR slice ``mr_slice`` interpolate from."""
    nj, ni = mr.shape[1], mr.shape[2]
    plane = np.array([[i, j, mr_slice] for i in (-0.5, (ni - 1) / 2, ni - 0.5) for j in (-0.5, (nj - 1) / 2, nj - 0.5)])
    k = functional.to_index(_map(transform, mr.to_physical(plane)))[:, 2]
    lo, hi = max(0, int(np.floor(k.min()))), min(functional.shape[0] - 1, int(np.ceil(k.max())))
    return list(range(lo, hi + 1))


def resample_onto(functional: Volume, mr: Volume, transform: sitk.Transform | None = None) -> np.ndarray:
    """The functional volume's values on the MR grid (linear interpolation in mm, 0 outside its extent).

    Same grid and no transform: the functional array itself, untouched (bit-identical to pixel-to-pixel
    fusion of series that were already co-registered).
    """
    if transform is None and same_grid(functional, mr):
        return functional.array
    reference = sitk.Image(mr.shape[2], mr.shape[1], mr.shape[0], sitk.sitkUInt8)
    reference.SetOrigin(tuple(mr.origin))
    reference.SetSpacing(tuple(mr.spacing))
    reference.SetDirection(tuple(mr.direction.ravel()))
    out = sitk.Resample(functional.to_sitk(), reference, transform or sitk.Transform(), sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(out).astype(np.float32)


def check_overlap(functional: Volume, mr: Volume, transform: sitk.Transform | None = None) -> list[int]:
    """:func:`covered_slices`, raising :class:`GeometryError` when the volumes do not meet at all."""
    covered = covered_slices(functional, mr, transform)
    corners = functional.corners() if transform is None else _map(transform.GetInverse(), functional.corners())
    ij = mr.to_index(corners)[:, :2]
    inside = all(ij[:, a].max() >= -0.5 and ij[:, a].min() <= n - 0.5 for a, n in ((0, mr.shape[2]), (1, mr.shape[1])))
    if not covered or not inside:
        raise GeometryError("the functional volume does not overlap the MR volume in patient space "
                            "(no part of its extent lies within the MR's)")
    return covered
