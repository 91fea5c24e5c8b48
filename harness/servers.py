"""A real ``dmfnet serve`` on a free loopback port, its CPU and RSS, and the reference output a response is
checked against (the service benchmarks and the tests that start servers)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from app.engine.admission import resident_bytes

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, timeout_s: float) -> bool:
    """Poll ``url`` until it answers 200 or ``timeout_s`` passes; True when it answered."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


def start_server(flags: list[str], env: dict[str, str] | None = None, port: int | None = None,
                 ready_timeout_s: float = 120, entry: tuple[str, ...] = ("-m", "dmfnet", "serve"),
                 ) -> tuple[subprocess.Popen, str]:
    """``dmfnet serve --port P FLAGS`` on 127.0.0.1 (``entry``: another server taking the same flags, e.g.
    ``bench/service_only.py``); waits for /readyz; returns the process and its base URL."""
    port = port or free_port()
    cmd = [sys.executable, *entry, "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server on port {port} did not become ready")


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()


def _family(pid: int) -> list[int]:
    """A server process and its live children (the model process, multiprocessing's resource tracker)."""
    found = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != pid:
            try:
                if int(_stat(int(entry))[1]) == pid:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) a server and its live children have used so far, from /proc."""
    total = 0
    for p in _family(pid):
        try:
            fields = _stat(p)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident memory (MB) of a server and its live children (the model process), from /proc."""
    return sum(resident_bytes(p) for p in _family(pid)) / (1 << 20)


def fused_8bit(pipe, mri_png: bytes, functional_png: bytes, modality: str | None = None) -> np.ndarray:  # noqa: ANN001
    """The pair fused alone in this process, as the 8-bit pixels the service's PNG must hold (mix-up check)."""
    from models.images.pair_input import decode_pair

    return np.round(pipe.fuse([decode_pair(mri_png, functional_png, modality)])[0].pixels * 255).astype(np.uint8)
