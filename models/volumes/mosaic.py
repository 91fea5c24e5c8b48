"""Siemens mosaic images: one file that holds every slice of a volume, tiled in a square grid.

Siemens writes EPI, diffusion (b=0, SBRef) and other 2-D multi-slice acquisitions as one image per volume with
ImageType ``MOSAIC``: ``N`` slices of ``r x c`` pixels tiled row by row in a ``ceil(sqrt(N))`` grid. Read as a
plain image it is one wrong, huge slice, so it is unpacked here the way dcm2niix and nibabel do:

* ``N`` from the private tag (0019,100A) NumberOfImagesInMosaic (the CSA image header's value as a fallback);
* ImagePositionPatient of a mosaic is that of the top-left pixel of the whole grid, as if the first slice were
  centred in it, so the first slice's position is shifted by half the unused grid along the row and column
  directions: ``IPP + row * dx * (Columns - c) / 2 + col * dy * (Rows - r) / 2``;
* the slices follow the CSA header's SliceNormalVector (its sign, not the cross product of the orientation,
  says which way the slices were acquired), ``SpacingBetweenSlices`` apart (else ``SliceThickness``).

Without the CSA slice normal the slice order is unknown: such a file is refused, naming why.
The CSA header is read with nibabel's ``nicom.csareader`` (a maintained parser of Siemens' private format).
"""

from __future__ import annotations

import math

import numpy as np
from pydicom.dataset import Dataset

from models.volumes.volume import GeometryError

_N_IMAGES_TAG = (0x0019, 0x100A)


def is_mosaic(ds: Dataset) -> bool:
    """True for a Siemens mosaic (ImageType contains MOSAIC)."""
    return any(str(v).upper() == "MOSAIC" for v in (ds.get("ImageType") or []))


def _csareader():
    """nibabel's CSA parser (its package warns on import that its *DICOM readers* are experimental; only the
    CSA header parser is used here)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import csareader
    return csareader


def _csa(ds: Dataset):
    csareader = _csareader()
    try:
        return csareader.get_csa_header(ds, "image")
    except Exception:  # a corrupt private header reads as missing; the refusal below names it
        return None


def mosaic_count(ds: Dataset, csa=None) -> int:
    """Number of slices tiled in the mosaic (GeometryError when no header says it)."""
    csareader = _csareader()

    value = ds.get(_N_IMAGES_TAG)
    count = None
    if value is not None:
        try:
            count = int(value.value if not isinstance(value.value, bytes) else int.from_bytes(value.value, "little"))
        except (TypeError, ValueError):
            count = None
    if count is None and csa is not None:
        count = csareader.get_n_mosaic(csa)
    if not count or count < 1:
        raise GeometryError("Siemens mosaic without its number of images ((0019,100A) or the CSA header): "
                            "its slices cannot be unpacked")
    return int(count)


def unpack_mosaic(ds: Dataset, pixels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], float]:
    """A mosaic's slices (N, r, c), each slice's ImagePositionPatient, and the slice spacing in mm."""
    csareader = _csareader()

    csa = _csa(ds)
    count = mosaic_count(ds, csa)
    grid = math.ceil(math.sqrt(count))
    rows, cols = pixels.shape[-2:]
    if pixels.ndim != 2 or rows % grid or cols % grid:
        raise GeometryError(f"Siemens mosaic of {count} images does not tile its {cols}x{rows} matrix "
                            f"in a {grid}x{grid} grid")
    normal = csareader.get_slice_normal(csa) if csa is not None else None
    if normal is None:
        raise GeometryError("Siemens mosaic without the CSA SliceNormalVector: the order of its slices is "
                            "unknown, so it is refused rather than stacked in a guessed direction")
    normal = np.asarray(normal, float)
    normal = normal / np.linalg.norm(normal)
    r, c = rows // grid, cols // grid
    tiles = pixels.reshape(grid, r, grid, c).transpose(0, 2, 1, 3).reshape(grid * grid, r, c)[:count]
    iop = np.asarray(ds.ImageOrientationPatient, float)
    dy, dx = (float(v) for v in ds.PixelSpacing)
    first = (np.asarray(ds.ImagePositionPatient, float) + iop[:3] * dx * (cols - c) / 2
             + iop[3:] * dy * (rows - r) / 2)
    step = float(ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 0)
    if step <= 0:
        raise GeometryError("Siemens mosaic without SpacingBetweenSlices or SliceThickness: its slices "
                            "cannot be placed")
    return np.ascontiguousarray(tiles), [first + k * step * normal for k in range(count)], step
