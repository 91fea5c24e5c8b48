"""PACS integration against a real Orthanc (started here on loopback), over DICOMweb and DIMSE."""

from __future__ import annotations

import json
import shutil
from io import BytesIO

import httpx
import numpy as np
import pydicom
import pytest

from app.pacs.config import PacsSettings
from app.pacs.transport import DicomWebTransport, DimseTransport, PacsError
from app.pacs.workflow import InProcessFuser, fuse_study
from dmfnet.cli import main as cli_main
from harness.orthanc import dciodvfy_errors, dicom_bytes, pacs_settings, stored_files, upload_study
from harness.servers import free_port
from harness.studies import make_study
from models.images.colour import hot_colormap
from models.volumes import dicom

pytestmark = pytest.mark.system  # real servers, tools or builds: see pyproject markers


# ---------------------------------------------------------------------------------------------- no PACS needed
def test_slices_sorted_by_position_not_arrival():
    study = make_study(slices=4, seed=3)
    zs = [float(d.ImagePositionPatient[2]) for d in dicom.sort_series(study["MR"])]
    assert zs == sorted(zs) and [float(d.ImagePositionPatient[2]) for d in study["MR"]] != zs


def test_windowing_documented_defaults():
    study = make_study(slices=2)
    ct = dicom.sort_series(study["CT"])
    del ct[0].WindowCenter, ct[0].WindowWidth  # falls back to soft tissue 40/400 HU
    out = dicom.window_series(ct, "functional")
    hu = ct[0].pixel_array * float(ct[0].RescaleSlope) + float(ct[0].RescaleIntercept)
    np.testing.assert_allclose(out[0], np.clip((hu - (40 - 200)) / 400, 0, 1), atol=1e-6)
    pet = dicom.window_series(dicom.sort_series(study["PT"]), "functional")
    assert pet[0].shape[-1] == 3  # gray PET becomes pseudo-colour (hot colormap)
    np.testing.assert_allclose(hot_colormap(np.array([0.0, 1.0])), [[0, 0, 0], [1, 1, 1]])


def test_derived_uids_are_deterministic_uuid_derived():
    a = dicom.derived_series_uid("1.2", "1.3", "1.4", "abc")
    assert a == dicom.derived_series_uid("1.2", "1.3", "1.4", "abc")
    assert a != dicom.derived_series_uid("1.2", "1.3", "1.4", "abd")
    sops = dicom.derived_instance_uids(a, 3)
    assert len(set(sops)) == 3 and sops == dicom.derived_instance_uids(a, 3)
    for uid in (a, *sops):  # 2.25 + the decimal of a 128-bit UUID: at most 64 characters, no leading zeros
        assert uid.startswith("2.25.") and len(uid) <= 64 and not uid[5:].startswith("0")
        assert int(uid[5:]) < 2**128


# ---------------------------------------------------------------------------------------------- real Orthanc
def _upload(orthanc, seed: int) -> dict:
    return upload_study(orthanc, make_study(slices=3, seed=seed))


def _settings(orthanc, transport: str) -> PacsSettings:
    return pacs_settings(orthanc, transport)


def _series_of_study(orthanc, study_uid: str) -> list[dict]:
    ids = httpx.post(f"{orthanc['base']}/tools/lookup", content=study_uid).json()
    study_id = next(i["ID"] for i in ids if i["Type"] == "Study")
    return httpx.get(f"{orthanc['base']}/studies/{study_id}/series?expand").json()


def _stored_instances(orthanc, series_uid: str) -> list[pydicom.Dataset]:
    ids = httpx.post(f"{orthanc['base']}/tools/lookup", content=series_uid).json()
    series_id = next(i["ID"] for i in ids if i["Type"] == "Series")
    out = []
    for inst in httpx.get(f"{orthanc['base']}/series/{series_id}/instances").json():
        r = httpx.get(f"{orthanc['base']}/instances/{inst['ID']}/file")
        assert r.status_code == 200, (r.status_code, r.text[:300])
        raw = r.content
        assert raw[128:132] == b"DICM"  # stored as a complete Part 10 file
        out.append(pydicom.dcmread(BytesIO(raw)))
    return sorted(out, key=lambda d: int(d.InstanceNumber))


