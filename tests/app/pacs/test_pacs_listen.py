"""``dmfnet pacs listen``, the DICOM node, with real peers: dcmtk's storescu pushes studies to it, a real Orthanc
receives the derived series (and, configured by its own Lua, routes stable studies to the node); the node is
killed while receiving and while fusing, its destination goes down, its spool quota runs out."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from harness.orthanc import OrthancServer, dciodvfy_errors, stored_files
from harness.servers import free_port, wait_for_http
from harness.studies import new_study, series_from_volume, write_series_folder
from models.volumes import phantom as pv
from tests.app.pacs.test_pacs_volumes import check_stored
from tests.conftest import ROOT, need_orthanc
from tests.models.volumes.test_volumes import study_volumes

STORESCU = "/usr/bin/storescu"
pytestmark = [pytest.mark.system, pytest.mark.skipif(not Path(STORESCU).exists(), reason="dcmtk not installed")]


def _study(seed: int, mr_slices: int = 12, pet_slices: int = 8) -> tuple[object, list, list]:
    """A small MR + PET study (64 px, quick to push and fuse)."""
    study = new_study(seed)
    mr = series_from_volume(study, pv.sample("MR", 64, 3.0, mr_slices, 3.0), 1)
    pet = series_from_volume(study, pv.sample("PT", 32, 6.0, pet_slices, 5.0), 2, slope_per_slice=True)
    return study, mr, pet


def _realistic_study(seed: int) -> tuple[object, list, list]:
    """The 40-slice 256 px MR + 24-slice 128 px PET of tests/models/volumes/test_volumes.py's "pet_shifted_fov"
    shape."""
    mr_vol, pet_vol = study_volumes("pet_shifted_fov")
    study = new_study(seed)
    return study, series_from_volume(study, mr_vol, 1), series_from_volume(study, pet_vol, 2, slope_per_slice=True)


def storescu(port: int, folder: Path, aet: str = "PUSHER", check: bool = True) -> subprocess.CompletedProcess:
    """dcmtk's storescu sends every file of ``folder`` on one association (verbose: each response's status)."""
    return subprocess.run([STORESCU, "-v", "-aet", aet, "-aec", "DMFNET", "+sd", "127.0.0.1", str(port), str(folder)],
                          capture_output=True, text=True, check=check, timeout=300)


STARTED: list[Listener] = []


@pytest.fixture(autouse=True)
def _no_node_outlives_its_test():
    yield
    while STARTED:
        STARTED.pop().kill()


class Listener:
    """``dmfnet pacs listen`` as a process, configured through DMFNET_PACS_* variables."""

    def __init__(self, tmp: Path, orthanc: dict, weights: str = "fast", **settings) -> None:
        self.port, self.health = free_port(), free_port()
        self.spool = tmp / "spool"
        self.env = {**os.environ, "DMFNET_PACS_TRANSPORT": "dicomweb",
                    "DMFNET_PACS_DICOMWEB_URL": f"{orthanc['base']}/dicom-web",
                    "DMFNET_PACS_PORT": str(orthanc["dicom"]), "DMFNET_PACS_RETRIES": "1",
                    "DMFNET_PACS_BACKOFF_S": "0.2", "DMFNET_PACS_LISTEN_PORT": str(self.port),
                    "DMFNET_PACS_LISTEN_HEALTH_PORT": str(self.health),
                    "DMFNET_PACS_LISTEN_ALLOWED_AETS": '["PUSHER", "ORTHANC"]',
                    "DMFNET_PACS_SPOOL_DIR": str(self.spool), "DMFNET_PACS_STABLE_AGE_S": "2",
                    "DMFNET_PACS_LISTEN_POLL_S": "0.2", "DMFNET_PACS_LISTEN_RETRY_MAX_S": "2",
                    "DMFNET_PACS_CACHE_DIR": str(tmp / "cache"),
                    **{f"DMFNET_PACS_{k.upper()}": str(v) for k, v in settings.items()}}
        self.weights, self.out = weights, tmp / f"listen-{self.port}.out"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Listener:
        """Start and wait until it is ready (model loaded, listening)."""
        with open(self.out, "a") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "dmfnet", "pacs", "--weights", self.weights,
                                          "--log-json", "listen"], cwd=ROOT, env=self.env, stdout=out,
                                         stderr=subprocess.STDOUT)
        STARTED.append(self)
        if not wait_for_http(f"http://127.0.0.1:{self.health}/readyz", timeout_s=120):
            self.kill()
            pytest.fail("listener not ready: " + self.out.read_text()[-3000:])
        return self

    def reports(self) -> list[dict]:
        """Every report line printed so far."""
        return [json.loads(line) for line in self.out.read_text().splitlines() if line.startswith('{"study"')]

    def wait_for(self, predicate, timeout_s: float = 120) -> list[dict]:
        """Reports once ``predicate(reports)`` holds (or fail with the log)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            reports = self.reports()
            if predicate(reports):
                return reports
            time.sleep(0.3)
        pytest.fail("timed out; listener output:\n" + self.out.read_text()[-3000:])

    def metrics(self) -> str:  # noqa: D102
        return httpx.get(f"http://127.0.0.1:{self.health}/metrics").text

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop it (SIGKILL by default: a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(60)
        self.proc = None


@contextmanager
def listening(tmp: Path, orthanc: dict, **kw):
    node = Listener(tmp, orthanc, **kw).start()
    try:
        yield node
    finally:
        node.kill(signal.SIGTERM)


def derived_series(orthanc: dict, study_uid: str) -> list[dict]:
    """The study's series in Orthanc whose modality is OT (the derived ones), with their instance counts."""
    ids = httpx.post(f"{orthanc['base']}/tools/lookup", content=study_uid).json()
    study = next((i["ID"] for i in ids if i["Type"] == "Study"), None)
    if study is None:
        return []
    series = httpx.get(f"{orthanc['base']}/studies/{study}/series").json()
    return [s for s in series if s["MainDicomTags"].get("Modality") == "OT"]


@pytest.fixture
def pacs(tmp_path):
    need_orthanc()
    server = OrthancServer(tmp_path / "orthanc")
    yield server
    server.stop()


def test_a_pushed_study_is_fused_when_stable_and_stored_back_with_the_lesion_in_place(pacs, tmp_path):
    study, mr, pet = _realistic_study(1)
    with listening(tmp_path, pacs.info()) as node:
        echo = subprocess.run(["/usr/bin/echoscu", "-aet", "PUSHER", "-aec", "DMFNET", "127.0.0.1", str(node.port)],
                              capture_output=True, text=True)
        assert echo.returncode == 0, echo.stderr
        storescu(node.port, write_series_folder(tmp_path / "push", mr, pet))
        reports = node.wait_for(lambda rs: any(r["status"] == "stored" for r in rs))
        metrics = node.metrics()
    report = next(r for r in reports if r["status"] == "stored")
    assert report["study"] == study.StudyInstanceUID and report["partner"] == "PT"
    as_object = type("Report", (), report)
    check_stored(pacs.info(), as_object, mr, pet, 2.6)
    assert len(derived_series(pacs.info(), study.StudyInstanceUID)) == 1
    if shutil.which("dciodvfy"):  # valid as stored (dicom3tools, an independent validator)
        raw = stored_files(pacs.info(), report["series_uid"])
        assert [e for r in raw[:3] for e in dciodvfy_errors(r, tmp_path / "check")] == []
    assert "dmfnet_listen_instances_received_total 64.0" in metrics
    assert not any(node.spool.glob("studies/*/*/*.dcm"))  # the spool is emptied once stored
    assert study.PatientID not in node.out.read_text() and str(study.PatientName) not in node.out.read_text()


def test_an_unknown_ae_title_is_rejected_at_association(pacs, tmp_path):
    _, mr, pet = _study(2, 4, 3)
    with listening(tmp_path, pacs.info(), weights="random:tiny") as node:
        refused = storescu(node.port, write_series_folder(tmp_path / "push", mr, pet), aet="STRANGER", check=False)
        assert refused.returncode != 0 and "Association Rejected" in refused.stderr + refused.stdout
        assert not any(node.spool.glob("studies/*/*/*.dcm"))


def _spooled(node: Listener) -> int:
    return len(list(node.spool.glob("studies/*/*/*.dcm")))


def test_kill_9_while_receiving_then_restart_and_resend_gives_one_derived_series(pacs, tmp_path):
    """A crash cut the association short: what arrived is on disk but is never fused as if the study were
    whole; the sender re-sends (it was not acknowledged) and the study is fused exactly once."""
    study, mr, pet = _realistic_study(3)
    folder = write_series_folder(tmp_path / "push", mr, pet)
    node = Listener(tmp_path, pacs.info()).start()
    sender = subprocess.Popen([STORESCU, "-aet", "PUSHER", "-aec", "DMFNET", "+sd", "127.0.0.1", str(node.port),
                               str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while _spooled(node) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    node.kill()  # SIGKILL mid-association
    sender.wait(60)
    received = _spooled(node)
    assert 10 <= received < 64
    node.start()  # the same spool
    time.sleep(6)  # well past stable_age_s: the cut-short study must still wait
    assert node.reports() == [] and derived_series(pacs.info(), study.StudyInstanceUID) == []
    assert "dmfnet_listen_studies_incomplete 1.0" in node.metrics()
    storescu(node.port, folder)  # the sender's retry
    reports = node.wait_for(lambda rs: any(r["status"] == "stored" for r in rs))
    node.kill(signal.SIGTERM)
    (derived,) = derived_series(pacs.info(), study.StudyInstanceUID)
    assert len(derived["Instances"]) == reports[-1]["instances"] == 39  # the MR slices the PET covers


def test_kill_9_while_fusing_then_restart_gives_one_derived_series(pacs, tmp_path):
    study, mr, pet = _realistic_study(4)
    node = Listener(tmp_path, pacs.info(), weights="full").start()
    storescu(node.port, write_series_folder(tmp_path / "push", mr, pet))
    cache = tmp_path / "cache"
    deadline = time.monotonic() + 120
    while not any(cache.rglob("*.npy")) and time.monotonic() < deadline:  # fused slices are cached as they come
        time.sleep(0.05)
    assert any(cache.rglob("*.npy")), node.out.read_text()[-2000:]
    node.kill()
    assert derived_series(pacs.info(), study.StudyInstanceUID) == []
    node.start()
    node.wait_for(lambda rs: any(r["status"] == "stored" for r in rs), timeout_s=300)
    node.kill(signal.SIGTERM)
    (derived,) = derived_series(pacs.info(), study.StudyInstanceUID)
    assert len(derived["Instances"]) == 39


def test_destination_down_for_a_while_the_study_is_kept_and_stored_when_it_returns(pacs, tmp_path):
    study, mr, pet = _study(5)
    with listening(tmp_path, pacs.info(), weights="random:tiny") as node:
        pacs.stop()
        storescu(node.port, write_series_folder(tmp_path / "push", mr, pet))
        deadline = time.monotonic() + 60
        while 'dmfnet_listen_studies_total{outcome="retry"} 2.0' not in node.metrics():
            assert time.monotonic() < deadline, node.out.read_text()[-2000:]
            time.sleep(0.3)
        assert _spooled(node) == 20  # nothing lost while the PACS is away
        while "dmfnet_listen_studies_waiting_to_send 1.0" not in node.metrics():  # the operator sees it waiting
            assert time.monotonic() < deadline, node.metrics()
            time.sleep(0.2)
        pacs.start()
        node.wait_for(lambda rs: any(r["status"] == "stored" for r in rs))
        assert _spooled(node) == 0
    assert len(derived_series(pacs.info(), study.StudyInstanceUID)) == 1


def test_a_full_spool_answers_out_of_resources_and_the_sender_succeeds_later(pacs, tmp_path):
    """Quota 8 MB: study A (6.1 MB) fits, study B does not; B's refused instances get 0xA700 (the sender keeps
    them), B is not fused from what did fit; once A is fused and gone, B's re-send is taken and fused."""
    study_a, mr_a, pet_a = _realistic_study(6)
    study_b, mr_b, pet_b = _realistic_study(7)
    with listening(tmp_path, pacs.info(), weights="random:tiny", listen_quota_mb=8, stable_age_s=4) as node:
        storescu(node.port, write_series_folder(tmp_path / "a", mr_a, pet_a))
        first = storescu(node.port, write_series_folder(tmp_path / "b", mr_b, pet_b), check=False)
        told = first.stdout + first.stderr
        assert first.returncode != 0 and "Refused: OutOfResources" in told, told[-2000:]
        node.wait_for(lambda rs: any(r["status"] == "stored" and r["study"] == study_a.StudyInstanceUID
                                     for r in rs))
        time.sleep(5)  # B's part is stable by age, but held: never fused as if whole
        assert not any(r["study"] == study_b.StudyInstanceUID for r in node.reports())
        storescu(node.port, tmp_path / "b")
        node.wait_for(lambda rs: any(r["status"] == "stored" and r["study"] == study_b.StudyInstanceUID
                                     for r in rs))
        assert 'dmfnet_listen_instances_rejected_total{reason="out_of_resources"}' in node.metrics()
    for s in (study_a, study_b):
        (derived,) = derived_series(pacs.info(), s.StudyInstanceUID)
        assert len(derived["Instances"]) == 39


def test_a_study_pushed_twice_gives_one_derived_series_and_a_study_without_mr_is_reported_once(pacs, tmp_path):
    study, mr, pet = _study(8)
    _, _, lonely_pet = _study(9)
    with listening(tmp_path, pacs.info(), weights="random:tiny") as node:
        folder = write_series_folder(tmp_path / "push", mr, pet)
        storescu(node.port, folder)
        node.wait_for(lambda rs: any(r["status"] == "stored" for r in rs))
        storescu(node.port, folder)
        node.wait_for(lambda rs: any(r["status"] == "exists" for r in rs))
        storescu(node.port, write_series_folder(tmp_path / "lonely", lonely_pet))
        reports = node.wait_for(lambda rs: any(r["status"] == "no_mr" for r in rs))
        time.sleep(3)
        assert sum(r["status"] == "no_mr" for r in node.reports()) == 1  # reported once, not every poll
        assert len(list(node.spool.glob("failed/*/reason.json"))) == 1  # kept by the default policy
    assert len(derived_series(pacs.info(), study.StudyInstanceUID)) == 1
    assert [r["status"] for r in reports if r["study"] == study.StudyInstanceUID][:2] == ["stored", "exists"]


def test_orthanc_routes_stable_mr_studies_to_the_node_by_its_own_configuration(tmp_path):
    """Orthanc's own Lua (docs/pacs.md, docker/orthanc): a study uploaded to Orthanc is routed to the node when
    stable; the derived series comes back into the same study."""
    need_orthanc()
    node_port = free_port()
    server = OrthancServer(tmp_path / "orthanc", StableAge=2,
                           LuaScripts=[str(ROOT / "docker" / "orthanc" / "route-to-dmfnet.lua")],
                           DicomModalities={"dmfnet": ["DMFNET", "127.0.0.1", node_port]})
    try:
        study, mr, pet = _study(10)
        node = Listener(tmp_path, server.info(), weights="random:tiny")
        node.port = node_port
        node.env["DMFNET_PACS_LISTEN_PORT"] = str(node_port)
        node.start()
        try:
            from harness.orthanc import upload_study

            upload_study(server.info(), {"MR": mr, "PT": pet})
            node.wait_for(lambda rs: any(r["status"] == "stored" for r in rs), timeout_s=120)
        finally:
            node.kill(signal.SIGTERM)
        assert len(derived_series(server.info(), study.StudyInstanceUID)) == 1
    finally:
        server.stop()


def test_the_real_siemens_t1_pushed_with_a_pet_in_mm_is_stored_back_over_dimse_valid(pacs, tmp_path):
    """The real 35-slice Siemens T1 of ../shared/data/real_dicom and a PET built in mm around a point of it,
    pushed by storescu; the derived series goes back by C-STORE (DIMSE) and shows the lesion at that point."""
    import numpy as np
    import pydicom

    from models.volumes.io import volume_from_datasets
    from tests.app.pacs.test_pacs_real_dicom import _study_of
    from tests.lesion import assert_lesion_in_place
    from tests.models.volumes.test_real_dicom import PET_MM, SERIES, pet_around

    name = "siemens_t1_sag_hfs"
    if name not in SERIES:
        pytest.skip(f"{name} not in ../shared/data/real_dicom")
    files = SERIES[name]
    datasets = [pydicom.dcmread(p) for p in files]
    mr = volume_from_datasets(datasets)
    truth = mr.to_physical(np.array([[mr.shape[2] // 2 + 4, mr.shape[1] // 2 - 3, mr.shape[0] // 2]], float))[0]
    pet = series_from_volume(_study_of(datasets[0]), pet_around(mr, truth), 90)
    folder = write_series_folder(tmp_path / "push", pet)
    for path in files:
        shutil.copy(path, folder / f"mr-{Path(path).name}")
    with listening(tmp_path, pacs.info(), transport="dimse") as node:
        storescu(node.port, folder)
        reports = node.wait_for(lambda rs: any(r["status"] == "stored" for r in rs), timeout_s=300)
    report = next(r for r in reports if r["status"] == "stored")
    raws = stored_files(pacs.info(), report["series_uid"])
    assert len(raws) == report["instances"] == mr.shape[0]
    if shutil.which("dciodvfy"):
        assert [e for r in raws[:3] for e in dciodvfy_errors(r, tmp_path / "check")] == []
    stored = sorted((pydicom.dcmread(pydicom.filebase.DicomBytesIO(r)) for r in raws),
                    key=lambda d: int(d.InstanceNumber))
    volume = volume_from_datasets(stored)
    view = type("Fused", (), {"covered": list(range(volume.shape[0])), "slices": list(volume.array)})
    assert_lesion_in_place(mr, view, PET_MM, truth)


def test_every_transfer_syntax_the_reader_decodes_is_received_as_sent(pacs, tmp_path):
    """The node accepts JPEG lossless, JPEG-LS, JPEG 2000, RLE, deflated, big and little endian as proposed by
    storescu; each spooled file decodes to the same pixels as the original."""
    import numpy as np
    import pydicom

    from models.volumes.io import read_dicom_bytes
    from tests.app.pacs.test_pacs_real_dicom import PROPOSE
    from tests.models.volumes.test_real_dicom import SERIES

    names = [n for n in SERIES if n.startswith("transfer_syntaxes/")]
    if not names:
        pytest.skip("no transfer_syntaxes series here")
    base = None
    with listening(tmp_path, pacs.info(), weights="random:tiny", stable_age_s=3600) as node:
        for n, name in enumerate(names):
            path = SERIES[name][0]
            ds = pydicom.dcmread(path)
            syntax = str(ds.file_meta.TransferSyntaxUID)
            subprocess.run([STORESCU, PROPOSE[syntax], "-aet", "PUSHER", "-aec", "DMFNET", "127.0.0.1",
                            str(node.port), str(path)], check=True, capture_output=True)
            spooled = sorted(node.spool.glob("studies/*/*/*.dcm"), key=lambda p: p.stat().st_mtime)[-1]
            got = read_dicom_bytes([spooled.read_bytes()]).array
            base = got if base is None else base
            np.testing.assert_array_equal(got, base, err_msg=syntax)
            assert str(pydicom.dcmread(spooled).file_meta.TransferSyntaxUID) == syntax or n == 0
    assert len(names) >= 5


def test_sigterm_while_fusing_finishes_the_study_in_hand_then_exits(pacs, tmp_path):
    study, mr, pet = _realistic_study(11)
    node = Listener(tmp_path, pacs.info(), weights="full").start()
    storescu(node.port, write_series_folder(tmp_path / "push", mr, pet))
    deadline = time.monotonic() + 120
    while not any((tmp_path / "cache").rglob("*.npy")) and time.monotonic() < deadline:
        time.sleep(0.05)
    node.proc.send_signal(signal.SIGTERM)  # mid-fusion
    assert node.proc.wait(300) == 0
    assert any(r["status"] == "stored" for r in node.reports()), node.out.read_text()[-2000:]
    (derived,) = derived_series(pacs.info(), study.StudyInstanceUID)
    assert len(derived["Instances"]) == 39 and _spooled(node) == 0
