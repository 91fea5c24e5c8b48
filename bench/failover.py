"""Failover: replicas of the real service behind HAProxy, one SIGTERMed and another killed mid-load.

Starts ``--replicas`` servers (``random:tiny``: this measures the service and the balancer, not the model) on
loopback and HAProxy in front (active health checks on ``/readyz`` every 500 ms, out after 2 failures).
Retrying a POST is safe here because fusion is deterministic (same inputs and weights, same output, no side
effects), so HAProxy is told to retry on connection failures, empty responses and 503 on another replica
(``retry-on``, ``option redispatch``). ``--clients`` threads post pairs (each answer is checked against the
pair fused in this process); a third of the way in one replica gets SIGTERM (it drains and leaves), two
thirds in another gets SIGKILL.

    python bench/failover.py [--replicas 3] [--clients 16] [--seconds 30] [--quick]

Reports requests and failures per phase (by when each ended), p99 before/after, and how long HAProxy took to
mark each replica down. Last line: one JSON object with at least ``requests``, ``failed``, ``replicas``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # harness/: shared with the tests, not installed
from harness.servers import free_port, fused_8bit, start_server  # noqa: E402
from models.images.imaging import encode_png
from models.images.phantoms import phantom_pair
from models.inference.weights import open_pipeline

WEIGHTS = "random:tiny"


def haproxy_config(port: int, backends: list[int], sock: Path) -> str:
    """HAProxy in front of the replicas: health checks on /readyz, L7 retries of idempotent fusion POSTs."""
    servers = "\n".join(f"  server r{i} 127.0.0.1:{p} check" for i, p in enumerate(backends))
    return f"""global
  maxconn 512
  stats socket {sock} mode 600 level admin
  tune.bufsize 262144

defaults
  mode http
  timeout connect 2s
  timeout client 120s
  timeout server 120s
  # Fusion is deterministic and side-effect free: a POST may be sent again to another replica.
  retries 3
  option redispatch 1
  retry-on conn-failure empty-response junk-response response-timeout 503
  option http-buffer-request

frontend fusion
  bind 127.0.0.1:{port}
  default_backend replicas

backend replicas
  balance leastconn
  option httpchk GET /readyz
  http-check expect status 200
  # A connection refused or reset marks a replica down at once (a killed one is not retried onto again).
  default-server inter 500ms fall 2 rise 2 observe layer4 error-limit 1 on-error mark-down
{servers}
"""


def server_states(sock: Path) -> dict[str, str]:
    """{server name: status} from HAProxy's stats socket (UP, DOWN, ...)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    out = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("pxname") == "replicas" and row.get("svname", "").startswith("r"):
            out[row["svname"]] = row.get("status", "")
    return out


