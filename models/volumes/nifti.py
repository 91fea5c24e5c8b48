"""NIfTI in and out: a NIfTI file -> :class:`Volume`, and a fused volume -> NIfTI on the MR's grid. NIfTI is read
with nibabel (explicit qform/sform codes, RGB24 on writing); its RAS world is converted to DICOM's LPS."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.volumes.volume import MAX_VOXELS, GeometryError, Volume

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_nifti(path: str | Path) -> bool:
    """True for a .nii or .nii.gz path."""
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def read_nifti(path: str | Path, modality: str = "") -> Volume:
    """A 3-D NIfTI file -> :class:`Volume` in LPS; refuses 4-D data and files without a valid affine."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for a corrupt file; all mean the same here
        raise GeometryError(f"{path}: not a readable NIfTI file ({type(exc).__name__})") from None
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise GeometryError(f"{path}: a 3-D volume is needed, this one has shape {tuple(img.shape)} "
                            "(4-D: pick one frame, e.g. with fslroi)")
    if int(img.header["qform_code"]) == 0 and int(img.header["sform_code"]) == 0:
        raise GeometryError(f"{path}: no valid affine (qform_code and sform_code are both 0): its place in "
                            "the patient is unknown")
    affine = LPS_FROM_RAS @ np.asarray(img.affine, float)
    matrix = affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    if not np.all(np.isfinite(affine)) or np.any(spacing <= 0) or abs(np.linalg.det(matrix)) < 1e-9:
        raise GeometryError(f"{path}: the affine is singular or not finite")
    if int(np.prod(shape)) > MAX_VOXELS:
        raise GeometryError(f"{path}: {shape} exceeds {MAX_VOXELS} voxels")
    dtype = img.get_data_dtype()
    if dtype.names:  # RGB24: a colour (already pseudo-coloured) volume
        raw = np.asarray(img.dataobj).reshape(shape)
        data = np.stack([raw[n] for n in dtype.names[:3]], axis=-1).astype(np.float32) / 255
        array = np.transpose(data, (2, 1, 0, 3))
    else:
        array = np.transpose(np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape), (2, 1, 0))
    return Volume(np.ascontiguousarray(array), affine[:3, 3], spacing, matrix / spacing, modality=modality)


def ras_affine(volume: Volume) -> np.ndarray:
    """The volume's NIfTI affine (voxel (i, j, k) -> RAS mm)."""
    affine = np.eye(4)
    affine[:3, :3] = volume.direction * volume.spacing
    affine[:3, 3] = volume.origin
    return LPS_FROM_RAS @ affine  # LPS -> RAS (the matrix is its own inverse)


def save_nifti(path: str | Path, volume: Volume, description: str = "") -> None:
    """A volume's real-world values as float32 NIfTI (what dcm2niix gives researchers)."""
    import nibabel as nib

    affine = ras_affine(volume)
    img = nib.Nifti1Image(np.transpose(volume.array, (2, 1, 0)).astype(np.float32), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = description[:79].encode()
    nib.save(img, str(path))


def write_nifti(path: str | Path, reference: Volume, slices: np.ndarray, description: str) -> None:
    """Fused slices (k, j, i) gray or (k, j, i, 3) RGB, 8-bit or [0, 1] -> NIfTI (uint8 / RGB24) on
    ``reference``'s grid."""
    import nibabel as nib

    from models.images.imaging import to_uint8

    pixels = to_uint8(slices)
    affine = ras_affine(reference)
    if pixels.ndim == 4:  # RGB24: each voxel's three bytes viewed as one record, in place (no per-channel copies)
        pixels = np.ascontiguousarray(pixels).view([("R", "u1"), ("G", "u1"), ("B", "u1")])[..., 0]
    data = np.transpose(pixels, (2, 1, 0))  # (i, j, k): NIfTI's Fortran order is the slices' own C order
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = description[:79].encode()
    nib.save(img, str(path))
