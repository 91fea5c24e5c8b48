"""The PACS watcher as a daemon: isolation, series choice, capped listings, remembered refusals, outages,
DIMSE errors, health and metrics — each against a real Orthanc of its own."""

from __future__ import annotations

import datetime as dt
import threading
import time

import httpx
import numpy as np
import pydicom
import pytest

from app.pacs.config import PacsSettings
from app.pacs.health import WatchHealth
from app.pacs.transport import DicomWebTransport, DimseTransport, PacsError
from app.pacs.watch import Decisions, list_studies, watch_forever, watch_once
from app.pacs.workflow import InProcessFuser, SliceCache
from dmfnet.cli import main as cli_main
from harness.orthanc import OrthancServer, pacs_settings, upload_study
from harness.studies import make_study, new_study, series_from_volume
from models.volumes import phantom as pv
from tests.conftest import need_orthanc

pytestmark = pytest.mark.system  # real servers, tools or builds: see pyproject markers

TRANSPORTS = {"dicomweb": DicomWebTransport, "dimse": DimseTransport}


@pytest.fixture()
def pacs(tmp_path):
    """An Orthanc of this test's own (the watcher lists every study it holds)."""
    need_orthanc()
    server = OrthancServer(tmp_path / "orthanc")
    yield server
    server.stop()


def _study(seed: int, slices: int = 4, date: str = "20261125") -> dict:
    study = make_study(slices=slices, size=32, seed=seed)
    for series in study.values():
        for ds in series:
            ds.StudyDate = date
    return study


def _settings(server: OrthancServer, transport: str, **watch) -> PacsSettings:
    return pacs_settings(server.info(), transport, watch={"min_mr_slices": 2, **watch})


class Crashing:
    """A transport that raises something nobody foresaw for one study."""

    def __init__(self, inner, bad_study: str) -> None:
        self.inner, self.bad = inner, bad_study

    def series_in_study(self, study):  # noqa: D102
        if study == self.bad:
            raise ZeroDivisionError("simulated bug")
        return self.inner.series_in_study(study)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("transport", ["dicomweb", "dimse"])
def test_one_bad_study_never_stops_the_pass(pacs, tiny_pipeline, transport):
    good = [upload_study(pacs.info(), _study(s)) for s in (1, 2, 3)]
    bad = upload_study(pacs.info(), _study(4))
    # an MR whose images carry no position: the product cannot place it in the patient
    broken = _study(5)
    for ds in broken["MR"]:
        del ds.ImagePositionPatient
    upload_study(pacs.info(), broken)
    settings = _settings(pacs, transport)
    t = Crashing(TRANSPORTS[transport](settings), bad["MR"][0].StudyInstanceUID)
    lines = []
    reports = watch_once(t, InProcessFuser(tiny_pipeline), settings, emit=lines.append)
    by_study = {}
    for r in reports:
        by_study.setdefault(r.study, []).append(r)
    for s in good:
        assert {r.status for r in by_study[s["MR"][0].StudyInstanceUID]} == {"stored"}
    crashed = by_study[bad["MR"][0].StudyInstanceUID]
    assert [(r.status, r.kind) for r in crashed] == [("failed", "unexpected")]
    assert "ZeroDivisionError" in crashed[0].reason
    placed = by_study[broken["MR"][0].StudyInstanceUID]
    assert {(r.status, r.kind) for r in placed} == {("refused", "geometry")}
    assert "ImagePositionPatient" in placed[0].reason
    assert len(lines) == len(reports) == 3 * 2 + 1 + 2  # one line per pair, crash included


def test_the_right_mr_series_is_chosen(pacs, tiny_pipeline):
    study = new_study(40)
    localizer = series_from_volume(study, pv.sample("MR", 32, 8.0, 3, 30.0), 1)
    for ds in localizer:
        ds.ImageType, ds.SeriesDescription = ["ORIGINAL", "PRIMARY", "LOCALIZER"], "3-plane loc"
    derived = series_from_volume(study, pv.sample("MR", 32, 8.0, 12, 8.0), 2)
    for ds in derived:
        ds.ImageType, ds.SeriesDescription = ["DERIVED", "SECONDARY", "MPR"], "T1 MPR"
    t2 = series_from_volume(study, pv.sample("MR", 32, 8.0, 10, 8.0), 3)
    t1 = series_from_volume(study, pv.sample("MR", 32, 8.0, 8, 8.0), 4)
    for ds in t1:
        ds.SeriesDescription = "T1 MPRAGE"
    pet = series_from_volume(study, pv.sample("PT", 16, 16.0, 5, 16.0), 5)
    upload_study(pacs.info(), {"loc": localizer, "mpr": derived, "t2": t2, "t1": t1, "pt": pet})
    fuser = InProcessFuser(tiny_pipeline)
    # no preference: the most slices among the usable series (T2, 10), never the localizer or the MPR
    settings = _settings(pacs, "dimse", min_mr_slices=4)
    (report,) = watch_once(DimseTransport(settings), fuser, settings)
    assert report.status == "stored" and report.mr_series == t2[0].SeriesInstanceUID
    settings = _settings(pacs, "dicomweb", min_mr_slices=4, mri_prefer=["mprage", "t1"], max_mr_series=2)
    reports = watch_once(DicomWebTransport(settings), fuser, settings)
    assert [(r.mr_series, r.status) for r in reports] == [(t1[0].SeriesInstanceUID, "stored"),
                                                         (t2[0].SeriesInstanceUID, "exists")]


