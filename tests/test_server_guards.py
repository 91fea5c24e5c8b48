"""The real server process under hostile clients and at shutdown (app/server.py): raw sockets and httpx
against ``dmfnet serve``, nothing mocked."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.server import fd_bound
from models.images.imaging import encode_png, hot_colormap
from tests.conftest import ROOT, free_port, wait_for_http


@contextmanager
def serving(*flags: str, weights: str = "random:tiny", env: dict | None = None):
    """A ``dmfnet serve`` process (JSON logs to a file); yields (process, base URL, log path)."""
    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"dmfnet-serve-{port}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dmfnet", "serve", "--weights", weights, "--port", str(port),
                                 "--log-json", *flags], cwd=ROOT, stderr=out, env={**os.environ, **(env or {})})
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_for_http(f"{base}/readyz", timeout_s=180):
            pytest.fail(f"server did not become ready: {log.read_text()[-2000:]}")
        yield proc, base, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.unlink(missing_ok=True)


def _pair(n: int) -> dict:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    return {"mri": ("m.png", encode_png((xx + yy) / 2)), "functional": ("f.png", encode_png(hot_colormap(xx)))}


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except OSError:
        pass
    return data


def test_sigterm_during_a_long_full_model_request_answers_503_json():
    """A full-model pair that outlasts the grace: 503 shutting_down JSON at the grace (not a text/plain 500);
    new requests meanwhile get 503 JSON on the still-open socket; readiness 503; then the process exits."""
    with serving("--shutdown-grace-s", "2", weights="full") as (proc, base, log):
        out: dict = {}

        def long_request():
            t0 = time.monotonic()
            out["long"] = httpx.post(f"{base}/fuse", files=_pair(1536), timeout=300)
            out["long_s"] = time.monotonic() - t0

        worker = threading.Thread(target=long_request)
        worker.start()
        deadline = time.monotonic() + 60
        while "inflight" not in out and time.monotonic() < deadline:  # wait until the pair is on the model
            metrics = httpx.get(f"{base}/metrics").text
            age = [ln for ln in metrics.splitlines() if ln.startswith("dmfnet_inflight_batch_age_seconds ")]
            if age and float(age[0].split()[1]) > 0:
                out["inflight"] = True
            time.sleep(0.1)
        assert out.get("inflight"), "the long request never reached the model"
        t_signal = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        late = httpx.post(f"{base}/fuse", files=_pair(64), timeout=30)
        ready = httpx.get(f"{base}/readyz", timeout=30)
        worker.join(120)
        answered_after = time.monotonic() - t_signal
        rc = proc.wait(60)
        logs = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert late.status_code == 503 and late.json()["error"] == "shutting_down"
    assert ready.status_code == 503 and ready.json()["status"] == "shutting_down"
    long = out["long"]
    assert long.status_code == 503 and long.headers["content-type"] == "application/json"
    assert long.json()["error"] == "shutting_down"
    assert answered_after < 2 + 5  # at the grace (plus the poll), not when the model would have finished
    assert rc in (0, -signal.SIGTERM)
    drained = [e for e in logs if e["msg"] == "drained"]
    assert drained and drained[0]["answered_503"] == 1
    assert not any(e["level"] == "error" for e in logs)  # nothing cancelled underneath the app


def _healthz_like_a_probe(base: str) -> int:
    """GET /healthz, retried once after a connection-level error, as a load balancer's or kubelet's probe is.

    The bursts below (2,000 connects at once against a listen backlog of 1,024) overflow the kernel's accept
    queue. In about one run in three with a training job on the other core (and once in a fresh-clone CI run), one
    probe connection was reset while the server, instrumented, logged no refusal or eviction and `nstat`'s
    TCPAbortOnData (a close with unread bytes) did not move: the kernel's reset, not the service's. A server that
    starved /healthz fails both tries, and the time bound below counts both.
    """
    try:
        return httpx.get(f"{base}/healthz", timeout=10).status_code
    except (httpx.ReadError, httpx.ConnectError, httpx.RemoteProtocolError):
        return httpx.get(f"{base}/healthz", timeout=10).status_code


def test_slow_header_connections_do_not_starve_healthz_or_the_fd_limit():
    """Thousands of slowloris connections (as many as this process may open, up to 20,000): /healthz still
    answers, the server's descriptors stay under the cap, slow clients get 408 at the header deadline, and every
    log line stays JSON."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    count = min(20_000, hard - 200)
    socks: list[socket.socket] = []
    try:
        with serving("--max-connections", "200", "--header-timeout-s", "3", "--no-warmup") as (proc, base, log):
            port = int(base.rsplit(":", 1)[1])
            healthz_s: list[float] = []
            for i in range(count):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                socks.append(s)
                if i % 2000 == 1999:
                    for t in socks[-2000:]:
                        try:
                            t.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                        except OSError:
                            pass
                    t0 = time.monotonic()
                    assert _healthz_like_a_probe(base) == 200
                    healthz_s.append(time.monotonic() - t0)
            server_fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
            for s in socks:
                s.close()
            time.sleep(1)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
                slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                t0 = time.monotonic()
                answer = _read_all(slow)
                timed_out_after = time.monotonic() - t0
            assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
            lines = log.read_text().splitlines()
    finally:
        for s in socks:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print(f"{count} slow connections: /healthz max {max(healthz_s):.3f} s, server fds {server_fds}")
    assert len(healthz_s) >= count // 2000 and max(healthz_s) < 5
    assert server_fds <= fd_bound(200)
    assert answer.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in answer and 2.5 < timed_out_after < 6
    assert lines and all(line.startswith("{") for line in lines)


