"""Realistic study shapes through a real Orthanc (pushed with dcmtk's storescu) over both transports: different
grids, orientations and Frames of Reference; the lesion, placed in mm, must come out where it is."""

from __future__ import annotations

import shutil
import subprocess
import zlib
from io import BytesIO

import httpx
import numpy as np
import pydicom
import pytest

from app.pacs.transport import DicomWebTransport, DimseTransport
from app.pacs.workflow import InProcessFuser, ServiceFuser, fuse_study
from harness.orthanc import dicom_bytes, pacs_settings
from harness.studies import new_study, series_from_volume
from models.images.colour import hot_colormap
from models.volumes import phantom as pv
from models.volumes.io import volume_from_datasets
from models.volumes.registration import RegistrationRefused
from models.volumes.volume import GeometryError
from tests.lesion import assert_lesion_in_place
from tests.models.volumes.test_volumes import SHAPES, study_volumes

pytestmark = pytest.mark.system  # real servers, tools or builds: see pyproject markers

TRANSPORTS = {"dicomweb": DicomWebTransport, "dimse": DimseTransport}


@pytest.fixture(scope="module")
def fast_fuser():
    from models.inference.weights import open_pipeline

    return InProcessFuser(open_pipeline("fast", "cpu"))


def push(orthanc: dict, folder, *series: list) -> None:
    """Write the series as files and push them with dcmtk's storescu (an independent DICOM client)."""
    if not shutil.which("/usr/bin/storescu"):
        pytest.skip("dcmtk not installed (scripts/install-test-deps.sh installs it)")
    folder.mkdir(parents=True, exist_ok=True)
    for items in series:
        for ds in items:
            ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    subprocess.run(["/usr/bin/storescu", "-aec", "ORTHANC", "+sd", "127.0.0.1", str(orthanc["dicom"]), str(folder)],
                   check=True, capture_output=True)


def stored_series(orthanc: dict, series_uid: str) -> list[pydicom.Dataset]:
    ids = httpx.post(f"{orthanc['base']}/tools/lookup", content=series_uid).json()
    series_id = next(i["ID"] for i in ids if i["Type"] == "Series")
    return [pydicom.dcmread(BytesIO(httpx.get(f"{orthanc['base']}/instances/{i['ID']}/file").content))
            for i in httpx.get(f"{orthanc['base']}/series/{series_id}/instances").json()]


def study_count(orthanc: dict, study_uid: str) -> int:
    ids = httpx.post(f"{orthanc['base']}/tools/lookup", content=study_uid).json()
    study_id = next(i["ID"] for i in ids if i["Type"] == "Study")
    return len(httpx.get(f"{orthanc['base']}/studies/{study_id}/series").json())


def check_stored(orthanc, report, mr_series, func_series, functional_mm: float) -> dict:
    """The stored derived series lies on the MR's slices, references its sources and shows the lesion in place."""
    stored = stored_series(orthanc, report.series_uid)
    assert len(stored) == report.instances > 0
    mr_by_uid = {d.SOPInstanceUID: d for d in mr_series}
    func_uids = {d.SOPInstanceUID for d in func_series}
    for ds in stored:
        refs = {r.ReferencedSOPInstanceUID for r in ds.SourceImageSequence}
        mr_ref = refs & set(mr_by_uid)
        assert len(mr_ref) == 1 and refs - mr_ref and refs - mr_ref <= func_uids
        assert list(ds.ImagePositionPatient) == list(mr_by_uid[mr_ref.pop()].ImagePositionPatient)
        assert [s.SeriesInstanceUID for s in ds.ReferencedSeriesSequence] == [mr_series[0].SeriesInstanceUID,
                                                                             func_series[0].SeriesInstanceUID]
        assert report.fused_range in ds.SeriesDescription and "not for diagnosis" in ds.SeriesDescription
    fused = volume_from_datasets(stored)  # the derived series is a volume on the MR grid (its headers say so)
    view = type("Fused", (), {"covered": list(range(fused.shape[0])), "slices": list(fused.array)})
    return assert_lesion_in_place(fused, view, functional_mm, pv.LESION_LPS)


