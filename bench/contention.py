"""Fusion throughput while other clients keep the HTTP layer busy: the model in its own process or not.

Torch dispatches each operator from Python, so in one process the model thread needs the GIL between
operators, and the event loop holds it while it parses, validates, logs and answers. This bench starts
``dmfnet serve`` with the model in its own process (the default) and with ``--no-model-process``, and for each
measures fused pairs/s from ``--clients`` fusion clients, first alone, then beside ``--flood`` connections that
send cheap requests as fast as they are answered (``GET /healthz``, or a malformed ``POST /fuse``: what a
monitoring storm or a hostile client costs). Each server's "beside" throughput is reported as a share of its
own "alone" throughput, measured in the same run. First, the reason in-process: the pipeline alone (one torch
thread, so a core is free), beside a spinning Python thread, and beside a spinning Python process.

    python bench/contention.py [--weights fast] [--size 256] [--clients 8] [--flood 8] [--seconds 8] [--quick]

Last line: one JSON object with every measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from load import _request_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # harness/: shared with the tests, not installed
from harness.servers import start_server  # noqa: E402
from models.images.imaging import encode_png
from models.images.phantoms import phantom_inputs, phantom_pair
from models.inference.weights import open_pipeline

FLOODS = {
    "healthz": lambda port: f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode(),
    "bad_fuse": lambda port: (f"POST /fuse HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data;"
                              f" boundary=x\r\nContent-Length: 5\r\n\r\nhello").encode(),
}


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    writer.write(request)
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def _measure(port: int, fuse_requests: list[bytes], clients: int, flood: bytes | None, flooders: int,
                   seconds: float) -> dict:
    """Fusion clients (and flooders) for ``seconds``; counts completed 200 fusions and flood answers."""
    counts = {"fused": 0, "fuse_errors": 0, "flood_answers": 0}
    stop = time.perf_counter() + seconds

    async def fuser(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        while time.perf_counter() < stop:
            ok = await _exchange(reader, writer, fuse_requests[i % len(fuse_requests)]) == 200
            counts["fused" if ok else "fuse_errors"] += 1
            i += clients
        writer.close()

    async def flooder() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop:
            await _exchange(reader, writer, flood)
            counts["flood_answers"] += 1
        writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(fuser(k) for k in range(clients)), *(flooder() for _ in range(flooders if flood else 0)))
    wall = time.perf_counter() - t0
    return {"fused_per_s": round(counts["fused"] / wall, 2), "flood_per_s": round(counts["flood_answers"] / wall, 1),
            "fuse_errors": counts["fuse_errors"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="fast")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--clients", type=int, default=8, help="fusion clients")
    ap.add_argument("--flood", type=int, default=8, help="flooding connections")
    ap.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    ap.add_argument("--quick", action="store_true", help="random:tiny, 64 px, 2 s per measurement")
    args = ap.parse_args()
    if args.quick:
        args.weights, args.size, args.seconds = "random:tiny", 64, 2.0
    pngs = [tuple(encode_png(x) for x in phantom_pair("pet", args.size, args.size, seed=i)) for i in range(16)]
    beside = _model_beside_python(args.weights, args.size, min(args.seconds, 3.0))
    print("in-process model, one torch thread, pairs/s: " + ", ".join(f"{k} {v}" for k, v in beside.items()))
    results: dict[str, dict] = {}
    for layout, extra in (("model_process", []), ("in_process", ["--no-model-process"])):
        proc, base = start_server(["--weights", args.weights, "--max-batch-size", "8", *extra])
        port = int(base.rsplit(":", 1)[1])
        requests = [_request_bytes(m, f, port) for m, f in pngs]
        try:
            asyncio.run(_measure(port, requests, args.clients, None, 0, 1.0))  # warm connections and caches
            row = {"alone": asyncio.run(_measure(port, requests, args.clients, None, 0, args.seconds))}
            for name, build in FLOODS.items():
                row[name] = asyncio.run(_measure(port, requests, args.clients, build(port), args.flood, args.seconds))
                row[name]["of_alone"] = round(row[name]["fused_per_s"] / row["alone"]["fused_per_s"], 3)
            results[layout] = row
        finally:
            proc.terminate()
            _wait(proc)
    print(f"{'layout':<14} {'flood':<9} {'fused/s':>8} {'of alone':>8} {'flood/s':>8} {'errors':>6}")
    for layout, row in results.items():
        for name, r in row.items():
            share = f"{r['of_alone']:.0%}" if "of_alone" in r else "-"
            print(f"{layout:<14} {name:<9} {r['fused_per_s']:>8.2f} {share:>8} {r['flood_per_s']:>8.1f} "
                  f"{r['fuse_errors']:>6}")
    print(json.dumps({"weights": args.weights, "size": args.size, "clients": args.clients, "flood": args.flood,
                      "seconds": args.seconds, "model_beside_python": beside, "results": results}))


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():
        pass


def _model_beside_python(weights: str, size: int, seconds: float) -> dict[str, float]:
    """The pipeline alone in this process (one torch thread, so a core is free), beside a spinning Python
    thread (shares the GIL) and beside a spinning Python process (shares only the CPUs)."""
    torch.set_num_threads(1)
    pipe = open_pipeline(weights)
    pairs = phantom_inputs(8, size)
    pipe.fuse(pairs[:2])

    def rate() -> float:
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            for p in pairs:
                pipe.fuse([p])
            n += len(pairs)
        return round(n / (time.perf_counter() - t0), 1)

    out = {"alone": rate()}
    stop = threading.Event()
    spinner = threading.Thread(target=_spin, args=(stop,), daemon=True)
    spinner.start()
    out["beside_python_thread"] = rate()
    stop.set()
    spinner.join()
    other = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.2)
    out["beside_python_process"] = rate()
    other.kill()
    other.wait()
    return out


def _wait(proc: subprocess.Popen) -> None:
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


if __name__ == "__main__":
    main()
