"""The real watcher (``dmfnet pacs watch`` in its own process) through a long PACS outage: Orthanc is stopped
for ``--outage-s`` (default 300 s, past the 90 s retry budget), restarted, a new study is pushed; the watcher must
still be running, have logged the outage once (not once per retry), and fuse the new study.

    python bench/watch_outage.py [--outage-s 300] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.orthanc import OrthancServer, upload_study  # noqa: E402
from harness.servers import free_port  # noqa: E402


def wait_for(condition, timeout: float) -> float:
    """Seconds until ``condition()`` held (raises after ``timeout``)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise SystemExit("timed out")
        time.sleep(0.5)
    return time.monotonic() - start


def main() -> int:
    """Run the outage and print one JSON summary."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outage-s", type=float, default=300)
    p.add_argument("--json", help="write the summary here")
    args = p.parse_args()
    import httpx

    from harness.studies import make_study

    with tempfile.TemporaryDirectory() as tmp:
        server = OrthancServer(Path(tmp) / "orthanc")
        health = free_port()
        env = {**os.environ, "DMFNET_PACS_DICOMWEB_URL": f"{server.base}/dicom-web", "XDG_CACHE_HOME": tmp,
               "DMFNET_PACS_WATCH__HEALTH_PORT": str(health), "DMFNET_PACS_WATCH__INTERVAL_S": "5",
               "DMFNET_PACS_WATCH__BACKOFF_MAX_S": "60", "DMFNET_PACS_WATCH__MIN_MR_SLICES": "2"}
        out, err = open(Path(tmp) / "out.jsonl", "w"), open(Path(tmp) / "err.log", "w")
        watcher = subprocess.Popen([sys.executable, "-m", "dmfnet", "pacs", "--weights", "fast", "watch"], env=env,
                                   stdout=out, stderr=err, cwd=Path(__file__).parents[1])
        reports = lambda: [json.loads(line) for line in (Path(tmp) / "out.jsonl").read_text().splitlines()]  # noqa: E731
        try:
            first = upload_study(server.info(), make_study(slices=3, size=32, seed=1))
            wait_for(lambda: any(r["study"] == first["MR"][0].StudyInstanceUID and r["status"] == "stored"
                                 for r in reports()), 120)
            server.stop()
            down = time.monotonic()
            time.sleep(args.outage_s)
            alive_after_outage = watcher.poll() is None
            healthz_during = httpx.get(f"http://127.0.0.1:{health}/healthz").json()
            server.start()
            late = upload_study(server.info(), make_study(slices=3, size=32, seed=2))
            recovered = wait_for(lambda: any(r["study"] == late["MR"][0].StudyInstanceUID and r["status"] == "stored"
                                             for r in reports()), 600)
            log = (Path(tmp) / "err.log").read_text().splitlines()
            summary = {"outage_s": args.outage_s, "watcher_alive_after_outage": alive_after_outage,
                       "state_during_outage": healthz_during["state"],
                       "fused_after_restart_s": round(recovered, 1),
                       "total_s": round(time.monotonic() - down, 1),
                       "log_lines_pass_failed": sum("watch pass failed" in line for line in log),
                       "log_lines_recovered": sum("watch pass succeeded" in line for line in log),
                       "log_lines_retrying": sum("retrying" in line for line in log),
                       "tracebacks": sum("Traceback" in line for line in log),
                       "metrics_errors": [line for line in httpx.get(f"http://127.0.0.1:{health}/metrics").text
                                          .splitlines() if line.startswith("dmfnet_watch_pass_errors_total")]}
        finally:
            watcher.terminate()
            watcher.wait(30)
            server.stop()
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if summary["watcher_alive_after_outage"] else 1


if __name__ == "__main__":
    sys.exit(main())