@pytest.mark.parametrize("transport", ["dicomweb", "dimse"])
def test_capped_listings_are_split_by_date_and_never_silently_partial(tmp_path, tiny_pipeline, transport):
    need_orthanc()
    server = OrthancServer(tmp_path / "o", LimitFindResults=5)
    try:
        dates = [dt.date(2026, 11, 1) + dt.timedelta(days=3 * i) for i in range(12)]
        studies = [upload_study(server.info(), _study(60 + i, slices=2, date=f"{d:%Y%m%d}"))
                   for i, d in enumerate(dates)]
        settings = _settings(server, transport, page_size=5)
        t = TRANSPORTS[transport](settings)
        assert t.studies(None, 5).capped  # what the PACS does to one plain query
        uids, problems = list_studies(t, settings.watch, today=dt.date(2026, 12, 31))
        assert problems == [] and sorted(uids) == sorted(s["MR"][0].StudyInstanceUID for s in studies)
        recent, _ = list_studies(t, settings.watch.model_copy(update={"since": "20261120"}), dt.date(2026, 12, 31))
        assert len(recent) == sum(d >= dt.date(2026, 11, 20) for d in dates)
        for i in range(6):  # one day with more studies than the PACS answers with
            upload_study(server.info(), _study(80 + i, slices=2, date="20261225"))
        uids, problems = list_studies(t, settings.watch, today=dt.date(2026, 12, 31))
        assert len(problems) == 1 and "2026-12-25 alone answered" in problems[0]
        reports = watch_once(t, InProcessFuser(tiny_pipeline), settings)
        assert [r.kind for r in reports if r.status == "failed"] == ["listing_capped"]
    finally:
        server.stop()


class Counting:
    def __init__(self, inner) -> None:
        self.inner, self.retrieved = inner, []

    def retrieve_series(self, study, series):  # noqa: D102
        self.retrieved.append(series)
        return self.inner.retrieve_series(study, series)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_refused_pairs_are_not_retrieved_again_until_their_series_change(pacs, tiny_pipeline, tmp_path):
    study = _study(90)
    pet = sorted(study["PT"], key=lambda d: float(d.ImagePositionPatient[2]))
    upload_study(pacs.info(), {"MR": study["MR"], "PT": [pet[0], pet[1], pet[3]]})  # a missing PET slice
    settings = _settings(pacs, "dicomweb", functional_modalities=["PT"])
    decisions_file = tmp_path / "decisions.json"
    t, fuser = Counting(DicomWebTransport(settings)), InProcessFuser(tiny_pipeline)
    first = watch_once(t, fuser, settings, decisions=Decisions(decisions_file))
    assert [(r.status, r.kind) for r in first] == [("refused", "geometry")] and len(t.retrieved) == 2
    t.retrieved.clear()
    again = watch_once(t, fuser, settings, decisions=Decisions(decisions_file))  # a restarted watcher too
    assert [(r.status, r.kind) for r in again] == [("refused", "remembered")] and t.retrieved == []
    upload_study(pacs.info(), {"PT": [pet[2]]})  # the missing slice arrives: the series changed
    third = watch_once(t, fuser, settings, decisions=Decisions(decisions_file))
    assert [r.status for r in third] == ["stored"]


def test_watcher_survives_an_outage_longer_than_the_retry_budget(pacs, tiny_pipeline):
    settings = pacs_settings(pacs.info(), "dicomweb", retries=3, backoff_s=0.1, retry_total_s=1.0,
                             watch={"min_mr_slices": 2, "interval_s": 0.3, "backoff_max_s": 1.0})
    upload_study(pacs.info(), _study(100))
    health, stop, lines = WatchHealth(stale_after_s=60), threading.Event(), []
    server = health.serve(0)
    url = f"http://127.0.0.1:{server.server_port}"
    loop = threading.Thread(target=watch_forever, args=(DicomWebTransport(settings), InProcessFuser(tiny_pipeline),
                            settings, SliceCache(None), Decisions(None), lines.append, stop, health))
    loop.start()
    try:
        _until(lambda: any(r.status == "stored" for r in lines))
        pacs.stop()
        _until(lambda: health.state.startswith("error"), timeout=20)
        time.sleep(3.0)  # three times the retry budget, several backoff cycles
        assert loop.is_alive() and httpx.get(f"{url}/metrics").text.count("pacs_unreachable") >= 1
        pacs.start()
        late = upload_study(pacs.info(), _study(101))
        _until(lambda: any(r.study == late["MR"][0].StudyInstanceUID and r.status == "stored" for r in lines),
               timeout=30)
        assert health.state == "ok" and httpx.get(f"{url}/healthz").status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert 'dmfnet_watch_pairs_total{kind="-",outcome="stored"}' in metrics
        assert "dmfnet_watch_last_success_timestamp_seconds" in metrics
    finally:
        stop.set()
        loop.join(30)
        server.shutdown()


