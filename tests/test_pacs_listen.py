"""``dmfnet pacs listen``, the DICOM node, with real peers: dcmtk's storescu pushes studies to it, a real Orthanc
receives the derived series (and, configured by its own Lua, routes stable studies to the node); the node is
killed while receiving and while fusing, its destination goes down, its spool quota runs out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from app.pacs.phantom_study import new_study, series_from_volume
from models.volumes import phantom as pv
from tests.conftest import ROOT, OrthancServer, free_port, need_orthanc, wait_for_http
from tests.test_pacs_volumes import check_stored
from tests.test_volumes import study_volumes

STORESCU = "/usr/bin/storescu"
pytestmark = pytest.mark.skipif(not Path(STORESCU).exists(), reason="dcmtk not installed")


def _study(seed: int, mr_slices: int = 12, pet_slices: int = 8) -> tuple[object, list, list]:
    """A small MR + PET study (64 px, quick to push and fuse)."""
    study = new_study(seed)
    mr = series_from_volume(study, pv.sample("MR", 64, 3.0, mr_slices, 3.0), 1)
    pet = series_from_volume(study, pv.sample("PT", 32, 6.0, pet_slices, 5.0), 2, slope_per_slice=True)
    return study, mr, pet


def _realistic_study(seed: int) -> tuple[object, list, list]:
    """The 40-slice 256 px MR + 24-slice 128 px PET of tests/test_volumes.py's "pet_shifted_fov" shape."""
    mr_vol, pet_vol = study_volumes("pet_shifted_fov")
    study = new_study(seed)
    return study, series_from_volume(study, mr_vol, 1), series_from_volume(study, pet_vol, 2, slope_per_slice=True)


def _write(folder: Path, *series: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for items in series:
        for ds in items:
            ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    return folder


def storescu(port: int, folder: Path, aet: str = "PUSHER", check: bool = True) -> subprocess.CompletedProcess:
    """dcmtk's storescu sends every file of ``folder`` on one association."""
    return subprocess.run([STORESCU, "-aet", aet, "-aec", "DMFNET", "+sd", "127.0.0.1", str(port), str(folder)],
                          capture_output=True, text=True, check=check, timeout=300)


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
        storescu(node.port, _write(tmp_path / "push", mr, pet))
        reports = node.wait_for(lambda rs: any(r["status"] == "stored" for r in rs))
        metrics = node.metrics()
    report = next(r for r in reports if r["status"] == "stored")
    assert report["study"] == study.StudyInstanceUID and report["partner"] == "PT"
    as_object = type("Report", (), report)
    check_stored(pacs.info(), as_object, mr, pet, 2.6)
    assert len(derived_series(pacs.info(), study.StudyInstanceUID)) == 1
    assert "dmfnet_listen_instances_received_total 64.0" in metrics
    assert not any(node.spool.glob("studies/*/*/*.dcm"))  # the spool is emptied once stored
    assert study.PatientID not in node.out.read_text() and str(study.PatientName) not in node.out.read_text()


def test_an_unknown_ae_title_is_rejected_at_association(pacs, tmp_path):
    _, mr, pet = _study(2, 4, 3)
    with listening(tmp_path, pacs.info(), weights="random:tiny") as node:
        refused = storescu(node.port, _write(tmp_path / "push", mr, pet), aet="STRANGER", check=False)
        assert refused.returncode != 0 and "Association Rejected" in refused.stderr + refused.stdout
        assert not any(node.spool.glob("studies/*/*/*.dcm"))
