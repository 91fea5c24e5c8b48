"""Start a real ``dmfnet serve`` subprocess on a free loopback port for the benchmarks (load, soak, failover)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(flags: list[str], env: dict[str, str] | None = None, port: int | None = None,
                 ready_timeout_s: float = 120) -> tuple[subprocess.Popen, str]:
    """``dmfnet serve --port P FLAGS`` on 127.0.0.1; waits for /readyz; returns the process and its base URL."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "dmfnet", "serve", "--port", str(port), *flags]
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
