"""dcm2niix, the field's reference DICOM converter, as an independent reading of a series (tests only).

``dcm2niix_read(folder)`` converts a folder and returns its NIfTI images; ``compare_with_dcm2niix`` checks that
our :class:`Volume` has the same voxel centres in mm and the same values as one of them.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from models.volumes.nifti import LPS_FROM_RAS
from models.volumes.volume import Volume


def dcm2niix_read(folder: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(data x,y,z[,t] after its scaling, RAS affine)] of every image dcm2niix makes of ``folder``."""
    import nibabel as nib

    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-f", "%s_%e_%t_%d", "-o", out, str(folder)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        images = []
        for path in sorted(Path(out).glob("*.nii")):
            img = nib.load(str(path))
            images.append((np.asarray(img.get_fdata(dtype=np.float32)), np.asarray(img.affine, float)))
        return images


def have_dcm2niix() -> bool:
    """True where the dcm2niix binary is installed (scripts/install-test-deps.sh installs it)."""
    return shutil.which("dcm2niix") is not None


def compare_with_dcm2niix(volume: Volume, data: np.ndarray, affine_ras: np.ndarray, tol_mm: float = 0.01) -> dict:
    """Every voxel of ours beside dcm2niix's voxel at the same place: returns the largest distance between their
    centres (mm) and the largest value difference. The index map between the grids comes from the affines and
    must be a signed permutation onto their whole grid (AssertionError otherwise)."""
    ours = np.eye(4)
    ours[:3, :3] = volume.direction * volume.spacing
    ours[:3, 3] = volume.origin
    theirs = LPS_FROM_RAS @ affine_ras  # their voxel (x, y, z) -> LPS mm
    m = np.linalg.inv(theirs) @ ours  # our voxel (i, j, k) -> their voxel
    perm, offset = np.round(m[:3, :3]), np.round(m[:3, 3])
    assert (np.abs(perm).sum(0) == 1).all() and (np.abs(perm).sum(1) == 1).all(), f"grids differ: {m}"
    assert data.ndim == 3, f"dcm2niix made a {data.ndim}-D image {data.shape}: not one volume"
    size = np.array(volume.array.shape[:3][::-1])  # (i, j, k) extents
    corners = np.array([[a, b, c] for a in (0, size[0] - 1) for b in (0, size[1] - 1) for c in (0, size[2] - 1)],
                       float)
    mapped = corners @ perm.T + offset
    centre_mm = float(np.linalg.norm((np.c_[mapped, np.ones(8)] @ theirs.T - np.c_[corners, np.ones(8)] @ ours.T)
                                     [:, :3], axis=1).max())
    assert centre_mm <= tol_mm, f"voxel centres differ by {centre_mm:.4f} mm"
    k, j, i = np.indices(volume.array.shape[:3]).reshape(3, -1)
    idx = (np.stack([i, j, k], 1) @ perm.T + offset).astype(int)
    assert (idx >= 0).all() and (idx < np.array(data.shape)).all(), "our grid reaches outside dcm2niix's"
    assert int(np.prod(data.shape)) == len(i), f"dcm2niix's grid {data.shape} is not ours {tuple(size)}"
    value = float(np.abs(data[idx[:, 0], idx[:, 1], idx[:, 2]].astype(np.float64) - volume.array[k, j, i]).max())
    return {"centre_mm": centre_mm, "value": value}
