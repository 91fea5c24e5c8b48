"""The PACS watcher at scale: 1,000 small studies in a real Orthanc that caps its answers at 100 (as many
hospital PACS do). First pass fuses each study once, second pass retrieves nothing; studies/min with 1 and 4
studies in flight (the derived series are deleted between the two first passes); the watcher's RSS.

    python bench/watch.py [--studies 1000] [--weights fast] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.orthanc import OrthancServer, dicom_bytes, pacs_settings  # noqa: E402


def rss_mb() -> float:
    """Current resident set size (MB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Counting:
    """Counts series retrievals."""

    def __init__(self, inner) -> None:
        self.inner, self.retrieved = inner, 0

    def retrieve_series(self, study, series):  # noqa: D102
        self.retrieved += 1
        return self.inner.retrieve_series(study, series)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def upload(server: OrthancServer, count: int) -> None:
    """``count`` MR + PET studies (4 slices of 32 px), dated over 60 days (at most ~17 a day)."""
    import httpx

    from harness.studies import make_study

    def one(i: int) -> None:
        study = make_study(slices=4, size=32, seed=i)
        with httpx.Client() as client:
            for ds in study["MR"] + study["PT"]:
                ds.StudyDate = f"202610{1 + i % 30:02d}" if i % 2 else f"202611{1 + i % 30:02d}"
                client.post(f"{server.base}/instances", content=dicom_bytes(ds)).raise_for_status()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))


def delete_derived(server: OrthancServer) -> int:
    """Remove our fused series (Modality OT) so a first pass can be measured again."""
    import httpx

    gone = 0
    for s in httpx.get(f"{server.base}/series?expand", timeout=120).json():
        if s["MainDicomTags"].get("Modality") == "OT":
            httpx.delete(f"{server.base}/series/{s['ID']}").raise_for_status()
            gone += 1
    return gone


def run_pass(server, fuser, concurrency: int, label: str, decisions) -> dict:
    """One watch pass; studies/min, outcomes, retrievals, RSS."""
    from app.pacs.transport import DicomWebTransport
    from app.pacs.watch import watch_once

    settings = pacs_settings(server.info(), "dicomweb", watch={"min_mr_slices": 2, "concurrency": concurrency,
                                                                "page_size": 100})
    t = Counting(DicomWebTransport(settings))
    start = time.perf_counter()
    reports = watch_once(t, fuser, settings, decisions=decisions)
    took = time.perf_counter() - start
    studies = len({r.study for r in reports if r.study})
    outcomes: dict[str, int] = {}
    for r in reports:
        outcomes[r.status] = outcomes.get(r.status, 0) + 1
    row = {"pass": label, "in_flight": concurrency, "studies": studies, "seconds": round(took, 1),
           "studies_per_min": round(studies / took * 60, 1), "outcomes": outcomes, "series_retrieved": t.retrieved,
           "rss_mb": round(rss_mb()), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    """Upload, then first pass (4 in flight), second pass, first pass again with 1 in flight."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=1000)
    p.add_argument("--weights", default="fast")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    from app.pacs.watch import Decisions
    from app.pacs.workflow import InProcessFuser
    from models.inference.weights import open_pipeline

    fuser = InProcessFuser(open_pipeline(args.weights, "cpu"))
    out = {"studies": args.studies, "weights": args.weights, "orthanc_limit_find_results": 100, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        server = OrthancServer(Path(tmp), LimitFindResults=100, LimitFindInstances=1000)
        try:
            t = time.perf_counter()
            upload(server, args.studies)
            out["upload_s"] = round(time.perf_counter() - t, 1)
            print(json.dumps({"uploaded": args.studies, "seconds": out["upload_s"], "rss_mb": round(rss_mb())}))
            watcher = Decisions(None)  # one watcher process: what it learnt in a pass serves the next
            out["rows"].append(run_pass(server, fuser, 4, "first", watcher))
            out["rows"].append(run_pass(server, fuser, 4, "second", watcher))
            out["deleted_series"] = delete_derived(server)
            out["rows"].append(run_pass(server, fuser, 1, "first", Decisions(None)))
        finally:
            server.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
