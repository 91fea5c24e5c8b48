"""A synthetic, co-registered MR + PET + CT study with realistic headers (tests and demos; no real patient)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from models.images.phantoms import phantom_pair
from models.volumes.volume import Volume

SOP = {"MR": "1.2.840.10008.5.1.4.1.1.4", "PT": "1.2.840.10008.5.1.4.1.1.128", "CT": "1.2.840.10008.5.1.4.1.1.2",
       "NM": "1.2.840.10008.5.1.4.1.1.20"}


def _slice(study: Dataset, series_uid: str, modality: str, number: int, index: int, pixels: np.ndarray,
           slope: float, intercept: float, z: float, geometry: tuple | None = None) -> Dataset:
    """One classic image; ``geometry`` = (ImagePositionPatient, ImageOrientationPatient, PixelSpacing,
    SliceThickness), else an axial 1 mm grid at height ``z``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP[modality]
    meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for k in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
              "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "FrameOfReferenceUID",
              "StudyDescription"):
        setattr(ds, k, getattr(study, k))
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID, ds.SOPInstanceUID = SOP[modality], uid
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = modality, series_uid, number, index + 1
    ds.SeriesDescription = {"MR": "T2 AX", "PT": "PET FDG AC", "CT": "CT HEAD", "NM": "SPECT"}[modality]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Manufacturer, ds.PatientPosition, ds.PositionReferenceIndicator, ds.Laterality = "PHANTOM", "HFS", "", ""
    if modality == "MR":
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 4000, 100, 8
    ipp, iop, spacing, thickness = geometry or ([-64.0, -64.0, z], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0], [1.0, 1.0], 3.0)
    ds.ImagePositionPatient = [round(float(v), 4) for v in ipp]
    ds.ImageOrientationPatient = [round(float(v), 6) for v in iop]
    ds.PixelSpacing = [round(float(v), 4) for v in spacing]
    ds.SliceThickness = round(float(thickness), 4)
    ds.SliceLocation = round(float(np.dot(ipp, np.cross(iop[:3], iop[3:]))), 4)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if modality == "CT":
        ds.WindowCenter, ds.WindowWidth = 40, 400
    stored = np.round((pixels - intercept) / slope).clip(0, 65535).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    return ds


CORTEX_BQML = 14_000.0  # FDG uptake of grey matter in the hot-lesion phantom (Bq/ml)
LESION_RATIO = 2.7  # the lesion's uptake relative to cortex
LESION_CENTRE = (0.35, 0.3)  # (y, x) as fractions of the image size
LESION_RADIUS = 0.05