@pytest.mark.parametrize("transport", ["dicomweb", "dimse"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_realistic_study_shapes_fuse_with_the_lesion_in_place(orthanc, tmp_path, fast_fuser, transport, shape):
    mr, func = study_volumes(shape)
    study = new_study(zlib.crc32(f"{shape}{transport}".encode()) % 10_000)
    mr_series = series_from_volume(study, mr, 1)
    func_series = series_from_volume(study, func, 2, slope_per_slice=True)
    push(orthanc, tmp_path, mr_series, func_series)
    t = TRANSPORTS[transport](pacs_settings(orthanc, transport))
    report = fuse_study(t, fast_fuser, study.StudyInstanceUID, mr_series[0].SeriesInstanceUID,
                        func_series[0].SeriesInstanceUID)
    assert report.status == "stored"
    check_stored(orthanc, report, mr_series, func_series, float(func.spacing[:2].max()))
    if shape == "partial_z":
        assert 0 < report.instances < mr.shape[0] and report.fused_range.endswith(f"of {mr.shape[0]}")
    again = fuse_study(t, fast_fuser, study.StudyInstanceUID, mr_series[0].SeriesInstanceUID,
                       func_series[0].SeriesInstanceUID)
    assert again.status == "exists"  # a partial coverage is complete when its fused range is stored


@pytest.fixture(scope="module")
def service_client():
    """The service app (its batcher and /fuse/batch) on the fast tier."""
    from fastapi.testclient import TestClient

    from app.http.main import create_app
    from app.settings import ServiceSettings
    from models.inference.weights import open_pipeline

    with TestClient(create_app(ServiceSettings(warmup=False, max_wait_ms=5), open_pipeline("fast", "cpu"))) as c:
        yield c


@pytest.mark.parametrize("transport", ["dicomweb", "dimse"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_realistic_shapes_through_the_service(orthanc, tmp_path, service_client, transport, shape):
    mr, func = study_volumes(shape)
    study = new_study(zlib.crc32(f"{shape}{transport}service".encode()) % 10_000)
    mr_series, func_series = series_from_volume(study, mr, 1), series_from_volume(study, func, 2)
    push(orthanc, tmp_path, mr_series, func_series)
    settings = pacs_settings(orthanc, transport)
    fuser = ServiceFuser(settings, client=service_client)
    report = fuse_study(TRANSPORTS[transport](settings), fuser, study.StudyInstanceUID,
                        mr_series[0].SeriesInstanceUID, func_series[0].SeriesInstanceUID, settings)
    assert report.status == "stored" and fuser.model_name == "dmfnet-fast"
    check_stored(orthanc, report, mr_series, func_series, float(func.spacing[:2].max()))


def _old_slice_path(mr_series, pet_series) -> list[np.ndarray]:
    """What the same-grid path computed before volumes existed (kept here as the reference): slices sorted by
    position, MR 0.5-99.5 percentile window, PET 0..max in Bq/ml through the hot colormap, pixel to pixel."""
    def real(ds):
        return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)

    order = sorted(mr_series, key=lambda d: float(d.ImagePositionPatient[2]))
    mr = [real(d) for d in order]
    lo, hi = np.percentile(np.concatenate([r.ravel() for r in mr]), [0.5, 99.5])
    pet = [real(d) for d in sorted(pet_series, key=lambda d: float(d.ImagePositionPatient[2]))]
    top = max(float(r.max()) for r in pet)
    return [np.clip((r - lo) / max(hi - lo, 1e-6), 0, 1) for r in mr], [
        hot_colormap(np.clip(r / max(top, 1e-6), 0, 1)) for r in pet]


def test_same_grid_keeps_todays_pixels_and_a_shifted_fov_is_resampled(orthanc, tmp_path, fast_fuser):
    mr = pv.sample("MR", 96, 2.0, 12, 2.0)
    same = pv.sample("PT", 96, 2.0, 12, 2.0)
    shifted = pv.sample("PT", 96, 2.0, 12, 2.0, centre=[10, 0, 0])  # the MR's matrix, FoV 10 mm along x
    study = new_study(90)
    mr_series = series_from_volume(study, mr, 1)
    same_series, shifted_series = series_from_volume(study, same, 2), series_from_volume(study, shifted, 3)
    push(orthanc, tmp_path, mr_series, same_series, shifted_series)
    t = DicomWebTransport(pacs_settings(orthanc, "dicomweb"))
    report = fuse_study(t, fast_fuser, study.StudyInstanceUID, mr_series[0].SeriesInstanceUID,
                        same_series[0].SeriesInstanceUID)
    stored = sorted(stored_series(orthanc, report.series_uid), key=lambda d: float(d.ImagePositionPatient[2]))
    want = fast_fuser.fuse(*_old_slice_path(mr_series, same_series), "pet")
    for ds, w in zip(stored, want, strict=True):
        np.testing.assert_array_equal(ds.pixel_array, np.clip(np.round(w * 255), 0, 255).astype(np.uint8))
    moved = fuse_study(t, fast_fuser, study.StudyInstanceUID, mr_series[0].SeriesInstanceUID,
                       shifted_series[0].SeriesInstanceUID)
    numbers = check_stored(orthanc, moved, mr_series, shifted_series, 2.0)
    assert numbers["error_mm"] < 2.0  # pixel to pixel it would sit 10 mm off


@pytest.mark.parametrize("transport", ["dicomweb", "dimse"])
def test_pet_ct_in_another_frame_is_registered_only_when_asked(orthanc, tmp_path, fast_fuser, transport):
    from app.pacs.series import SeriesRefused

    m = pv.rigid((2.0, -3.0, 4.0), (15.0, -20.0, 25.0))
    mr = pv.sample("MR", 128, 1.6, 48, 2.0)
    ct = pv.sample("CT", 128, 1.8, 50, 2.0, centre=[15, -20, 25], scanner_from_patient=m)
    pet = pv.sample("PT", 96, 2.6, 40, 2.6, centre=[15, -20, 25], scanner_from_patient=m)
    study = new_study(120 if transport == "dicomweb" else 121)
    other = pydicom.uid.generate_uid()
    mr_series = series_from_volume(study, mr, 1)
    ct_series = series_from_volume(study, ct, 2, frame_of_reference=other)
    pet_series = series_from_volume(study, pet, 3, frame_of_reference=other)
    push(orthanc, tmp_path, mr_series, ct_series, pet_series)
    args = (study.StudyInstanceUID, mr_series[0].SeriesInstanceUID, pet_series[0].SeriesInstanceUID)
    with pytest.raises(SeriesRefused, match="FrameOfReferenceUID"):
        fuse_study(TRANSPORTS[transport](pacs_settings(orthanc, transport)), fast_fuser, *args)
    settings = pacs_settings(orthanc, transport, registration="rigid")
    report = fuse_study(TRANSPORTS[transport](settings), fast_fuser, *args, settings)
    assert report.status == "stored" and "CT to MR" in report.registration
    check_stored(orthanc, report, mr_series, pet_series, 2.6)
    stored = stored_series(orthanc, report.series_uid)
    assert "Registered: rigid registration (CT to MR" in stored[0].DerivationDescription


def test_implausible_registration_and_irregular_series_store_nothing(orthanc, tmp_path, fast_fuser):
    rng = np.random.default_rng(5)
    from scipy.ndimage import gaussian_filter

    mr = pv.sample("MR", 64, 3.0, 20, 3.0)
    noise = pv.sample("PT", 64, 3.0, 20, 3.0)
    noise.array = (gaussian_filter(rng.normal(size=noise.shape), 2) * 5000 + 5000).astype(np.float32)
    study = new_study(130)
    mr_series = series_from_volume(study, mr, 1)
    unrelated = series_from_volume(study, noise, 2, frame_of_reference=pydicom.uid.generate_uid())
    echoes = series_from_volume(study, pv.sample("PT", 64, 3.0, 20, 3.0), 3)
    for d in echoes[:3]:  # two images at three positions (a second echo or frame)
        twin = pydicom.dcmread(BytesIO(dicom_bytes(d)))
        twin.SOPInstanceUID = twin.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        echoes.append(twin)
    push(orthanc, tmp_path, mr_series, unrelated, echoes)
    settings = pacs_settings(orthanc, "dimse", registration="rigid")
    t = DimseTransport(settings)
    with pytest.raises(RegistrationRefused, match="normalised mutual information"):
        fuse_study(t, fast_fuser, study.StudyInstanceUID, mr_series[0].SeriesInstanceUID,
                   unrelated[0].SeriesInstanceUID, settings)
    with pytest.raises(GeometryError, match="share a slice position"):
        fuse_study(t, fast_fuser, study.StudyInstanceUID, mr_series[0].SeriesInstanceUID,
                   echoes[0].SeriesInstanceUID, settings)
    assert study_count(orthanc, study.StudyInstanceUID) == 3  # nothing stored


class OneStudy:
    """A transport whose study listing shows one study (the shared test PACS holds many)."""

    def __init__(self, inner, study: str) -> None:
        self.inner, self.study = inner, study

    def studies(self, date_range=None, limit=100):  # noqa: D102
        from app.pacs.transport import StudyListing

        return StudyListing([self.study], capped=False)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_watch_fuses_a_study_on_different_grids(orthanc, tmp_path, fast_fuser):
    from app.pacs.watch import watch_once

    mr, func = study_volumes("spect")
    study = new_study(140)
    mr_series, func_series = series_from_volume(study, mr, 1), series_from_volume(study, func, 2)
    push(orthanc, tmp_path, mr_series, func_series)
    settings = pacs_settings(orthanc, "dimse")
    t = OneStudy(DimseTransport(settings), study.StudyInstanceUID)
    first = watch_once(t, fast_fuser, settings)
    assert [(r.partner, r.status) for r in first] == [("NM", "stored")] and first[0].fused_range
    check_stored(orthanc, first[0], mr_series, func_series, 4.4)
    assert [r.status for r in watch_once(t, fast_fuser, settings)] == ["exists"]


@pytest.mark.parametrize("transport", ["dicomweb", "dimse"])
def test_cli_fuse_study_through_a_running_dmfnet_serve(orthanc, tmp_path, transport, monkeypatch, capsys):
    """`dmfnet pacs --service-url` against a real `dmfnet serve` process (uvicorn, batcher, /fuse/batch)."""
    import json
    import os
    import sys

    from dmfnet.cli import main
    from harness.servers import free_port, wait_for_http
    from tests.conftest import ROOT

    mr, func = study_volumes("sagittal_mr")
    study = new_study(150 if transport == "dicomweb" else 151)
    mr_series, func_series = series_from_volume(study, mr, 1), series_from_volume(study, func, 2)
    push(orthanc, tmp_path, mr_series, func_series)
    port = free_port()
    serve = subprocess.Popen([sys.executable, "-m", "dmfnet", "serve", "--weights", "fast", "--port", str(port)],
                             cwd=ROOT, stderr=subprocess.DEVNULL, env={**os.environ, "DMFNET_RUNTIME": "torch"})
    try:
        assert wait_for_http(f"http://127.0.0.1:{port}/readyz", timeout_s=120)
        monkeypatch.setenv("DMFNET_PACS_DICOMWEB_URL", f"{orthanc['base']}/dicom-web")
        monkeypatch.setenv("DMFNET_PACS_PORT", str(orthanc["dicom"]))
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        rc = main(["pacs", "--transport", transport, "--service-url", f"http://127.0.0.1:{port}", "fuse-study",
                   "--study", study.StudyInstanceUID, "--mri-series", mr_series[0].SeriesInstanceUID,
                   "--functional-series", func_series[0].SeriesInstanceUID])
        out = capsys.readouterr().out
        assert rc == 0, out
    finally:
        serve.terminate()
        serve.wait(30)
    report = type("Report", (), json.loads(out.strip().splitlines()[-1]))
    stored = stored_series(orthanc, report.series_uid)
    assert "dmfnet-fast" in stored[0].SoftwareVersions
    check_stored(orthanc, report, mr_series, func_series, 2.6)
