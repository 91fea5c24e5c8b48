"""A real Orthanc (DICOMweb + DIMSE) on free loopback ports, and what the PACS tests and benchmarks do with it:
upload a study, fetch what was stored, validate it with dciodvfy, point PacsSettings at it."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

from harness.servers import free_port, wait_for_http

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
            raise RuntimeError("Orthanc did not start: " + (self.folder / "orthanc.log").read_text()[-2000:])

    def stop(self) -> None:
        """Stop it (the data stays)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)
            self.proc = None

    def info(self) -> dict:
        """What the tests' helpers take."""
        return {"base": self.base, "http": self.http, "dicom": self.dicom}


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