def test_connection_cap_refuses_with_json_when_every_slot_is_in_a_request():
    """Slots held by requests whose bodies are still arriving (at any pace with the rate guard off, else at least
    at min_body_rate) are never evicted: a newcomer gets 503 JSON."""
    with serving("--max-connections", "2", "--no-warmup", "--body-timeout-s", "20",
                 "--min-body-rate", "0") as (proc, base, log):
        port = int(base.rsplit(":", 1)[1])
        busy = []
        for _ in range(2):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"POST /fuse HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 100000\r\n\r\n--b\r\n")
            busy.append(s)
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            time.sleep(0.3)  # a newcomer that has not sent its request once its slot is decided
            refused = _read_all(s)
        for s in busy:
            s.close()
        time.sleep(0.5)
        after = httpx.get(f"{base}/healthz", timeout=10)
    assert refused.startswith(b"HTTP/1.1 503") and b'"too_many_connections"' in refused
    assert after.status_code == 200


def test_stalled_body_is_dropped_after_the_body_timeout():
    with serving("--no-warmup", "--body-timeout-s", "1") as (proc, base, log):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /fuse HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 100000\r\n\r\n--b\r\n")
            t0 = time.monotonic()
            _read_all(s)  # returns when the server closes the connection
            closed_after = time.monotonic() - t0
        assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
    assert 0.8 < closed_after < 5