def hot_lesion_pet(size: int, lesion: bool = True) -> np.ndarray:
    """PET activity (Bq/ml): white matter 5,000, a cortex band at 14,000 and (optionally) a lesion at 2.7x
    cortex. The lesion is small, as real ones are: under 0.5% of a study's voxels, so a 99.5th-percentile
    window tops out at cortex level."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    r = np.hypot((y - 0.5) / 0.42, (x - 0.5) / 0.36)
    act = np.where(r < 1.0, 5_000.0, 0.0) + np.where((r > 0.75) & (r < 1.0), CORTEX_BQML - 5_000.0, 0.0)
    spot = lesion & (np.hypot(y - LESION_CENTRE[0], x - LESION_CENTRE[1]) < LESION_RADIUS)
    return np.where(spot, CORTEX_BQML * LESION_RATIO, act).astype(np.float32)


def _suv_headers(ds: Dataset) -> None:
    """What an FDG PET series carries to compute SUVbw: 70 kg, 370 MBq injected an hour before the series."""
    ds.Units, ds.DecayCorrection, ds.PatientWeight, ds.SeriesTime = "BQML", "START", 70.0, "120000"
    rp = Dataset()
    rp.RadiopharmaceuticalStartTime, rp.RadionuclideTotalDose, rp.RadionuclideHalfLife = "110000", 370e6, 6586.2
    ds.RadiopharmaceuticalInformationSequence = [rp]


def new_study(seed: int = 0) -> Dataset:
    """Patient and study attributes shared by every series of one phantom study."""
    study = Dataset()
    study.PatientName, study.PatientID = "PHANTOM^TEST", f"PHANTOM{seed:04d}"
    study.PatientBirthDate, study.PatientSex = "19700101", "O"
    study.StudyInstanceUID, study.FrameOfReferenceUID = generate_uid(), generate_uid()
    study.StudyDate, study.StudyTime, study.StudyID = "20261125", "120000", "1"
    study.AccessionNumber, study.ReferringPhysicianName, study.StudyDescription = "ACC0001", "", "Phantom study"
    return study


def series_from_volume(study: Dataset, volume: Volume, number: int, frame_of_reference: str | None = None,
                       slope_per_slice: bool = False) -> list[Dataset]:
    """A volume's slices as one classic DICOM series of ``study`` (its geometry, 16-bit with rescale).

    ``frame_of_reference``: another FrameOfReferenceUID than the study's (a second scanner's coordinates).
    """
    series_uid = generate_uid()
    iop = [*volume.direction[:, 0], *volume.direction[:, 1]]
    spacing = [volume.spacing[1], volume.spacing[0]]
    lo = min(0.0, float(volume.array.min()))
    items = []
    for k in range(volume.shape[0]):
        values = volume.array[k]
        top = max(float(values.max()) - lo, 1.0)
        slope = top / 60000 * (1.0 + 0.1 * k if slope_per_slice else 1.0)
        ipp = volume.origin + volume.direction[:, 2] * volume.spacing[2] * k
        ds = _slice(study, series_uid, volume.modality, number, k, values, slope, lo, 0.0,
                    (ipp, iop, spacing, volume.spacing[2]))
        if frame_of_reference:
            ds.FrameOfReferenceUID = frame_of_reference
        if volume.modality == "PT":
            _suv_headers(ds)
        items.append(ds)
    return items


def make_study(slices: int = 3, size: int = 64, seed: int = 0, hot_lesion: bool = False) -> dict[str, list[Dataset]]:
    """{'MR': [...], 'PT': [...], 'CT': [...]} of one study; slices listed in shuffled order (as PACS return them).

    ``hot_lesion``: the PET is :func:`hot_lesion_pet` (the lesion in the middle slice only) with per-slice
    rescale slopes and SUV headers.
    """
    rng = np.random.default_rng(seed)
    study = new_study(seed)
    out: dict[str, list[Dataset]] = {}
    for number, modality in enumerate(("MR", "PT", "CT"), start=1):
        series_uid = generate_uid()
        items = []
        for i in range(slices):
            mri, other = phantom_pair("ct" if modality == "CT" else "pet", size, size, seed=seed * 100 + i)
            if modality == "MR":
                img, slope, intercept = mri * 1200.0, 1.0, 0.0
            elif modality == "PT" and hot_lesion:
                img, slope, intercept = hot_lesion_pet(size, i == slices // 2), 0.6 + 0.1 * i, 0.0  # slope per slice
            elif modality == "PT":
                img, slope, intercept = (other.mean(-1) if other.ndim == 3 else other) * 25000.0, 0.5, 0.0
            else:
                img, slope, intercept = other * 1400.0 - 1000.0, 1.0, -1024.0
            items.append(_slice(study, series_uid, modality, number, i, img, slope, intercept, z=3.0 * i))
            if modality == "PT" and hot_lesion:
                _suv_headers(items[-1])
        order = rng.permutation(slices)
        out[modality] = [items[j] for j in order]
    return out


def write_series_folder(folder: Path, *series: list) -> Path:
    """Every dataset of ``series`` as a Part 10 file named by its SOP Instance UID in ``folder`` (what storescu
    sends from)."""
    folder.mkdir(parents=True, exist_ok=True)
    for items in series:
        for ds in items:
            ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return folder
