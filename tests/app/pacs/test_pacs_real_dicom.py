"""Real scanners' files through a real Orthanc (pushed with dcmtk's storescu, in the syntax they are stored in),
fused over DICOMweb and DIMSE: every lossless transfer syntax gives identical pixels, the retrieval order of
either transport changes nothing, and what the PACS stores is valid DICOM as stored (dciodvfy on its bytes)."""

from __future__ import annotations

import shutil
import subprocess

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from app.pacs.transport import DicomWebTransport, DimseTransport
from app.pacs.workflow import InProcessFuser, fuse_study
from harness.orthanc import dciodvfy_errors, pacs_settings, stored_files
from harness.studies import series_from_volume
from models.volumes.io import volume_from_datasets
from tests.lesion import assert_lesion_in_place
from tests.models.volumes.test_real_dicom import PET_MM, SERIES, pet_around, transcoded

pytestmark = pytest.mark.system  # real servers, tools or builds: see pyproject markers

TRANSPORTS = {"dicomweb": DicomWebTransport, "dimse": DimseTransport}
STUDY_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
              "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "FrameOfReferenceUID",
              "StudyDescription")


@pytest.fixture(scope="module")
def fast_fuser():
    from models.inference.weights import open_pipeline

    return InProcessFuser(open_pipeline("fast", "cpu"))


# storescu's option that proposes a transfer syntax (with the uncompressed ones), so the file goes as it is
PROPOSE = {"1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.80": "-xt",
           "1.2.840.10008.1.2.5": "-xr", "1.2.840.10008.1.2.1.99": "-xd", "1.2.840.10008.1.2.2": "-xb",
           "1.2.840.10008.1.2": "-xi", "1.2.840.10008.1.2.1": "-xe"}


def storescu(orthanc: dict, *paths, syntax: str = "1.2.840.10008.1.2.1") -> None:
    """Push files with dcmtk's storescu (an independent DICOM client) in the given transfer syntax."""
    if not shutil.which("/usr/bin/storescu"):
        pytest.skip("dcmtk not installed (scripts/install-test-deps.sh installs it)")
    subprocess.run(["/usr/bin/storescu", PROPOSE[syntax], "-aec", "ORTHANC", "127.0.0.1", str(orthanc["dicom"]),
                    *map(str, paths)], check=True, capture_output=True)


def _stored_syntax(orthanc: dict, sop_uid: str) -> str:
    ids = httpx.post(f"{orthanc['base']}/tools/lookup", content=sop_uid).json()
    instance = next(i["ID"] for i in ids if i["Type"] == "Instance")
    return httpx.get(f"{orthanc['base']}/instances/{instance}/metadata/TransferSyntax").text


def test_every_lossless_transfer_syntax_through_both_transports(orthanc, tmp_path):
    names = [n for n in SERIES if n.startswith("transfer_syntaxes/")]
    if not names:
        pytest.skip("no transfer_syntaxes series here")
    sources = [SERIES[n][0] for n in names] + list(transcoded(SERIES[names[0]][0], tmp_path / "tc").values())
    base = volume_from_datasets([pydicom.dcmread(sources[0])]).array
    study = generate_uid()
    pushed = {}  # series UID -> transfer syntax, each file as its own series of one study
    for n, path in enumerate(sources):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out = tmp_path / f"ts{n}.dcm"
        ds.save_as(out)
        syntax = ds.file_meta.TransferSyntaxUID
        storescu(orthanc, out, syntax=str(syntax))
        stored = _stored_syntax(orthanc, ds.SOPInstanceUID)
        if syntax.is_compressed:  # JPEG, JPEG-LS, JPEG 2000, RLE: Orthanc holds it compressed, as sent
            assert stored == syntax, (syntax.name, stored)
        pushed[ds.SeriesInstanceUID] = stored  # (big endian and deflated arrive as negotiated)
    assert sum(pydicom.uid.UID(s).is_compressed for s in pushed.values()) >= 4
    for transport, cls in TRANSPORTS.items():
        t = cls(pacs_settings(orthanc, transport))
        for series, syntax in pushed.items():
            got = volume_from_datasets(t.retrieve_series(study, series)).array
            np.testing.assert_array_equal(got, base, err_msg=f"{transport} {syntax}")


def _study_of(mr: Dataset) -> Dataset:
    study = Dataset()
    for key in STUDY_KEYS:
        setattr(study, key, mr.get(key, "") or "")
    return study


def test_a_real_series_fuses_identically_over_both_transports_and_is_stored_valid(orthanc, tmp_path,
                                                                                   fast_fuser):
    """Siemens writes an automatic window on every slice: the fused pixels must not depend on which slice a
    transport returns first (the same study over DICOMweb and DIMSE differed by up to 7/255 before)."""
    varied = [n for n in SERIES if not n.startswith(("transfer_syntaxes", "ge_"))
              and len(SERIES[n]) > 8 and len({(pydicom.dcmread(p, stop_before_pixels=True).get("WindowCenter"))
                                              for p in SERIES[n]}) > 1]
    if not varied:
        pytest.skip("no real multi-slice series with per-slice windows here")
    files = SERIES[varied[0]]
    datasets = [pydicom.dcmread(p) for p in files]
    mr = volume_from_datasets(datasets)
    k = mr.shape[0] // 2
    truth = mr.to_physical(np.array([[mr.shape[2] // 2 + 4, mr.shape[1] // 2 - 3, k]], float))[0]
    pet = series_from_volume(_study_of(datasets[0]), pet_around(mr, truth), 90)
    pet_dir = tmp_path / "pet"
    pet_dir.mkdir()
    for ds in pet:
        ds.save_as(pet_dir / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    storescu(orthanc, *files, *sorted(pet_dir.iterdir()))
    fused = {}
    for transport, cls in TRANSPORTS.items():
        t = cls(pacs_settings(orthanc, transport))
        report = fuse_study(t, fast_fuser, str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID),
                            str(pet[0].SeriesInstanceUID))
        assert report.status == "stored" and report.instances == mr.shape[0]
        raws = stored_files(orthanc, report.series_uid)
        if shutil.which("dciodvfy"):
            for raw in raws[:3]:
                assert dciodvfy_errors(raw, tmp_path / transport) == [], transport
        stored = sorted((pydicom.dcmread(pydicom.filebase.DicomBytesIO(r)) for r in raws),
                        key=lambda d: int(d.InstanceNumber))
        fused[transport] = np.stack([d.pixel_array for d in stored])
        volume = volume_from_datasets(stored)
        view = type("Fused", (), {"covered": list(range(volume.shape[0])), "slices": list(volume.array)})
        assert_lesion_in_place(mr, view, PET_MM, truth)
        # The second transport must fuse afresh, not find the first one's series: delete it.
        ids = httpx.post(f"{orthanc['base']}/tools/lookup", content=report.series_uid).json()
        httpx.delete(f"{orthanc['base']}/series/{next(i['ID'] for i in ids if i['Type'] == 'Series')}")
    np.testing.assert_array_equal(fused["dicomweb"], fused["dimse"])
