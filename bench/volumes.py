"""Volumes end to end: a 40-slice 256 px MR (0.94 mm) with a 128 px PET (2.6 mm, 24 slices, shifted field of
view) through a real Orthanc (retrieve, resample, fuse, store) for both tiers, and the peak memory of fusing a
512 x 512 x 200 MR (fast tier, in-process).

    python bench/volumes.py [--tiers fast,full] [--big-slices 200] [--json OUT]

Needs Orthanc with the DICOMweb plugin (scripts/install-test-deps.sh) for the end-to-end part.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.orthanc import ORTHANC, ORTHANC_DICOMWEB, OrthancServer, dicom_bytes  # noqa: E402


class Timed:
    """A transport that adds up the seconds spent retrieving and storing."""

    def __init__(self, inner) -> None:
        self.inner, self.retrieve_s, self.store_s = inner, 0.0, 0.0

    def retrieve_series(self, study, series):  # noqa: D102
        t = time.perf_counter()
        try:
            return self.inner.retrieve_series(study, series)
        finally:
            self.retrieve_s += time.perf_counter() - t

    def store(self, datasets):  # noqa: D102
        t = time.perf_counter()
        try:
            return self.inner.store(datasets)
        finally:
            self.store_s += time.perf_counter() - t

    def __getattr__(self, name):
        return getattr(self.inner, name)


def end_to_end(tiers: list[str]) -> list[dict]:
    """The issue's study through Orthanc (DICOMweb), once per tier."""
    import httpx

    from app.pacs.transport import DicomWebTransport
    from app.pacs.workflow import InProcessFuser, fuse_study
    from harness.orthanc import pacs_settings
    from harness.studies import new_study, series_from_volume
    from models.inference.weights import open_pipeline
    from models.volumes import phantom as pv
    from models.volumes.io import volume_from_datasets
    from models.volumes.volume import resample_onto

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = OrthancServer(Path(tmp))
        base, dicom = server.base, server.dicom
        try:
            for n, tier in enumerate(tiers):
                study = new_study(500 + n)
                mr = series_from_volume(study, pv.sample("MR", 256, 0.94, 40, 1.0, centre=[0, 0, 5]), 1)
                pet = series_from_volume(study, pv.sample("PT", 128, 2.6, 24, 2.03, centre=[10, -5, 0]), 2,
                                         slope_per_slice=True)
                for ds in mr + pet:
                    httpx.post(f"{base}/instances", content=dicom_bytes(ds)).raise_for_status()
                t = time.perf_counter()
                resample_onto(volume_from_datasets(pet), volume_from_datasets(mr))
                resample_s = time.perf_counter() - t
                fuser = InProcessFuser(open_pipeline(tier, "cpu"))
                transport = Timed(DicomWebTransport(pacs_settings({"base": base, "dicom": dicom}, "dicomweb")))
                t = time.perf_counter()
                report = fuse_study(transport, fuser, study.StudyInstanceUID, mr[0].SeriesInstanceUID,
                                    pet[0].SeriesInstanceUID)
                total = time.perf_counter() - t
                rows.append({"tier": tier, "model": fuser.model_name, "instances": report.instances,
                             "total_s": round(total, 2), "retrieve_s": round(transport.retrieve_s, 2),
                             "store_s": round(transport.store_s, 2), "resample_s": round(resample_s, 3),
                             "fuse_s": round(total - transport.retrieve_s - transport.store_s, 2),
                             "s_per_slice": round(total / report.instances, 3)})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            server.stop()
    return rows


def big_volume(slices: int) -> dict:
    """Peak RSS of fusing a 512 x 512 x ``slices`` MR with a PET (fast tier, in-process), in a child process."""
    code = f"""
import json, resource, time
from pathlib import Path
def rss():
    status = Path("/proc/self/status").read_text().splitlines()
    return round(int(next(line for line in status if line.startswith("VmRSS")).split()[1]) / 1024)
from models.volumes import phantom as pv
from models.volumes.fusion import InProcessFuser, fuse_volumes
from models.inference.weights import open_pipeline
fuser = InProcessFuser(open_pipeline("fast", "cpu"))
before = rss()
mr = pv.sample("MR", 512, 0.5, {slices}, 1.0)
pet = pv.sample("PT", 128, 2.6, {max(8, slices // 2)}, 2.03)
loaded = rss()
t = time.perf_counter()
out = fuse_volumes(mr, pet, fuser)
print(json.dumps({{"mr": "512x512x{slices}", "fused_slices": len(out.covered), "s": round(time.perf_counter() - t, 1),
                  "rss_model_mb": before, "rss_volumes_mb": loaded, "rss_after_mb": rss(),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "mr_float32_mb": round(mr.array.nbytes / 2**20), "fused_rgb_uint8_mb":
                  round(sum(s.nbytes for s in out.slices) / 2**20)}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    row = json.loads(r.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    """Run and print JSON lines (and a summary file with --json)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiers", default="fast,full")
    p.add_argument("--big-slices", type=int, default=200, help="slices of the 512 px MR (0: skip)")
    p.add_argument("--json", help="write all results here")
    args = p.parse_args()
    out = {"cpu_threads": __import__("torch").get_num_threads(), "end_to_end": [], "big": None}
    if ORTHANC and ORTHANC_DICOMWEB.exists() and shutil.which(ORTHANC):
        out["end_to_end"] = end_to_end([t for t in args.tiers.split(",") if t])
    else:
        print("Orthanc not installed: end-to-end part skipped", file=sys.stderr)
    if args.big_slices:
        out["big"] = big_volume(args.big_slices)
    out["bench_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
