"""Memory admission: the probe's 8 x 4096^2 /fuse/batch, twice at once, against a real server per budget.

For each ``--budgets`` value (MB; ``auto`` = the service's default from the memory limit) starts
``dmfnet serve``, sends ``--calls`` concurrent /fuse/batch calls of ``--pairs`` flat ``--size``^2 pairs (gray MR +
colour PET: a ~100 kB upload per call that decodes to GBs), samples the server's RSS every 50 ms, and prints
per-pair statuses, the RSS growth over the idle server and that growth against the budget, side by side.

    python bench/admission.py [--weights fast] [--size 4096] [--pairs 8] [--calls 2] [--budgets 2048,auto]

Last line: one JSON object with every run.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # harness/: shared with the tests, not installed
from harness.servers import rss_mb, start_server  # noqa: E402
from models.images.colour import hot_colormap
from models.images.imaging import encode_png


def flat_pair(size: int) -> tuple[bytes, bytes]:
    """A flat gray MR and a flat colour PET: tiny PNGs, full-size planes once decoded."""
    mri = np.full((size, size), 0.4, np.float32)
    pet = hot_colormap(np.full((size, size), 0.5, np.float32))
    return encode_png(mri), encode_png(pet)


def run(weights: str, budget: str, size: int, pairs: int, calls: int) -> dict:
    """One server with this budget; ``calls`` concurrent batch calls; RSS sampled throughout."""
    flags = ["--weights", weights, "--request-timeout-s", "3600", "--max-upload-bytes", str(2**28)]
    if budget != "auto":
        flags += ["--memory-budget-mb", budget]
    proc, base = start_server(flags, ready_timeout_s=300)
    m, f = flat_pair(size)
    files = [("mri", ("m.png", m)), ("functional", ("f.png", f))] * pairs
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(rss_mb(proc.pid))
            time.sleep(0.05)

    def call(_: int) -> tuple[int, list]:
        r = httpx.post(f"{base}/fuse/batch", files=files, timeout=3600)
        if r.status_code != 200:
            return r.status_code, [r.json().get("error")]
        manifest = json.loads(zipfile.ZipFile(io.BytesIO(r.content)).read("manifest.json"))["pairs"]
        return 200, [p["status"] for p in manifest]

    try:
        idle = rss_mb(proc.pid)
        budget_mb = httpx.get(f"{base}/version").json()["batching"]["memory_budget_mb"]
        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(calls) as pool:
            outcomes = list(pool.map(call, range(calls)))
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
    finally:
        done.set()
        proc.terminate()
        proc.wait(60)
    peak = max(samples)
    return {"budget": budget, "budget_mb": budget_mb, "upload_kb_per_call": round(len(m + f) * pairs / 1024),
            "idle_rss_mb": round(idle), "peak_rss_mb": round(peak), "growth_mb": round(peak - idle),
            "growth_vs_budget": round((peak - idle) / budget_mb, 3), "wall_s": round(wall, 1),
            "calls": [{"status": s, "pairs": p} for s, p in outcomes]}


def main() -> int:  # noqa: D103
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", default="fast")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--calls", type=int, default=2)
    ap.add_argument("--budgets", default="2048,auto")
    ap.add_argument("--quick", action="store_true", help="CI: random:tiny, 2 x 4 x 1024 px, a 160 MB budget")
    args = ap.parse_args()
    if args.quick:
        args.weights, args.size, args.pairs, args.calls, args.budgets = "random:tiny", 1024, 4, 2, "160"
    rows = [run(args.weights, b.strip(), args.size, args.pairs, args.calls) for b in args.budgets.split(",")]
    for r in rows:
        statuses = [s for c in r["calls"] for s in c["pairs"]]
        print(f"budget {r['budget_mb']:>6} MB ({r['budget']}): {args.calls} x {args.pairs} x {args.size}px "
              f"({r['upload_kb_per_call']} kB per call) -> statuses {sorted(set(map(str, statuses)))}, RSS "
              f"{r['idle_rss_mb']} -> {r['peak_rss_mb']} MB (growth {r['growth_mb']} MB = "
              f"{r['growth_vs_budget']} x budget), {r['wall_s']} s")
    print(json.dumps({"weights": args.weights, "size": args.size, "pairs": args.pairs, "calls": args.calls,
                      "runs": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
