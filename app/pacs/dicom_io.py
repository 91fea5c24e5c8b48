"""DICOM in and out: slice order and pairing, modality-aware windowing, the derived fused series.

Windowing (documented choices, applied after RescaleSlope/Intercept):
* CT: the series' first WindowCenter/WindowWidth, else soft tissue (40/400 HU).
* MR: the series' window if present, else the 0.5-99.5 percentile range over the whole series.
* PT/NM grayscale: 0 to the series' 99.5th percentile, then the "hot" colormap (black-red-yellow-white,
  piecewise linear: R = 3v, G = 3v - 1, B = 3v - 2, clipped) to make the pseudo-colour image the model's
  colour path expects. RGB functional series are used as they are.
Series-level (not per-slice) ranges keep intensities comparable from slice to slice.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
NOT_FOR_DIAGNOSIS = "DERIVED - DM-FNet fusion - NOT FOR PRIMARY DIAGNOSIS"
FUNCTIONAL = {"CT": "ct", "PT": "pet", "NM": "spect"}
COPIED = ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
          "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
          "StudyDescription", "FrameOfReferenceUID", "PositionReferenceIndicator", "ImagePositionPatient",
          "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SliceLocation")


class SeriesMismatch(ValueError):
    """The two series cannot be paired slice by slice; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("series do not match: " + "; ".join(problems))
        self.problems = problems


def _normal(ds: Dataset) -> np.ndarray | None:
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is None or len(iop) != 6:
        return None
    row, col = np.array(iop[:3], float), np.array(iop[3:], float)
    return np.cross(row, col)


def slice_position(ds: Dataset) -> float:
    """Position along the slice normal (IPP . normal), else SliceLocation, else InstanceNumber."""
    n, ipp = _normal(ds), getattr(ds, "ImagePositionPatient", None)
    if n is not None and ipp is not None:
        return float(np.dot(np.array(ipp, float), n))
    if getattr(ds, "SliceLocation", None) is not None:
        return float(ds.SliceLocation)
    return float(getattr(ds, "InstanceNumber", 0) or 0)


def sort_series(datasets: list[Dataset]) -> list[Dataset]:
    """Slices in spatial order."""
    return sorted(datasets, key=slice_position)


def check_pairing(mri: list[Dataset], func: list[Dataset]) -> None:
    """Both series sorted; raise :class:`SeriesMismatch` listing count/orientation/grid/position problems."""
    problems = []
    if len(mri) != len(func):
        problems.append(f"slice count {len(mri)} (MR) vs {len(func)} (functional)")
    if not mri or not func:
        raise SeriesMismatch(problems or ["empty series"])
    a, b = mri[0], func[0]
    ia, ib = getattr(a, "ImageOrientationPatient", None), getattr(b, "ImageOrientationPatient", None)
    if ia is not None and ib is not None and not np.allclose(np.array(ia, float), np.array(ib, float), atol=1e-3):
        problems.append(f"orientation {list(map(float, ia))} vs {list(map(float, ib))}")
    if (a.Rows, a.Columns) != (b.Rows, b.Columns):
        problems.append(f"pixel grid {a.Columns}x{a.Rows} vs {b.Columns}x{b.Rows}")
    sa, sb = getattr(a, "PixelSpacing", None), getattr(b, "PixelSpacing", None)
    if sa is not None and sb is not None and not np.allclose(np.array(sa, float), np.array(sb, float), atol=1e-3):
        problems.append(f"pixel spacing {list(map(float, sa))} vs {list(map(float, sb))} mm")
    if len(mri) == len(func):
        off = [abs(slice_position(x) - slice_position(y)) for x, y in zip(mri, func, strict=True)]
        bad = [i for i, d in enumerate(off) if d > 0.05]
        if bad:
            problems.append(f"{len(bad)} slice positions differ by more than 0.05 mm (first at index {bad[0]})")
    if problems:
        raise SeriesMismatch(problems)


def _real(ds: Dataset) -> np.ndarray:
    arr = ds.pixel_array.astype(np.float32)
    return arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)


def _first(v) -> float | None:
    if v is None:
        return None
    try:
        return float(v[0]) if hasattr(v, "__len__") and not isinstance(v, str) else float(v)
    except (TypeError, ValueError, IndexError):
        return None


def _window(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)


def hot_colormap(v: np.ndarray) -> np.ndarray:
    """[0, 1] gray -> RGB 'hot' (black, red, yellow, white)."""
    return np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], axis=-1)


