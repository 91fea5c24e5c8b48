"""Service load test: the same concurrent load against a server without batching and one with it.

Starts ``dmfnet serve`` twice on free ports (max_batch_size 1, then N), fires ``--requests`` POST /fuse
with ``--concurrency`` clients at each, and prints throughput and latency percentiles side by side.

    python bench/load.py [--weights W] [--size 256] [--requests 32] [--concurrency 8] [--batch 8] [--quick]

Last line: one JSON object with both runs and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from models.imaging import encode_png
from models.phantoms import phantom_pair

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(weights: str | None, batch: int, wait_ms: float) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--max-batch-size", str(batch),
           "--max-wait-ms", str(wait_ms), "--queue-size", "256"]
    if weights:
        cmd += ["--weights", weights]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not become ready")


def _load(base: str, files: list[tuple[bytes, bytes]], concurrency: int) -> dict:
    def one(i: int) -> tuple[float, int, float]:
        m, f = files[i % len(files)]
        t0 = time.perf_counter()
        r = client.post(f"{base}/fuse", files={"mri": ("m.png", m), "functional": ("f.png", f)})
        return time.perf_counter() - t0, r.status_code, float(r.headers.get("x-batch-size", 0))

    with httpx.Client(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        one(0)  # first request outside the measurement
        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(one, range(len(files))))
        wall = time.perf_counter() - t0
    lat = np.array([r[0] for r in results])
    return {"requests": len(results), "ok": sum(r[1] == 200 for r in results), "wall_s": round(wall, 2),
            "pairs_per_s": round(len(results) / wall, 3), "p50_ms": round(float(np.percentile(lat, 50)) * 1000),
            "p95_ms": round(float(np.percentile(lat, 95)) * 1000),
            "mean_batch": round(float(np.mean([r[2] for r in results])), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--wait-ms", type=float, default=20)
    ap.add_argument("--quick", action="store_true", help="random:tiny, 64 px, 8 requests")
    args = ap.parse_args()
    if args.quick:
        args.weights, args.size, args.requests = "random:tiny", 64, 8
    files = []
    for i in range(args.requests):
        m, f = phantom_pair("pet", args.size, args.size, seed=i)
        files.append((encode_png(m), encode_png(f)))
    runs = {}
    for label, batch in (("no_batching", 1), (f"batching_{args.batch}", args.batch)):
        proc, base = _serve(args.weights, batch, args.wait_ms)
        try:
            runs[label] = _load(base, files, args.concurrency)
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"{'server':<14} {'pairs/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'mean batch':>10} {'ok':>5}")
    for label, r in runs.items():
        print(f"{label:<14} {r['pairs_per_s']:>8.2f} {r['p50_ms']:>8} {r['p95_ms']:>8} {r['mean_batch']:>10} "
              f"{r['ok']:>3}/{r['requests']}")
    a, b = runs.values()
    print(json.dumps({"size": args.size, "concurrency": args.concurrency, "weights": args.weights or "shipped",
                      "runs": runs, "throughput_ratio": round(b["pairs_per_s"] / a["pairs_per_s"], 2)}))


if __name__ == "__main__":
    main()
