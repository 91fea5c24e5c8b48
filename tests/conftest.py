"""Shared fixtures: phantom pairs generated once per session, a tiny random pipeline."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from models.images.imaging import DecodedImage, encode_png
from models.images.phantoms import phantom_pair
from models.inference.pipeline import FusionPipeline

# The CLI and the service pick ONNX Runtime on a CPU when it is installed (it is, for the tests); the tests
# run torch unless they ask for a runtime, so that not every CLI call and server start exports a graph.
# tests/test_runtimes.py covers the automatic choice.
os.environ.setdefault("DMFNET_RUNTIME", "torch")


@pytest.fixture(scope="session")
def tiny_pipeline() -> FusionPipeline:
    """Random-initialised tiny model (speed: tests exercise plumbing, not image quality)."""
    return FusionPipeline.random_init("tiny", seed=0)


@pytest.fixture(scope="session")
def pet_pair() -> tuple[np.ndarray, np.ndarray]:
    """(MRI gray, PET RGB) phantoms of an odd size."""
    return phantom_pair("pet", 72, 90, seed=3)


@pytest.fixture(scope="session")
def ct_pair() -> tuple[np.ndarray, np.ndarray]:
    """(MRI gray, CT gray) phantoms."""
    return phantom_pair("ct", 64, 64, seed=4)


@pytest.fixture(scope="session")
def pair_dir(tmp_path_factory) -> object:
    """A directory laid out like ../shared/data/harvard with phantom pairs of three tasks."""
    root = tmp_path_factory.mktemp("pairs")
    for modality, seeds in (("ct", (1, 2)), ("pet", (3, 4)), ("spect", (5,))):
        d = root / f"MRI-{modality.upper()}"
        d.mkdir()
        for s in seeds:
            m, f = phantom_pair(modality, 64, 64, seed=s)
            (d / f"{s}001_mri.png").write_bytes(encode_png(m))
            (d / f"{s}001_{modality}.png").write_bytes(encode_png(f))
    return root


def decoded(pixels: np.ndarray, bits: int = 8) -> DecodedImage:
    """Wrap an array as a decoded image."""
    return DecodedImage(pixels.astype(np.float32), bits)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout_s: float) -> bool:
    """Poll ``url`` until it answers 200 or ``timeout_s`` passes; True when it answered."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


# ---------------------------------------------------------------------------------------------- a real PACS
ROOT = Path(__file__).resolve().parent.parent
ORTHANC = shutil.which("Orthanc")
ORTHANC_DICOMWEB = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def dicom_bytes(ds) -> bytes:
    """A dataset as a Part 10 file."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class OrthancServer:
    """A real Orthanc (DICOMweb + DIMSE) on free loopback ports with a temporary database; can be stopped and
    started again on the same ports and data (an outage). ``extra`` adds configuration keys."""

    def __init__(self, folder: Path, **extra) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.http, self.dicom = folder, free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.http}"
        config = {
            "Name": "DMFNET-TEST", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
            "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True, "DicomAlwaysAllowEcho": True,
            "Plugins": [str(ORTHANC_DICOMWEB)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, **extra,
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        """Start (again) and wait until it answers."""
        log = (self.folder / "orthanc.log").open("a")
        self.proc = subprocess.Popen([ORTHANC, str(self.folder / "orthanc.json")], stdout=log,
                                     stderr=subprocess.STDOUT)
        if not wait_for_http(f"{self.base}/system", timeout_s=20):
            self.proc.kill()
            pytest.fail("Orthanc did not start: " + (self.folder / "orthanc.log").read_text()[-2000:])

    def stop(self) -> None:
        """Stop it (the data stays)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)
            self.proc = None

    def info(self) -> dict:
        """What the tests' helpers take."""
        return {"base": self.base, "http": self.http, "dicom": self.dicom}


def need_orthanc() -> None:
    """Skip unless Orthanc with the DICOMweb plugin is installed."""
    if ORTHANC is None or not ORTHANC_DICOMWEB.exists():
        pytest.skip("Orthanc with the DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb; "
                    ".ci/run does this)")


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A real Orthanc shared by the session's PACS tests."""
    need_orthanc()
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    yield server.info()
    server.stop()


def upload_study(orthanc: dict, study: dict) -> dict:
    """Store every instance of a ``make_study`` result in Orthanc (REST); returns the study."""
    import httpx

    for series in study.values():
        for ds in series:
            r = httpx.post(f"{orthanc['base']}/instances", content=dicom_bytes(ds))
            assert r.status_code == 200, r.text
    return study


def stored_files(orthanc: dict, series_uid: str) -> list[bytes]:
    """The bytes Orthanc holds for every instance of a series (what a viewer or another PACS would get)."""
    import httpx

    ids = httpx.post(f"{orthanc['base']}/tools/lookup", content=series_uid).json()
    series_id = next(i["ID"] for i in ids if i["Type"] == "Series")
    return [httpx.get(f"{orthanc['base']}/instances/{i['ID']}/file").content
            for i in httpx.get(f"{orthanc['base']}/series/{series_id}/instances").json()]


def dciodvfy_errors(raw: bytes, folder: Path) -> list[str]:
    """dciodvfy's (dicom3tools, an independent validator) error lines for these exact bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"stored_{len(list(folder.iterdir()))}.dcm"
    path.write_bytes(raw)  # as stored: no re-encoding that could add what the PACS lacks
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def pacs_settings(orthanc: dict, transport: str, **kw):
    """PacsSettings pointing at the test Orthanc, with short retries."""
    from app.pacs.config import PacsSettings

    return PacsSettings(**{"transport": transport, "dicomweb_url": f"{orthanc['base']}/dicom-web",
                           "port": orthanc["dicom"], "retries": 1, "backoff_s": 0.05, **kw})


class RecordingPipeline:
    """Wraps a real pipeline: records batch sizes and threads, can be slowed down or told to fail on a marked
    pair; everything else (config, provenance, description) is the wrapped pipeline's."""

    def __init__(self, inner: FusionPipeline, delay_s: float = 0.0) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.batches: list[int] = []
        self.poison: set[int] = set()  # id() of pairs that make fuse() raise
        self.started = threading.Event()
        self.threads: list[str] = []  # thread that ran each batch

    def fuse(self, pairs, alive=None):
        self.started.set()
        self.threads.append(threading.current_thread().name)
        self.batches.append(len(pairs))
        time.sleep(self.delay_s)
        if any(id(p) in self.poison for p in pairs):
            raise RuntimeError("simulated model failure")
        return self.inner.fuse(pairs, alive)

    def __getattr__(self, name):
        return getattr(self.inner, name)
