"""A synthetic, co-registered MR + PET + CT study with realistic headers (tests and demos; no real patient)."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from models.phantoms import phantom_pair

SOP = {"MR": "1.2.840.10008.5.1.4.1.1.4", "PT": "1.2.840.10008.5.1.4.1.1.128", "CT": "1.2.840.10008.5.1.4.1.1.2"}


def _slice(study: Dataset, series_uid: str, modality: str, number: int, index: int, pixels: np.ndarray,
           slope: float, intercept: float, z: float) -> Dataset:
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
    ds.SeriesDescription = {"MR": "T2 AX", "PT": "PET FDG AC", "CT": "CT HEAD"}[modality]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Manufacturer, ds.PatientPosition, ds.PositionReferenceIndicator, ds.Laterality = "PHANTOM", "HFS", "", ""
    if modality == "MR":
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
        ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = 4000, 100, 8
    ds.ImagePositionPatient = [-64.0, -64.0, z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 3.0
    ds.SliceLocation = z
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if modality == "CT":
        ds.WindowCenter, ds.WindowWidth = 40, 400
    stored = np.round((pixels - intercept) / slope).clip(0, 65535).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    return ds


def make_study(slices: int = 3, size: int = 64, seed: int = 0) -> dict[str, list[Dataset]]:
    """{'MR': [...], 'PT': [...], 'CT': [...]} of one study; slices listed in shuffled order (as PACS return them)."""
    rng = np.random.default_rng(seed)
    study = Dataset()
    study.PatientName, study.PatientID = "PHANTOM^TEST", f"PHANTOM{seed:04d}"
    study.PatientBirthDate, study.PatientSex = "19700101", "O"
    study.StudyInstanceUID, study.FrameOfReferenceUID = generate_uid(), generate_uid()
    study.StudyDate, study.StudyTime, study.StudyID = "20261125", "120000", "1"
    study.AccessionNumber, study.ReferringPhysicianName, study.StudyDescription = "ACC0001", "", "Phantom study"
    out: dict[str, list[Dataset]] = {}
    for number, modality in enumerate(("MR", "PT", "CT"), start=1):
        series_uid = generate_uid()
        items = []
        for i in range(slices):
            mri, other = phantom_pair("ct" if modality == "CT" else "pet", size, size, seed=seed * 100 + i)
            if modality == "MR":
                img, slope, intercept = mri * 1200.0, 1.0, 0.0
            elif modality == "PT":
                img, slope, intercept = (other.mean(-1) if other.ndim == 3 else other) * 25000.0, 0.5, 0.0
            else:
                img, slope, intercept = other * 1400.0 - 1000.0, 1.0, -1024.0
            items.append(_slice(study, series_uid, modality, number, i, img, slope, intercept, z=3.0 * i))
        order = rng.permutation(slices)
        out[modality] = [items[j] for j in order]
    return out
