"""DICOM slices in order, and the derived fused series out (Secondary Capture on the MR's geometry).

Reading a series into a volume lives in models/volumes/io.py, windowing in models/volumes/windowing.py.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from models.images.imaging import to_uint8
from models.volumes.io import volume_from_datasets
from models.volumes.volume import Volume
from models.volumes.windowing import window_for

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
NOT_FOR_DIAGNOSIS = "DERIVED - DM-FNet fusion - NOT FOR PRIMARY DIAGNOSIS"
COPIED = ("SpecificCharacterSet", "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
          "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
          "StudyDescription", "FrameOfReferenceUID", "PositionReferenceIndicator", "ImagePositionPatient",
          "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SliceLocation")


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


def window_series(datasets: list[Dataset], role: str, functional_window: str = "full",
                  suv_max: float = 15.0) -> list[np.ndarray]:
    """A series' slices (sorted) as [0, 1] images, windowed as models/volumes/windowing.py documents."""
    volume = volume_from_datasets(datasets)
    return list(window_for(volume, role, functional_window, suv_max).apply(volume.array))


def set_geometry(ds: Dataset, mr: Volume, k: int) -> None:
    """Plane geometry of MR slice ``k``. Classic images keep the exact values copied from their header when
    they are this slice's; otherwise (an Enhanced image keeps them per frame, a Siemens mosaic's header places
    the whole tiled image, not slice ``k``) they are written from the volume."""
    position = mr.to_physical(np.array([[0, 0, k]]))[0]
    copied = ds.get("ImagePositionPatient")
    if copied is not None and len(copied) == 3 and np.abs(np.asarray(copied, float) - position).max() < 1e-3:
        return
    ds.ImagePositionPatient = [round(float(v), 4) for v in position]
    ds.ImageOrientationPatient = [round(float(v), 6) for v in (*mr.direction[:, 0], *mr.direction[:, 1])]
    ds.PixelSpacing = [round(float(mr.spacing[1]), 4), round(float(mr.spacing[0]), 4)]
    ds.SliceThickness = round(float(mr.spacing[2]), 4)
    if "SliceLocation" in ds:
        ds.SliceLocation = round(float(np.dot(position, mr.slice_normal())), 4)


UID_NAMESPACE = uuid.UUID("5b0c7c1e-2f0e-4c1a-9d7e-6a8f3c2d1b00")  # this project's name-based UUID namespace


def uuid_uid(*parts: str) -> str:
    """A deterministic DICOM UID under the UUID root: ``2.25.<decimal of a name-based (v5) UUID>`` (PS3.5 B.2)."""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, '/'.join(parts)).int}"


IMPLEMENTATION_CLASS_UID = uuid_uid("dmfnet implementation class")


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


def derived_info(series_uid: str, mr_series: str, func_series: str, mr: Volume, func: Volume, fused,
                 model_name: str, weights_sha256: str, functional_window: str) -> DerivedInfo:
    """What a derived fused series says about itself: the fused range, the resampling, any registration."""
    fused_range = fused.range_text(mr.shape[0])
    number = 9000 + int(series_uid.rsplit(".", 1)[-1][-3:]) % 1000  # stable, out of the scanner's usual range
    registered = f" Registered: {fused.registration.describe()}." if fused.registration else ""
    return DerivedInfo(
        series_uid=series_uid, series_number=number,
        description=f"DM-FNet MR+{func.modality} {fused_range} - not for diagnosis",
        derivation=(f"DM-FNet fusion of MR series {mr_series} ({fused_range} covered by the functional volume) "
                    f"and {func.modality} series {func_series} resampled onto the MR grid (linear, mm).{registered} "
                    f"Model {model_name}, weights sha256 {weights_sha256}, functional window {functional_window}. "
                    f"{NOT_FOR_DIAGNOSIS}"),
        software=f"dmfnet {__import__('models').__version__} {model_name}",
    )


def derived_series(mr_datasets: list[Dataset], mr: Volume, func_series: str, func: Volume, fused,
                   info: DerivedInfo) -> list[Dataset]:
    """The derived instances: one per fused MR slice, on that slice's geometry, referencing the MR slice and
    the functional instances it was resampled from (``fused`` is a :class:`models.volumes.fusion.FusedVolume`)."""
    by_uid = {str(d.SOPInstanceUID): d for d in mr_datasets}
    sop_uids = derived_instance_uids(info.series_uid, len(fused.covered))
    out = []
    for n, (k, src, y) in enumerate(zip(fused.covered, fused.sources, fused.slices, strict=True)):
        ds = derived_dataset(by_uid[mr.sources[k][1]], func_series, [func.sources[i] for i in src if func.sources], y,
                             sop_uids[n],
                             n, info)
        set_geometry(ds, mr, k)
        out.append(ds)
    return out


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


def derived_dataset(mri: Dataset, func_series: str, func_refs: list[tuple[str, str]], fused: np.ndarray,
                    sop_uid: str, index: int, info: DerivedInfo) -> Dataset:
    """One Secondary Capture instance of the fused series on the MR slice's geometry, referencing that MR
    slice and the functional instances (SOP Class, SOP Instance UIDs) it was resampled from."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # The whole group 2 a Part 10 file needs, set here because a STOW-RS client writes the meta as it finds it
    # (pydicom without enforce_file_format): without these Orthanc stored files dciodvfy reports 3 errors on.
    meta.FileMetaInformationGroupLength = 0  # pydicom writes the true length whenever the element is present
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = f"DMFNET_{__import__('models').__version__}"[:16]
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
    def refs(pairs: list[tuple[str, str]]) -> list[Dataset]:
        out = []
        for cls, uid in dict.fromkeys(pairs):
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, uid
            out.append(item)
        return out

    mr_ref, func_ref = refs([(str(mri.SOPClassUID), str(mri.SOPInstanceUID))]), refs(func_refs)
    ds.SourceImageSequence = Sequence([*mr_ref, *func_ref])
    series_refs = []  # Common Instance Reference module: the source series, each with this slice's sources
    for uid, items in ((str(mri.SeriesInstanceUID), mr_ref), (func_series, refs(func_refs))):
        item = Dataset()
        item.SeriesInstanceUID = uid
        item.ReferencedInstanceSequence = Sequence(items)
        series_refs.append(item)
    ds.ReferencedSeriesSequence = Sequence(series_refs)
    pixels = to_uint8(fused)
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if pixels.ndim == 3:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = pixels.tobytes()
    return ds