def _until(condition, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


def test_health_goes_stale_without_a_successful_pass():
    health = WatchHealth(stale_after_s=0.2)
    assert health.status()[0] == 200
    time.sleep(0.3)
    code, body = health.status()
    assert code == 503 and body["last_success_age_s"] is None


def test_unknown_calling_ae_and_rejections_are_one_line_errors(tmp_path, capsys, monkeypatch):
    need_orthanc()
    server = OrthancServer(tmp_path / "o", DicomAlwaysAllowFind=False, DicomAlwaysAllowGet=False,
                           DicomCheckCalledAet=True)
    try:
        monkeypatch.setenv("DMFNET_PACS_PORT", str(server.dicom))
        monkeypatch.setenv("DMFNET_PACS_RETRIES", "0")
        assert cli_main(["pacs", "--transport", "dimse", "echo"]) == 0  # Orthanc answers C-ECHO to anyone
        capsys.readouterr()
        base = ["pacs", "--transport", "dimse", "--weights", "random:tiny"]
        assert cli_main([*base, "fuse-study", "--study", "1.2", "--mri-series", "1.3",
                         "--functional-series", "1.4"]) == 1
        err = capsys.readouterr().err
        assert "aborted the association" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert cli_main([*base, "watch", "--once"]) == 1
        err = capsys.readouterr().err
        assert "aborted the association" in err and "Traceback" not in err
        monkeypatch.setenv("DMFNET_PACS_CALLED_AET", "NOT-ORTHANC")
        assert cli_main([*base, "watch", "--once"]) == 1
        err = capsys.readouterr().err
        assert "association rejected" in err and "Traceback" not in err
    finally:
        server.stop()


def test_dual_echo_mr_and_dynamic_pet_are_refused_not_paired(pacs, tiny_pipeline):
    study = new_study(110)
    mr = series_from_volume(study, pv.sample("MR", 32, 8.0, 6, 8.0), 1)
    second_echo = []
    for ds in mr:
        twin = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_bytes(ds)))
        twin.SOPInstanceUID = twin.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        twin.EchoNumbers = 2
        second_echo.append(twin)
    pet = series_from_volume(study, pv.sample("PT", 16, 16.0, 3, 16.0), 2)
    upload_study(pacs.info(), {"MR": mr + second_echo, "PT": pet})
    settings = _settings(pacs, "dimse")
    (report,) = watch_once(DimseTransport(settings), InProcessFuser(tiny_pipeline), settings)
    assert report.status == "refused" and "4-D: 2 time points x 6 slices" in report.reason  # named, not paired
    assert np.all([s["MainDicomTags"].get("Modality") != "OT" for s in _series(pacs)])  # nothing stored


def _bytes(ds) -> bytes:
    from harness.orthanc import dicom_bytes

    return dicom_bytes(ds)


def _series(server: OrthancServer) -> list[dict]:
    return httpx.get(f"{server.base}/series?expand").json()


def test_dimse_status_names():
    from app.pacs.transport import status_name

    assert status_name(0xFE00).startswith("0xFE00 (cancelled")
    assert status_name(0xA700) == "0xA700 (refused: out of resources)"
    assert status_name(0xC123) == "0xC123 (unable to process)"
    with pytest.raises(PacsError, match="aborted the association"):
        from app.pacs.transport import _status

        _status(pydicom.Dataset(), "C-FIND")


def test_a_dynamic_pet_is_fused_at_the_frame_the_rule_names(pacs, tiny_pipeline):
    """4-D functional series from the PACS (#44 part 3): refused without a frame rule; with ``functional_frame``
    (an index or "last", as ``dmfnet fuse --frame``) the named time point is fused."""
    study = new_study(120)
    mr = series_from_volume(study, pv.sample("MR", 32, 8.0, 6, 8.0), 1)
    early = series_from_volume(study, pv.sample("PT", 16, 16.0, 3, 16.0), 2)
    late = []
    for n, ds in enumerate(early):  # a second frame at every position, acquired later, of the same series
        twin = pydicom.dcmread(pydicom.filebase.DicomBytesIO(_bytes(ds)))
        twin.SOPInstanceUID = twin.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        twin.TemporalPositionIdentifier, twin.InstanceNumber = 2, 100 + n
        late.append(twin)
    for ds in early:
        ds.TemporalPositionIdentifier = 1
    upload_study(pacs.info(), {"MR": mr, "PT": early + late})
    (refused,) = watch_once(DimseTransport(_settings(pacs, "dimse")), InProcessFuser(tiny_pipeline),
                            _settings(pacs, "dimse"))
    assert refused.status == "refused" and "4-D: 2 time points x 3 slices" in refused.reason
    settings = _settings(pacs, "dimse").model_copy(update={"functional_frame": "last"})
    (stored,) = watch_once(DimseTransport(settings), InProcessFuser(tiny_pipeline), settings)
    assert stored.status == "stored", stored.reason
