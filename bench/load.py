"""Service load test: the same concurrent load against a server without batching and one with it.

Starts ``dmfnet serve`` three times on free ports (max_batch_size 1, then N, then N with the model in the
HTTP process, ``--no-model-process``); for each concurrency level fires
``--requests`` POST /fuse from that many clients, and prints throughput, p50/p95/p99 latency, mean batch
size and errors side by side. The in-process pipeline (the model without HTTP, queue or PNG coding) is
timed on the same pairs (best of batch 1 and N) before every load level and once at the end, and each
served throughput is reported as a share of the mean of the timings either side of it (drift of a shared
VM largely cancels): that share is what the service costs.

Where the share goes: the CPU each server spends per pair (from /proc, its model process included), the
model's CPU per pair in-process, and a last server, ``bench/service_only.py``, whose model does no work (its
CPU per pair is the service's own cost: HTTP, multipart, decoding, colour, queueing, PNG encoding, the hop to
the model process). With every core busy no process layout serves more than ``cores / (model + service CPU
per pair)`` pairs/s: that ceiling is printed as a share of the pipeline.

    python bench/load.py [--weights W] [--size 256] [--requests 32] [--concurrency 1,4,16] [--batch 8] [--quick]

Last line: one JSON object with every run, the batched/unbatched throughput ratio per level and the CPU split.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # harness/: shared with the tests, not installed
from harness.servers import cpu_s, start_server  # noqa: E402
from models.images.imaging import encode_png
from models.images.phantoms import phantom_inputs, phantom_pair
from models.inference.weights import open_pipeline

ROOT = Path(__file__).resolve().parent.parent


SERVICE_ONLY = (str(ROOT / "bench" / "service_only.py"),)


def _serve(weights: str | None, threads: int | None, batch: int, wait_ms: float,
           entry: tuple[str, ...] = ("-m", "dmfnet", "serve"), extra: tuple[str, ...] = (),
           ) -> tuple[subprocess.Popen, str]:
    flags = ["--max-batch-size", str(batch), "--max-wait-ms", str(wait_ms), "--queue-size", "256", *extra]
    flags += (["--weights", weights] if weights else []) + (["--threads", str(threads)] if threads else [])
    return start_server(flags, ready_timeout_s=120, entry=entry)


def _request_bytes(m: bytes, f: bytes, port: int) -> bytes:
    """One complete POST /fuse (multipart), built once: the client's per-request work is a write and a read."""
    b = b"dmfnet-load-boundary"
    parts = [b"--" + b + b'\r\nContent-Disposition: form-data; name="' + name + b'"; filename="x.png"\r\n'
             b"Content-Type: image/png\r\n\r\n" + data + b"\r\n" for name, data in ((b"mri", m), (b"functional", f))]
    body = b"".join(parts) + b"--" + b + b"--\r\n"
    head = (f"POST /fuse HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary={b.decode()}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


def _load(proc: subprocess.Popen, base: str, files: list[tuple[bytes, bytes]], concurrency: int) -> dict:
    """``len(files)`` requests from ``concurrency`` keep-alive connections of a light asyncio client (pre-built
    requests, minimal response parsing: ~1 ms of client CPU per request, so the client hardly competes with the
    server for this machine's cores, unlike a thread per httpx client)."""
    port = int(base.rsplit(":", 1)[1])
    requests = [_request_bytes(m, f, port) for m, f in files]
    results: list[tuple[float, int, float]] = []

    async def connection(todo: list[int]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while todo:
            i = todo.pop()
            t0 = time.perf_counter()
            writer.write(requests[i])
            status = int((await reader.readline()).split()[1])
            length, batch = 0, 0.0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
                elif name.lower() == b"x-batch-size":
                    batch = float(value)
            await reader.readexactly(length)
            results.append((time.perf_counter() - t0, status, batch))
        writer.close()

    async def run(indices: list[int]) -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(connection(indices) for _ in range(concurrency)))
        return time.perf_counter() - t0

    asyncio.run(run([0]))  # first request outside the measurement
    results.clear()
    cpu0 = cpu_s(proc.pid)
    wall = asyncio.run(run(list(range(len(files)))))
    server_cpu = cpu_s(proc.pid) - cpu0
    lat = np.array([r[0] for r in results]) * 1000
    ok = sum(r[1] == 200 for r in results)
    return {"requests": len(results), "ok": ok, "errors": len(results) - ok, "wall_s": round(wall, 2),
            "pairs_per_s": round(len(results) / wall, 3),
            **{f"p{q}_ms": round(float(np.percentile(lat, q))) for q in (50, 95, 99)},
            "mean_batch": round(float(np.mean([r[2] for r in results])), 2),
            "server_cpu_ms_per_pair": round(server_cpu * 1000 / len(results), 2),
            "server_cores_busy": round(server_cpu / wall, 2)}


class PipelineClock:
    """The in-process pipeline on the same pairs: best pairs/s over batch 1 and N, measured on demand."""

    def __init__(self, weights: str | None, pairs: list, batches: tuple[int, ...]) -> None:
        self.pipe = open_pipeline(weights)
        self.pipe.fuse(pairs[:1])  # warm-up, like the server's
        self.pairs, self.batches = pairs, batches
        self.history: list[dict[int, float]] = []
        self.cpu_ms: list[float] = []  # this process's CPU per pair at each mark (all batch sizes)

    def measure(self, min_s: float = 2.0) -> float:
        """Time every batch size over the pairs, repeated until ``min_s`` passed (a few pairs at 5 ms each were
        too noisy a reference); returns the best pairs/s (all kept in ``history``)."""
        out, cpu0, pairs = {}, time.process_time(), 0
        for b in self.batches:
            done, t0 = 0, time.perf_counter()
            while done == 0 or time.perf_counter() - t0 < min_s:
                for i in range(0, len(self.pairs), b):
                    self.pipe.fuse(self.pairs[i : i + b])
                done += len(self.pairs)
            out[b] = done / (time.perf_counter() - t0)
            pairs += done
        self.history.append(out)
        self.cpu_ms.append((time.process_time() - cpu0) * 1000 / pairs)
        return max(out.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4,16", help="comma list of client counts")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--wait-ms", type=float, default=20)
    ap.add_argument("--pipeline-pairs", type=int, default=16, help="distinct pairs in the in-process timing")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for the servers and the in-process reference alike (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="random:tiny, 64 px, 8 requests")
    args = ap.parse_args()
    if args.quick:
        args.weights, args.size, args.requests, args.concurrency = "random:tiny", 64, 8, "1,4"
    files = []
    for i in range(args.requests):
        m, f = phantom_pair("pet", args.size, args.size, seed=i)
        files.append((encode_png(m), encode_png(f)))
    levels = [int(c) for c in args.concurrency.split(",")]
    pairs = phantom_inputs(min(args.pipeline_pairs, args.requests), args.size)  # the first requests' pairs
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = PipelineClock(args.weights, pairs, tuple(dict.fromkeys((1, args.batch))))
    # The pipeline is timed before every load level and once at the end; a level's share of the pipeline
    # uses the mean of the timings either side of it, so the drift of a shared VM largely cancels.
    marks: list[float] = []
    runs: dict[str, dict[int, dict]] = {}
    servers = (("no_batching", 1, ()), (f"batching_{args.batch}", args.batch, ()),
               (f"batching_{args.batch}_in_process", args.batch, ("--no-model-process",)))
    for label, batch, extra in servers:
        proc, base = _serve(args.weights, args.threads, batch, args.wait_ms, extra=extra)
        runs[label] = {}
        try:
            for c in levels:
                marks.append(clock.measure())
                runs[label][c] = _load(proc, base, files, c)
        finally:
            proc.terminate()
            proc.wait(60)
    marks.append(clock.measure())
    service = _service_only(args, files, max(levels))
    print("in-process pipeline best pairs/s at each mark: " + ", ".join(f"{m:.3f}" for m in marks))
    print(f"{'server':<26} {'clients':>7} {'pairs/s':>8} {'pipeline':>8} {'share':>6} {'p50 ms':>7} {'p95 ms':>7} "
          f"{'p99 ms':>7} {'mean batch':>10} {'errors':>6}")
    for k, r in enumerate(r for per in runs.values() for r in per.values()):  # level k sits between marks k, k+1
        r["pipeline_pairs_per_s"] = round((marks[k] + marks[k + 1]) / 2, 3)
        r["of_pipeline"] = round(r["pairs_per_s"] / r["pipeline_pairs_per_s"], 3)
    for label, per in runs.items():
        for c, r in per.items():
            print(f"{label:<26} {c:>7} {r['pairs_per_s']:>8.3f} {r['pipeline_pairs_per_s']:>8.3f} "
                  f"{r['of_pipeline']:>6.0%} {r['p50_ms']:>7} {r['p95_ms']:>7} {r['p99_ms']:>7} "
                  f"{r['mean_batch']:>10} {r['errors']:>6}")
    unbatched, batched = list(runs.values())[:2]
    ratio = {str(c): round(batched[c]["pairs_per_s"] / unbatched[c]["pairs_per_s"], 2) for c in levels}
    print(f"batched / unbatched throughput: {ratio}")
    split = _cpu_split(clock, marks, service, runs)
    print(f"CPU per pair: model {split['model_cpu_ms']} ms in-process, service {split['service_cpu_ms']} ms "
          f"(server with a no-work model: {service['pairs_per_s']} pairs/s), served {split['served_cpu_ms']} ms. "
          f"With every core busy no layout serves more than {split['ceiling_of_pipeline']:.0%} of the pipeline here.")
    print(json.dumps({"size": args.size, "weights": args.weights or "shipped", "requests": args.requests,
                      "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                      "pipeline_timings": [{str(b): round(v, 3) for b, v in h.items()} for h in clock.history],
                      "runs": {k: {str(c): r for c, r in v.items()} for k, v in runs.items()},
                      "service_only": service, "cpu_split": split, "throughput_ratio": ratio}))


SERVICE_PASSES = 3


def _service_only(args: argparse.Namespace, files: list[tuple[bytes, bytes]], concurrency: int) -> dict:
    """The same load against ``bench/service_only.py`` (batching on): the service's own CPU per pair. A pass over
    the requests takes seconds where the model's reference is the median of many timings, and this VM's speed
    moves by tens of percent within minutes: the median of ``SERVICE_PASSES`` passes (all kept)."""
    proc, base = _serve(args.weights, args.threads, args.batch, args.wait_ms, entry=SERVICE_ONLY)
    try:
        passes = sorted((_load(proc, base, files, concurrency) for _ in range(SERVICE_PASSES)),
                        key=lambda r: r["server_cpu_ms_per_pair"])
        return {**passes[len(passes) // 2], "passes_cpu_ms_per_pair": [r["server_cpu_ms_per_pair"] for r in passes]}
    finally:
        proc.terminate()
        proc.wait(60)


def _cpu_split(clock: PipelineClock, marks: list[float], service: dict, runs: dict) -> dict:
    """Model vs service CPU per pair, and the share of the pipeline this machine can serve at most: with every
    core busy, ``cores / (model + service CPU per pair)`` pairs/s, whatever the process layout."""
    model = float(np.median(clock.cpu_ms))
    own = service["server_cpu_ms_per_pair"]
    served = min(r["server_cpu_ms_per_pair"] for per in runs.values() for r in per.values())
    ceiling = (os.cpu_count() or 1) * 1000 / (model + own)
    return {"model_cpu_ms": round(model, 2), "service_cpu_ms": own, "served_cpu_ms": served,
            "ceiling_pairs_per_s": round(ceiling, 1),
            "ceiling_of_pipeline": round(min(1.0, ceiling / float(np.mean(marks))), 3)}


if __name__ == "__main__":
    main()
