"""An analytic head phantom defined in patient coordinates (LPS, mm): sample it on any grid, in any Frame of
Reference, so tests know where every structure, and the hot lesion, truly is.

Structures (semi-axes in mm): head ellipsoid (70, 85, 60) at the origin with a skull shell, grey/white
matter, two ventricles, an air-filled sinus in front on the left (it breaks the symmetry a registration
needs), and a hot lesion (Gaussian, sigma 3.5 mm) at :data:`LESION_LPS` with 2.7x cortex uptake on PET/SPECT.
"""

from __future__ import annotations

import numpy as np

from models.volumes.volume import Volume

LESION_LPS = np.array([22.0, -18.0, 6.0])
LESION_SIGMA_MM = 3.5
CORTEX_BQML = 14_000.0
LESION_RATIO = 2.7
HEAD_AXES = np.array([70.0, 85.0, 60.0])

# value per tissue: (background, skull, grey matter, white matter, ventricles, sinus)
TISSUES = {
    "MR": (0.0, 150.0, 520.0, 760.0, 120.0, 60.0),  # T1-like
    "CT": (-1000.0, 1200.0, 38.0, 28.0, 6.0, -900.0),  # HU
    "PT": (0.0, 1_500.0, CORTEX_BQML, 5_000.0, 1_000.0, 0.0),  # Bq/ml
    "NM": (0.0, 300.0, 3_000.0, 1_100.0, 200.0, 0.0),  # counts
}


def head_values(points: np.ndarray, modality: str, lesion: bool = True) -> np.ndarray:
    """Values of the phantom at (N, 3) LPS points (mm) for MR, CT, PT or NM."""
    bg, skull, grey, white, csf, air = TISSUES[modality]
    r = np.linalg.norm(points / HEAD_AXES, axis=1)
    out = np.full(len(points), bg, np.float32)
    out[r < 1.0] = skull
    out[r < 0.9] = grey
    out[r < 0.72] = white
    for side in (-12.0, 12.0):
        d = np.linalg.norm((points - [side, 5.0, 10.0]) / [6.0, 18.0, 10.0], axis=1)
        out[d < 1.0] = csf
    sinus = np.linalg.norm((points - [25.0, -62.0, -28.0]) / [12.0, 10.0, 9.0], axis=1) < 1.0
    out[sinus] = air
    if lesion and modality in ("PT", "NM"):
        g = np.exp(-np.sum((points - LESION_LPS) ** 2, axis=1) / (2 * LESION_SIGMA_MM**2))
        peak = grey * LESION_RATIO
        out = np.where(g > 1e-4, out + (peak - out) * g, out).astype(np.float32)
    return out


def axes(orientation: str, tilt_deg: float = 0.0) -> np.ndarray:
    """Direction matrix (columns: row, column, slice axes in LPS) of an axial/sagittal/coronal grid, optionally
    tilted by ``tilt_deg`` about the left-right axis (an oblique acquisition)."""
    base = {"axial": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
            "sagittal": [[0, 1, 0], [0, 0, -1], [-1, 0, 0]],
            "coronal": [[1, 0, 0], [0, 0, -1], [0, 1, 0]]}[orientation]
    d = np.array(base, float).T
    a = np.radians(tilt_deg)
    tilt = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    return tilt @ d


def centred_grid(size: int, pixel_mm: float, slices: int, slice_mm: float, direction: np.ndarray,
                 centre: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin, spacing, direction) of a grid of size x size x slices centred on ``centre`` (LPS mm)."""
    spacing = np.array([pixel_mm, pixel_mm, slice_mm])
    half = (np.array([size, size, slices]) - 1) / 2 * spacing
    origin = (np.zeros(3) if centre is None else np.asarray(centre, float)) - direction @ half
    return origin, spacing, direction


def sample(modality: str, size: int, pixel_mm: float, slices: int, slice_mm: float, orientation: str = "axial",
           tilt_deg: float = 0.0, centre=None, lesion: bool = True, scanner_from_patient=None) -> Volume:
    """The phantom sampled on a grid (values at voxel centres).

    ``scanner_from_patient`` (a 4x4 rigid matrix) puts the grid in another Frame of Reference: the grid is
    laid out in scanner coordinates and each voxel shows the patient point the matrix maps to it.
    """
    origin, spacing, direction = centred_grid(size, pixel_mm, slices, slice_mm, axes(orientation, tilt_deg), centre)
    j, i = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    m = None if scanner_from_patient is None else np.linalg.inv(np.asarray(scanner_from_patient, float))
    values = np.empty((slices, size, size), np.float32)
    for k in range(slices):  # slice by slice: a 512 x 512 x 200 phantom stays within a few hundred MB
        ijk = np.stack([i.ravel(), j.ravel(), np.full(i.size, k)], axis=1).astype(float)
        points = origin + (ijk * spacing) @ direction.T
        if m is not None:
            points = points @ m[:3, :3].T + m[:3, 3]
        values[k] = head_values(points, modality, lesion).reshape(size, size)
    return Volume(values, origin, spacing, direction, modality=modality)


def rigid(rotation_deg: tuple[float, float, float], translation_mm: tuple[float, float, float]) -> np.ndarray:
    """4x4 matrix: rotation about x, then y, then z (degrees), then translation (mm)."""
    ax, ay, az = np.radians(rotation_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rz @ ry @ rx
    m[:3, 3] = translation_mm
    return m


def pet_around(mr: Volume, lesion_lps: np.ndarray, pixel_mm: float = 2.6) -> Volume:
    """An axial PET (``pixel_mm`` voxels) covering any MR volume (a real one too): 4,000 Bq/ml inside the MR's box
    and a hot lesion (2.7x cortex, sigma 3.5 mm) at ``lesion_lps``, in the MR's Frame of Reference."""
    corners = np.array([[a, b, c] for a in (0, mr.shape[2] - 1) for b in (0, mr.shape[1] - 1)
                        for c in (0, mr.shape[0] - 1)], float)
    lps = mr.to_physical(corners)
    lo, hi = lps.min(0) - 10, lps.max(0) + 10
    size = np.ceil((hi - lo) / pixel_mm).astype(int) + 1
    i, j, k = np.meshgrid(*(np.arange(n) for n in size), indexing="ij")
    points = lo + np.stack([i, j, k], -1) * pixel_mm
    inside = np.all((points > lps.min(0)) & (points < lps.max(0)), axis=-1)
    d2 = ((points - lesion_lps) ** 2).sum(-1)
    values = 4000.0 * inside + CORTEX_BQML * LESION_RATIO * np.exp(-d2 / (2 * LESION_SIGMA_MM**2))
    return Volume(np.transpose(values, (2, 1, 0)).astype(np.float32), lo, [pixel_mm] * 3, np.eye(3),
                  modality="PT", frame_of_reference=mr.frame_of_reference)
