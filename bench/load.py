"""Service load test: the same concurrent load against a server without batching and one with it.

Starts ``dmfnet serve`` twice on free ports (max_batch_size 1, then N); for each concurrency level fires
``--requests`` POST /fuse from that many clients, and prints throughput, p50/p95/p99 latency, mean batch
size and errors side by side. The in-process pipeline (the model without HTTP, queue or PNG coding) is
timed on the same pairs before and after the servers (best of batch 1 and N, averaged over the two
measurements so that drift of a shared VM cancels), and each served throughput is reported as a share
of it: the service's overhead.

    python bench/load.py [--weights W] [--size 256] [--requests 32] [--concurrency 1,4,16] [--batch 8] [--quick]

Last line: one JSON object with every run and the batched/unbatched throughput ratio per level.
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

from models.imaging import DecodedImage, encode_png
from models.phantoms import phantom_pair
from models.pipeline import open_pipeline, prepare_pair

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
    lat = np.array([r[0] for r in results]) * 1000
    ok = sum(r[1] == 200 for r in results)
    return {"requests": len(results), "ok": ok, "errors": len(results) - ok, "wall_s": round(wall, 2),
            "pairs_per_s": round(len(results) / wall, 3),
            **{f"p{q}_ms": round(float(np.percentile(lat, q))) for q in (50, 95, 99)},
            "mean_batch": round(float(np.mean([r[2] for r in results])), 2)}


def _pipeline_best(weights: str | None, pairs: list, batches: tuple[int, ...]) -> dict[int, float]:
    """In-process pairs/s of the pipeline at each batch size (same pairs as the HTTP load)."""
    pipe = open_pipeline(weights)
    pipe.fuse(pairs[:1])  # warm-up, like the server's
    out = {}
    for b in batches:
        t0 = time.perf_counter()
        for i in range(0, len(pairs), b):
            pipe.fuse(pairs[i : i + b])
        out[b] = len(pairs) / (time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4,16", help="comma list of client counts")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--wait-ms", type=float, default=20)
    ap.add_argument("--pipeline-pairs", type=int, default=8, help="pairs per in-process pipeline timing")
    ap.add_argument("--quick", action="store_true", help="random:tiny, 64 px, 8 requests")
    args = ap.parse_args()
    if args.quick:
        args.weights, args.size, args.requests, args.concurrency = "random:tiny", 64, 8, "1,4"
        args.pipeline_pairs = 4
    files, pairs = [], []
    for i in range(args.requests):
        m, f = phantom_pair("pet", args.size, args.size, seed=i)
        files.append((encode_png(m), encode_png(f)))
        if i < args.pipeline_pairs:
            pairs.append(prepare_pair(DecodedImage(m, 8), DecodedImage(f, 8), "pet"))
    levels = [int(c) for c in args.concurrency.split(",")]
    batch_sizes = tuple(dict.fromkeys((1, args.batch)))
    before = _pipeline_best(args.weights, pairs, batch_sizes)
    runs: dict[str, dict[int, dict]] = {}
    for label, batch in (("no_batching", 1), (f"batching_{args.batch}", args.batch)):
        proc, base = _serve(args.weights, batch, args.wait_ms)
        try:
            runs[label] = {c: _load(base, files, c) for c in levels}
        finally:
            proc.terminate()
            proc.wait(60)
    after = _pipeline_best(args.weights, pairs, batch_sizes)
    pipeline = {b: (before[b] + after[b]) / 2 for b in batch_sizes}
    best = max(pipeline.values())
    print("in-process pipeline pairs/s (before / after the servers): " + ", ".join(
        f"batch {b}: {before[b]:.3f} / {after[b]:.3f}" for b in batch_sizes) + f"; best mean {best:.3f}")
    print(f"{'server':<12} {'clients':>7} {'pairs/s':>8} {'of pipeline':>11} {'p50 ms':>7} {'p95 ms':>7} "
          f"{'p99 ms':>7} {'mean batch':>10} {'errors':>6}")
    for label, per in runs.items():
        for c, r in per.items():
            r["of_pipeline"] = round(r["pairs_per_s"] / best, 3)
            print(f"{label:<12} {c:>7} {r['pairs_per_s']:>8.3f} {r['of_pipeline']:>10.0%} {r['p50_ms']:>7} "
                  f"{r['p95_ms']:>7} {r['p99_ms']:>7} {r['mean_batch']:>10} {r['errors']:>6}")
    unbatched, batched = runs.values()
    ratio = {str(c): round(batched[c]["pairs_per_s"] / unbatched[c]["pairs_per_s"], 2) for c in levels}
    print(f"batched / unbatched throughput: {ratio}")
    print(json.dumps({"size": args.size, "weights": args.weights or "shipped", "requests": args.requests,
                      "pipeline_pairs_per_s": {str(b): round(v, 3) for b, v in pipeline.items()},
                      "runs": {k: {str(c): r for c, r in v.items()} for k, v in runs.items()},
                      "throughput_ratio": ratio}))


if __name__ == "__main__":
    main()
