"""Refusals cost nothing (#43): a series' shape is decided from its headers, and pixels are decoded only for the
frames a volume uses."""

from __future__ import annotations

import copy

import pytest

from harness.studies import new_study, series_from_volume
from models.volumes import io as volume_io
from models.volumes import phantom as pv
from models.volumes.io import read_dicom_folder
from models.volumes.volume import GeometryError


def _four_d(folder, time_points: int = 3, slices: int = 4) -> None:
    base = series_from_volume(new_study(3), pv.sample("MR", 32, 4.0, slices, 4.0), 1)
    for t in range(time_points):
        for ds in base:
            frame = copy.deepcopy(ds)
            frame.SOPInstanceUID = frame.file_meta.MediaStorageSOPInstanceUID = f"{ds.SOPInstanceUID[:56]}.{t + 1}"
            frame.TemporalPositionIdentifier = t + 1
            frame.save_as(folder / f"{frame.SOPInstanceUID}.dcm", enforce_file_format=True)


def test_a_4d_folder_is_refused_without_decoding_a_pixel_and_a_frame_decodes_only_its_own(tmp_path, monkeypatch):
    _four_d(tmp_path)
    decoded = []
    real = volume_io._pixels
    monkeypatch.setattr(volume_io, "_pixels", lambda ds: decoded.append(ds.SOPInstanceUID) or real(ds))
    with pytest.raises(GeometryError, match="4-D: 3 time points x 4 slices"):
        read_dicom_folder(tmp_path)
    assert decoded == []  # the shape came from the headers
    volume, _ = read_dicom_folder(tmp_path, frame=1)
    assert volume.shape == (4, 32, 32)
    assert len(decoded) == 4 and all(uid.endswith(".2") for uid in decoded)  # time point 1 only


def test_a_deferred_folder_gives_the_same_volume_as_fully_read_files(tmp_path):
    import numpy as np

    from models.volumes.io import parse_dicom, volume_from_datasets

    series = series_from_volume(new_study(4), pv.sample("PT", 24, 4.0, 5, 4.0), 2)
    for ds in series:
        ds.save_as(tmp_path / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    deferred, _ = read_dicom_folder(tmp_path)
    full = volume_from_datasets([parse_dicom(p.read_bytes()) for p in sorted(tmp_path.iterdir())])
    np.testing.assert_array_equal(deferred.array, full.array)