def window_series(datasets: list[Dataset], role: str) -> list[np.ndarray]:
    """Images in [0, 1] ready for fusion: role 'mri' -> gray; functional -> gray (CT) or RGB (PT/NM)."""
    first = datasets[0]
    if getattr(first, "PhotometricInterpretation", "") == "RGB":
        return [ds.pixel_array.astype(np.float32) / (2 ** int(ds.BitsStored) - 1) for ds in datasets]
    reals = [_real(ds) for ds in datasets]
    modality = str(getattr(first, "Modality", "MR"))
    center, width = _first(getattr(first, "WindowCenter", None)), _first(getattr(first, "WindowWidth", None))
    if role == "mri" or modality == "MR":
        if center is not None and width:
            lo, hi = center - width / 2, center + width / 2
        else:
            lo, hi = np.percentile(np.concatenate([r.ravel() for r in reals]), [0.5, 99.5])
        return [_window(r, lo, hi) for r in reals]
    if modality == "CT":
        center, width = (center, width) if center is not None and width else (40.0, 400.0)
        return [_window(r, center - width / 2, center + width / 2) for r in reals]
    hi = float(np.percentile(np.concatenate([r.ravel() for r in reals]), 99.5))
    return [hot_colormap(_window(r, 0.0, hi)) for r in reals]


def functional_modality(datasets: list[Dataset]) -> str:
    """ct/pet/spect from the series' Modality tag."""
    mod = str(getattr(datasets[0], "Modality", ""))
    if mod not in FUNCTIONAL:
        raise SeriesMismatch([f"functional series has Modality {mod!r}; expected CT, PT or NM"])
    return FUNCTIONAL[mod]


def derived_uids(study: str, mri_series: str, func_series: str, weights_sha: str, count: int) -> tuple[str, list[str]]:
    """Deterministic (series UID, SOP UIDs): the same inputs and weights always name the same output,
    which makes re-runs find the existing series instead of duplicating it."""
    key = [study, mri_series, func_series, weights_sha]
    series = generate_uid(entropy_srcs=[*key, "series"])
    return series, [generate_uid(entropy_srcs=[*key, "instance", str(i)]) for i in range(count)]


@dataclass
class DerivedInfo:
    """What the derived series says about itself."""

    series_uid: str
    series_number: int
    description: str
    derivation: str
    software: str


def _patient_orientation(ds: Dataset) -> list[str] | str:
    """Row and column directions as patient letters (L/R, A/P, H/F) from ImageOrientationPatient."""
    if "PatientOrientation" in ds:
        return ds.PatientOrientation
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is None or len(iop) != 6:
        return ""

    def letters(v) -> str:
        axes = [("L", "R"), ("P", "A"), ("H", "F")]
        order = np.argsort(-np.abs(np.array(v, float)))
        return "".join(axes[i][0 if v[i] > 0 else 1] for i in order if abs(v[i]) > 0.1)

    return [letters(iop[:3]), letters(iop[3:])]


def derived_dataset(mri: Dataset, func: Dataset, fused: np.ndarray, sop_uid: str, index: int,
                    info: DerivedInfo) -> Dataset:
    """One Secondary Capture instance of the fused series, in the MRI's study and geometry."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128  # a complete Part 10 file whoever serialises it (STOW clients may not add one)
    for name in COPIED:
        if name in mri:
            setattr(ds, name, mri.data_element(name).value)
    now = dt.datetime.now()
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = info.series_uid
    ds.SeriesNumber = info.series_number
    ds.InstanceNumber = index + 1
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesDescription = info.description[:64]
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = info.derivation[:1024]
    ds.ImageComments = NOT_FOR_DIAGNOSIS
    ds.BurnedInAnnotation = "NO"  # nothing is drawn into the pixels
    ds.Laterality = getattr(mri, "Laterality", "")
    ds.PatientOrientation = _patient_orientation(mri)
    ds.Manufacturer = "dmfnet"
    ds.SoftwareVersions = info.software[:64]
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.SeriesDate, ds.SeriesTime = ds.ContentDate, ds.ContentTime
    refs = []
    for src in (mri, func):
        item = Dataset()
        item.ReferencedSOPClassUID = src.SOPClassUID
        item.ReferencedSOPInstanceUID = src.SOPInstanceUID
        refs.append(item)
    ds.SourceImageSequence = Sequence(refs)
    pixels = np.clip(np.round(fused * 255), 0, 255).astype(np.uint8)
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if pixels.ndim == 3:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = pixels.tobytes()
    return ds
