"""DICOM in and out: slice order and pairing, modality-aware windowing, the derived fused series.

Windowing (documented choices, applied after RescaleSlope/Intercept):
* CT: the series' first WindowCenter/WindowWidth, else soft tissue (40/400 HU).
* MR: the series' window if present, else the 0.5-99.5 percentile range over the whole series.
* PT/NM grayscale, in real-world units (RescaleSlope/Intercept per slice), then the "hot" colormap
  (black-red-yellow-white, piecewise linear: R = 3v, G = 3v - 1, B = 3v - 2, clipped; the mean of R, G, B
  is the tracer value v) to make the pseudo-colour image the model's colour path expects. The range is
  ``functional_window``: "full" (default) 0 to the series' maximum, so a hot spot stays the hottest thing
  in the image (a percentile cap clipped a lesion at 2.7x cortex to cortex level); "suv" a fixed
  SUVbw range 0..``suv_max`` when SUVbw can be computed (Units BQML, PatientWeight, dose, half-life and
  injection time), else "full"; "series" the series' own window, else "full".
  RGB functional series are used as they are.
Series-level (not per-slice) ranges keep intensities comparable from slice to slice.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import uuid
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from models.imaging import hot_colormap

log = logging.getLogger("dmfnet.pacs")

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


def _seconds(tm) -> float | None:
    """DICOM TM (HHMMSS.frac) -> seconds since midnight."""
    text = str(tm or "").strip()
    if len(text) < 4:
        return None
    try:
        return int(text[0:2]) * 3600 + int(text[2:4]) * 60 + float(text[4:] or 0)
    except ValueError:
        return None


def suv_bw_factor(ds: Dataset) -> float | None:
    """Bq/ml -> SUVbw multiplier (weight / decay-corrected dose), or None when the headers cannot give it."""
    try:
        if str(getattr(ds, "Units", "")).upper() != "BQML":
            return None
        weight_g = float(ds.PatientWeight) * 1000
        rp = ds.RadiopharmaceuticalInformationSequence[0]
        dose, half_life = float(rp.RadionuclideTotalDose), float(rp.RadionuclideHalfLife)
        start, scan = _seconds(rp.RadiopharmaceuticalStartTime), _seconds(getattr(ds, "SeriesTime", None))
    except (AttributeError, IndexError, TypeError, ValueError, KeyError):
        return None
    if None in (start, scan) or dose <= 0 or half_life <= 0 or weight_g <= 0:
        return None
    elapsed = (scan - start) % 86400  # injection before midnight, scan after
    return weight_g / (dose * math.exp(-math.log(2) * elapsed / half_life))


def functional_range(datasets: list[Dataset], reals: list[np.ndarray], mode: str = "full",
                     suv_max: float = 15.0) -> tuple[float, float]:
    """(lo, hi) in real-world units for a grayscale PT/NM series (see the module docstring)."""
    first = datasets[0]
    if mode == "series":
        center, width = _first(getattr(first, "WindowCenter", None)), _first(getattr(first, "WindowWidth", None))
        if center is not None and width:
            return center - width / 2, center + width / 2
    if mode == "suv":
        factor = suv_bw_factor(first)
        if factor:
            return 0.0, suv_max / factor
        log.warning("SUVbw cannot be computed from the headers; using the full range", extra={"window": "suv"})
    return min(0.0, min(float(r.min()) for r in reals)), max(float(r.max()) for r in reals)


def window_series(datasets: list[Dataset], role: str, functional_window: str = "full",
                  suv_max: float = 15.0) -> list[np.ndarray]:
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
    lo, hi = functional_range(datasets, reals, functional_window, suv_max)
    return [hot_colormap(_window(r, lo, hi)) for r in reals]


def functional_modality(datasets: list[Dataset]) -> str:
    """ct/pet/spect from the series' Modality tag."""
    mod = str(getattr(datasets[0], "Modality", ""))
    if mod not in FUNCTIONAL:
        raise SeriesMismatch([f"functional series has Modality {mod!r}; expected CT, PT or NM"])
    return FUNCTIONAL[mod]


UID_NAMESPACE = uuid.UUID("5b0c7c1e-2f0e-4c1a-9d7e-6a8f3c2d1b00")  # this project's name-based UUID namespace


def uuid_uid(*parts: str) -> str:
    """A deterministic DICOM UID under the UUID root: ``2.25.<decimal of a name-based (v5) UUID>`` (PS3.5 B.2)."""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, '/'.join(parts)).int}"


def derived_series_uid(study: str, mri_series: str, func_series: str, weights_sha: str) -> str:
    """The fused series' UID: the same inputs and weights always name the same output, so a re-run (or the
    watcher) recognises a series that is already stored without retrieving anything."""
    return uuid_uid(study, mri_series, func_series, weights_sha, "series")


def derived_instance_uids(series_uid: str, count: int) -> list[str]:
    """SOP Instance UIDs of the fused series' slices, in slice order."""
    return [uuid_uid(series_uid, "instance", str(i)) for i in range(count)]


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
    series_refs = []  # Common Instance Reference module: the source series, each with this slice's source
    for src, ref in zip((mri, func), refs, strict=True):
        item = Dataset()
        item.SeriesInstanceUID = src.SeriesInstanceUID
        item.ReferencedInstanceSequence = Sequence([ref])
        series_refs.append(item)
    ds.ReferencedSeriesSequence = Sequence(series_refs)
    pixels = np.clip(np.round(fused * 255), 0, 255).astype(np.uint8)
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if pixels.ndim == 3:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = pixels.tobytes()
    return ds