def main() -> int:  # noqa: D103
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--quick", action="store_true", help="CI: 14 s")
    args = ap.parse_args()
    if args.quick:
        args.seconds = 14
    if shutil.which("haproxy") is None:
        print("error: haproxy not installed (apt-get install haproxy; scripts/install-test-deps.sh does)",
              file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # as the replicas (OMP_NUM_THREADS=1): bf16 kernels round by thread count
    pipe = open_pipeline(WEIGHTS, "cpu")
    cases = []
    for i in range(4):
        m, f = phantom_pair("pet" if i % 2 else "ct", 64, 64, seed=i)
        mb, fb = encode_png(m), encode_png(f)
        cases.append(({"mri": ("m.png", mb), "functional": ("f.png", fb)}, fused_8bit(pipe, mb, fb)))

    env = {"OMP_NUM_THREADS": "1", "DMFNET_SHUTDOWN_GRACE_S": "10"}
    replicas = [start_server(["--weights", WEIGHTS, "--max-batch-size", "8"], env=env)
                for _ in range(args.replicas)]
    tmp = Path(tempfile.mkdtemp(prefix="dmfnet-failover-"))
    port, sock = free_port(), tmp / "haproxy.sock"
    (tmp / "haproxy.cfg").write_text(haproxy_config(port, [int(b.rsplit(":", 1)[1]) for _, b in replicas], sock))
    lb = subprocess.Popen(["haproxy", "-f", str(tmp / "haproxy.cfg"), "-db"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 20:
        try:
            if sock.exists() and list(server_states(sock).values()).count("UP") == args.replicas:
                break
        except OSError:
            pass
        time.sleep(0.1)
    results: list[tuple[float, int, float, str]] = []  # (t, status, seconds, problem)
    lock = threading.Lock()
    start = time.monotonic()
    stop_at = start + args.seconds

    def client(k: int) -> None:
        with httpx.Client(timeout=120) as http:
            i = k
            while time.monotonic() < stop_at:
                files, expected = cases[i % len(cases)]
                i += 1
                t = time.monotonic()
                problem = ""
                try:
                    r = http.post(f"{base}/fuse", files=files)
                    status = r.status_code
                    if status == 200 and not np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), expected):
                        problem = "mix-up"
                    elif status != 200:  # what answered: our JSON error code, or HAProxy's own page
                        problem = r.text[:120].replace("\n", " ")
                except httpx.HTTPError as exc:
                    status, problem = 0, f"{type(exc).__name__}: {exc}"[:120]
                with lock:
                    results.append((t - start, status, time.monotonic() - t, problem))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
    for th in threads:
        th.start()
    events: dict[str, float] = {}
    removed: dict[str, float | None] = {}
    plan = [(args.seconds / 3, "sigterm", 0, signal.SIGTERM), (2 * args.seconds / 3, "kill9", 1, signal.SIGKILL)]
    for at, name, idx, sig in plan:
        while time.monotonic() - start < at:
            time.sleep(0.02)
        events[name] = time.monotonic() - start
        os.kill(replicas[idx][0].pid, sig)
        removed[name] = None
        while time.monotonic() - start < at + 5:
            if server_states(sock).get(f"r{idx}", "UP") != "UP":
                removed[name] = round(time.monotonic() - start - events[name], 2)
                break
            time.sleep(0.05)
    for th in threads:
        th.join()
    lb.terminate()
    for proc, _ in replicas:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(30)
    shutil.rmtree(tmp, ignore_errors=True)

    def phase(lo: float, hi: float) -> dict:
        """Requests that ended in the phase: one the SIGKILLed replica held when it died belongs to the SIGKILL
        phase, not to the graceful one before it, though it began there."""
        rows = [r for r in results if lo <= r[0] + r[2] < hi]
        failed = [r for r in rows if r[1] != 200 or r[3]]
        lat = [r[2] * 1000 for r in rows if r[1] == 200] or [float("nan")]
        return {"requests": len(rows), "failed": len(failed), "p99_ms": round(float(np.percentile(lat, 99))),
                "failures": [f"{r[1]} at {r[0]:.2f} s after {r[2]:.2f} s: {r[3]}" for r in failed]}

    phases = {"before": phase(0, events["sigterm"]), "after_sigterm": phase(events["sigterm"], events["kill9"]),
              "after_kill9": phase(events["kill9"], float("inf"))}
    doc = {"replicas": args.replicas, "clients": args.clients, "seconds": args.seconds,
           "requests": len(results), "failed": sum(p["failed"] for p in phases.values()),
           "mixups": sum(1 for r in results if r[3] == "mix-up"), "phases": phases,
           "marked_down_after_s": removed, "events_at_s": {k: round(v, 2) for k, v in events.items()}}
    for name, p in phases.items():
        print(f"{name:<14} requests {p['requests']:>5}  failed {p['failed']:>3}  p99 {p['p99_ms']:>6} ms  "
              f"{'; '.join(p['failures'])}")
    print(f"HAProxy marked the replica down {removed['sigterm']} s after SIGTERM, {removed['kill9']} s after "
          "SIGKILL")
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