def test_drain_answers_new_clients_on_fresh_connections_with_503_not_a_reset():
    """During the SIGTERM drain every new /fuse on a fresh connection is answered 503 shutting_down JSON, even
    though its body was still on the wire when the answer was decided (a close with unread bytes is a reset)."""
    with serving("--shutdown-grace-s", "8", weights="full") as (proc, base, log):
        worker = threading.Thread(target=lambda: httpx.post(f"{base}/fuse", files=_pair(1536), timeout=300))
        worker.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the long pair is on the model: the drain will last the grace
            age = [ln for ln in httpx.get(f"{base}/metrics").text.splitlines()
                   if ln.startswith("dmfnet_inflight_batch_age_seconds ")]
            if age and float(age[0].split()[1]) > 0:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        outcomes: list[str] = []
        body = os.urandom(8_000_000)  # far more than the socket buffers: still on the wire when the 503 is decided

        def fresh_client() -> None:
            with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=30) as sock:
                sock.sendall(b"POST /fuse HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
                             + f"Content-Length: {len(body)}\r\n\r\n".encode())
                try:
                    sock.sendall(body)
                except OSError as exc:  # a reset while sending: the client never gets to read its answer
                    outcomes.append(type(exc).__name__)
                    return
                answer = _read_all(sock)
            head, _, payload = answer.partition(b"\r\n\r\n")
            outcomes.append(f"{head.split()[1].decode()} {json.loads(payload)['error']}" if payload else "no answer")

        clients = [threading.Thread(target=fresh_client) for _ in range(20)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(60)
        worker.join(120)
        proc.wait(60)
    assert outcomes == ["503 shutting_down"] * 20, outcomes


def test_slow_uploads_cannot_starve_a_real_client_reusing_its_connection():
    """30 clients trickling request bodies at 2 bytes/s (reconnecting when cut off) against a cap of 20
    connections: a real client's fusions, on a kept-alive connection and on fresh ones, all succeed (before: every
    slot was held by a trickle, so a new connection got 503 too_many_connections), and the trickles are cut."""
    with serving("--no-warmup", "--max-connections", "20", "--body-timeout-s", "2") as (proc, base, log):
        port = int(base.rsplit(":", 1)[1])
        stop = time.monotonic() + 12
        cut = []

        def trickle() -> None:
            while time.monotonic() < stop:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                        s.sendall(b"POST /fuse HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                                  b"boundary=b\r\nContent-Length: 100000\r\n\r\n")
                        while time.monotonic() < stop:
                            s.sendall(b"x")
                            time.sleep(0.5)
                except OSError:
                    cut.append(1)
                    time.sleep(0.05)

        attackers = [threading.Thread(target=trickle, daemon=True) for _ in range(30)]
        for t in attackers:
            t.start()
        time.sleep(3)  # the slots are taken
        results = []
        with httpx.Client(base_url=base, timeout=30) as client:
            for n in range(10):
                try:
                    if n % 2:  # a kept-alive connection, and a fresh one each other time
                        results.append(client.post("/fuse", files=_pair(64)).status_code)
                    else:
                        results.append(httpx.post(f"{base}/fuse", files=_pair(64), timeout=30).status_code)
                except httpx.HTTPError as exc:
                    results.append(type(exc).__name__)
                time.sleep(0.3)
        for t in attackers:
            t.join(20)
        logs = log.read_text()
    assert results == [200] * 10, results
    assert len(cut) >= 30 and "slow request body closed" in logs


def test_readiness_says_stalled_while_the_model_process_is_frozen():
    """SIGSTOP the model process under a request: /readyz turns 503 stalled within seconds (it said ready for
    the whole 20 s freeze before), and ready again once the process runs and the pair is answered."""
    with serving() as (proc, base, log):
        child = httpx.get(f"{base}/version").json()["model"]["model_process_pid"]
        os.kill(child, signal.SIGSTOP)
        try:
            out: dict = {}
            worker = threading.Thread(target=lambda: out.update(r=httpx.post(f"{base}/fuse", files=_pair(64),
                                                                                timeout=60)))
            worker.start()
            seen, t0 = [], time.monotonic()
            while time.monotonic() - t0 < 9:
                r = httpx.get(f"{base}/readyz", timeout=10)
                seen.append((round(time.monotonic() - t0, 1), r.json()["status"]))
                time.sleep(0.5)
        finally:
            os.kill(child, signal.SIGCONT)
        worker.join(60)
        after = httpx.get(f"{base}/readyz", timeout=10).json()["status"]
    stalled = [t for t, status in seen if status == "stalled"]
    assert stalled and stalled[0] <= 7.0 and seen[-1][1] == "stalled", seen
    assert out["r"].status_code == 200 and after == "ready"