@pytest.mark.parametrize("transport, functional", [("dicomweb", "PT"), ("dimse", "CT")])
def test_round_trip_through_orthanc(orthanc, tiny_pipeline, tmp_path, transport, functional):
    study = _upload(orthanc, seed=1 if transport == "dicomweb" else 2)
    mr, func = dicom.sort_series(study["MR"]), dicom.sort_series(study[functional])
    study_uid = mr[0].StudyInstanceUID
    t = (DicomWebTransport if transport == "dicomweb" else DimseTransport)(_settings(orthanc, transport))
    t.echo()
    fuser = InProcessFuser(tiny_pipeline)
    report = fuse_study(t, fuser, study_uid, mr[0].SeriesInstanceUID, func[0].SeriesInstanceUID)
    assert report.status == "stored" and report.instances == 3
    series = _series_of_study(orthanc, study_uid)
    assert len(series) == 4  # MR, PT, CT + the fused series, in the same study
    stored = _stored_instances(orthanc, report.series_uid)
    assert len(stored) == 3
    # What came back is exactly the pipeline's fusion of the same windowed slices.
    expected = fuser.fuse(dicom.window_series(mr, "mri"), dicom.window_series(func, "functional"),
                          {"PT": "pet", "CT": "ct"}[functional])
    for ds, src_mr, src_f, want in zip(stored, mr, func, expected, strict=True):
        assert ds.StudyInstanceUID == study_uid and ds.PatientID == src_mr.PatientID
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.BurnedInAnnotation == "NO"
        assert "NOT FOR PRIMARY DIAGNOSIS" in ds.ImageComments and "not for diagnosis" in ds.SeriesDescription
        assert {r.ReferencedSOPInstanceUID for r in ds.SourceImageSequence} == {src_mr.SOPInstanceUID,
                                                                               src_f.SOPInstanceUID}
        assert [r.SeriesInstanceUID for r in ds.ReferencedSeriesSequence] == [src_mr.SeriesInstanceUID,
                                                                              src_f.SeriesInstanceUID]
        assert ds.PhotometricInterpretation == ("RGB" if functional == "PT" else "MONOCHROME2")
        np.testing.assert_array_equal(ds.pixel_array, np.round(want * 255).astype(np.uint8))
        assert ds.SOPInstanceUID not in {src_mr.SOPInstanceUID, src_f.SOPInstanceUID}
    # Idempotent: a re-run finds the series and stores nothing new.
    again = fuse_study(t, fuser, study_uid, mr[0].SeriesInstanceUID, func[0].SeriesInstanceUID)
    assert again.status == "exists" and again.series_uid == report.series_uid
    assert len(_series_of_study(orthanc, study_uid)) == 4
    if shutil.which("dciodvfy"):  # the bytes the PACS holds, as stored over this transport
        for raw in stored_files(orthanc, report.series_uid):
            assert dciodvfy_errors(raw, tmp_path) == []


def test_cli_fuse_study_and_watch(orthanc, monkeypatch, capsys):
    study = upload_study(orthanc, make_study(slices=4, seed=3))
    mr, pt = dicom.sort_series(study["MR"]), dicom.sort_series(study["PT"])
    monkeypatch.setenv("DMFNET_PACS_DICOMWEB_URL", f"{orthanc['base']}/dicom-web")
    monkeypatch.setenv("DMFNET_PACS_PORT", str(orthanc["dicom"]))
    assert cli_main(["pacs", "--transport", "dimse", "echo"]) == 0
    args = ["pacs", "--weights", "random:tiny", "fuse-study", "--study", mr[0].StudyInstanceUID,
            "--mri-series", mr[0].SeriesInstanceUID, "--functional-series", pt[0].SeriesInstanceUID]
    assert cli_main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["status"] == "stored"
    # watch: every MR + partner pair of every study is fused once: MR+PT already is, MR+CT gets fused now.
    assert cli_main(["pacs", "--weights", "random:tiny", "watch", "--once"]) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    mine = {r["partner"]: r["status"] for r in reports if r["study"] == mr[0].StudyInstanceUID}
    assert mine == {"PT": "exists", "CT": "stored"}


def test_a_missing_middle_slice_is_refused_with_a_report(orthanc, tiny_pipeline, capsys, monkeypatch):
    study = make_study(slices=3, seed=4)
    pet = dicom.sort_series(study["PT"])
    for ds in study["MR"] + [pet[0], pet[2]]:  # the middle PET slice is missing: a 6 mm gap in 3 mm slices
        httpx.post(f"{orthanc['base']}/instances", content=dicom_bytes(ds))
    monkeypatch.setenv("DMFNET_PACS_DICOMWEB_URL", f"{orthanc['base']}/dicom-web")
    rc = cli_main(["pacs", "--weights", "random:tiny", "fuse-study", "--study", study["MR"][0].StudyInstanceUID,
                   "--mri-series", study["MR"][0].SeriesInstanceUID,
                   "--functional-series", study["PT"][0].SeriesInstanceUID])
    assert rc == 1
    err = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert err["error"] == "geometry_refused" and "missing slices" in err["problem"]
    assert len(_series_of_study(orthanc, study["MR"][0].StudyInstanceUID)) == 2  # nothing stored


def test_unreachable_pacs_fails_after_retries():
    settings = PacsSettings(dicomweb_url=f"http://127.0.0.1:{free_port()}/dicom-web", port=free_port(),
                            retries=2, backoff_s=0.01, timeout_s=2)
    with pytest.raises(PacsError, match="after 3 attempts"):
        DicomWebTransport(settings).echo()
    with pytest.raises(PacsError, match="after 3 attempts"):
        DimseTransport(settings).echo()
