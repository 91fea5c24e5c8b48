"""The real server process under hostile clients and at shutdown (app/http/server.py): raw sockets and httpx
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

from app.http.server import fd_bound
from harness.servers import free_port, wait_for_http
from models.images.colour import hot_colormap
from models.images.imaging import encode_png
from tests.conftest import ROOT

pytestmark = pytest.mark.system  # real servers, tools or builds: see pyproject markers


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


def _uploads_in_progress(port: int, count: int) -> list[socket.socket]:
    """``count`` connections each in a request whose body is still to come (they hold their slots)."""
    busy = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"POST /fuse HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: 100000\r\n\r\n--b\r\n")
        busy.append(s)
    time.sleep(0.5)
    return busy


def test_connection_cap_refuses_with_json_when_every_slot_is_in_a_request():
    """Slots held by requests whose bodies are still arriving (at any pace with the rate guard off, else at least
    at min_body_rate) are never evicted: a newcomer gets 503 JSON."""
    with serving("--max-connections", "2", "--no-warmup", "--body-timeout-s", "20",
                 "--min-body-rate", "0") as (proc, base, log):
        port = int(base.rsplit(":", 1)[1])
        busy = _uploads_in_progress(port, 2)
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
                                  b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\nContent-Disposition: "
                                  b'form-data; name="mri"; filename="m.png"\r\n\r\n')  # a part's data follows
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
                        r = httpx.post(f"{base}/fuse", files=_pair(64), timeout=30)
                        results.append(r.status_code if r.status_code == 200 else r.text[:80])
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


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_tens_of_thousands_of_refused_uploads_leave_the_http_process_alive_and_its_memory_flat():
    """The probe's crash: /fuse/batch calls of 32 pairs whose 8x8 gray PNG has a wrong IDAT CRC aborted the HTTP
    process (none_dealloc) after 45,728 refusals; 2048 px files with a wrong Adler-32 added 484 MB never returned.
    Here 51,200 such refusals through the real server: every answer a JSON refusal, RSS flat, /healthz at once."""
    from tests.png_craft import chunks, flip_bit, idat_stream, with_stream

    tiny = encode_png(np.zeros((8, 8)))
    bad_crc = flip_bit(tiny, next(p for p, k, _ in chunks(tiny) if k == b"IDAT") + 9, 0, fix_crc=False)
    big = encode_png(np.zeros((2048, 2048, 3)))
    bad_adler = with_stream(big, idat_stream(big)[:-1] + bytes([idat_stream(big)[-1] ^ 1]))
    good = encode_png(np.zeros((8, 8)))
    with serving("--max-connections", "64") as (proc, base, _):
        pid = proc.pid  # the HTTP process (the model runs in a child)

        def batch(mri: bytes, n: int) -> httpx.Response:
            files = [f for _ in range(n) for f in (("mri", ("m.png", mri)), ("functional", ("f.png", good)))]
            return client.post(f"{base}/fuse/batch", files=files, timeout=60)

        with httpx.Client() as client:
            for _ in range(20):  # warm: the first calls allocate pools that stay
                batch(bad_crc, 32)
                batch(bad_adler, 2)
            before = _rss_kib(pid)
            for i in range(1600):
                r = batch(bad_crc, 32)
                assert r.status_code == 200, r.text[:300]
                if i % 200 == 0:
                    manifest = json.loads(__import__("zipfile").ZipFile(__import__("io").BytesIO(r.content))
                                          .read("manifest.json"))
                    assert {p["error"] for p in manifest["pairs"]} == {"corrupt_image"}, manifest
                    assert batch(bad_adler, 2).status_code == 200
            t0 = time.monotonic()
            assert client.get(f"{base}/healthz").status_code == 200 and time.monotonic() - t0 < 1
            grown = _rss_kib(pid) - before
        assert proc.poll() is None
        assert grown < 32 * 1024, f"RSS grew {grown} KiB over 51,200 refusals"


def test_a_deflate_bomb_is_refused_at_once_and_never_holds_the_event_loop():
    """Valid rows then 16 MB of compressed zeros in the same IDAT: /healthz was blocked 48.5 s and the answer was
    200. Now a 422 corrupt_image in well under a second, /healthz answering meanwhile."""
    import zlib

    from tests.png_craft import idat_stream, with_stream

    good = encode_png(np.zeros((64, 64)))
    rows = zlib.decompress(idat_stream(good))
    squeeze = zlib.compressobj(9)
    stream = squeeze.compress(rows) + b"".join(squeeze.compress(bytes(2**20)) for _ in range(16 * 1024)) \
        + squeeze.flush()  # 16 GB of zeros in ~16 MB
    bomb = with_stream(good, stream, parts=len(stream) // 65536)
    with serving() as (_, base, _):
        slowest: list[float] = []
        stop = threading.Event()

        def probe() -> None:
            with httpx.Client() as c:
                while not stop.is_set():
                    t0 = time.monotonic()
                    c.get(f"{base}/healthz", timeout=30)
                    slowest.append(time.monotonic() - t0)
                    time.sleep(0.01)

        watcher = threading.Thread(target=probe)
        watcher.start()
        try:
            t0 = time.monotonic()
            r = httpx.post(f"{base}/fuse", files={"mri": ("m.png", bomb), "functional": ("f.png", good)}, timeout=60)
            took = time.monotonic() - t0
        finally:
            stop.set()
            watcher.join()
        assert r.status_code == 422 and r.json()["error"] == "corrupt_image", r.text
        assert "more image data" in r.json()["detail"]
        assert took < 5 and max(slowest) < 1.0, (took, max(slowest))


def test_a_newcomer_over_the_cap_that_sends_its_request_at_once_gets_the_503_and_is_never_decoded():
    """Over --max-connections with every slot in a request, a client that sent its whole request in its first
    packet was closed with no response while its request was still decoded and logged as 499. Now it gets
    503 too_many_connections JSON and nothing of it reaches the app."""
    with serving("--max-connections", "2", "--no-warmup", "--body-timeout-s", "20",
                 "--min-body-rate", "0") as (proc, base, log):
        port = int(base.rsplit(":", 1)[1])
        busy = _uploads_in_progress(port, 2)
        pair = _pair(32)
        request = httpx.Request("POST", f"{base}/fuse", files=pair, headers={"X-Request-ID": "newcomer-at-once"})
        raw = (f"POST /fuse HTTP/1.1\r\nHost: x\r\nContent-Type: {request.headers['content-type']}\r\n"
               f"X-Request-ID: newcomer-at-once\r\nContent-Length: {len(request.read())}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(raw + request.read())
            answer = _read_all(s)
        for s in busy:
            s.close()
        time.sleep(0.5)
        logs = log.read_text()
    assert answer.startswith(b"HTTP/1.1 503") and b'"too_many_connections"' in answer, answer[:200]
    assert "newcomer-at-once" not in logs  # never reached the app: no 499, no decode


def test_early_answers_close_the_connection_and_drop_a_bounded_rest_of_the_body():
    """A 401 decided from the headers of a 10 GB upload: it says Connection: close, the server half-closes and
    reads at most LINGER_BYTES more (one connection pushed 15 GB in 10 s before), and no second, spurious 408
    follows the answer."""
    from app.http.server import LINGER_BYTES

    with serving("--no-warmup", env={"DMFNET_API_KEY": "k" * 32}) as (proc, base, log):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /fuse HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 10000000000\r\n\r\n")
            sent, chunk, t0 = 0, bytes(1 << 20), time.monotonic()
            s.settimeout(2)
            try:
                while time.monotonic() - t0 < 10 and sent < 4 * LINGER_BYTES:
                    sent += s.send(chunk)
            except OSError:
                pass
            answer = _read_all(s)
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    assert answer.startswith(b"HTTP/1.1 401") and b"connection: close" in head, answer[:300]
    assert answer.count(b"HTTP/1.1") == 1  # no spurious 408 after it
    assert sent < LINGER_BYTES + 32 * 2**20, sent  # the rest of the body was cut off, not read forever


def test_a_body_below_the_minimum_rate_is_closed_once_its_average_falls_short():
    """DMFNET_MIN_BODY_RATE: from body_timeout_s on, the average rate since the body began must be at least
    min_body_rate. A body at 0.8x the rate lived ~body_timeout_s / 0.2 under the old rule (~1,000 s at 0.97x);
    now it is answered 408 just after body_timeout_s; one at 1.5x the rate finishes."""
    with serving("--no-warmup", "--body-timeout-s", "2", "--min-body-rate", "2000") as (proc, base, log):
        port = int(base.rsplit(":", 1)[1])

        def upload(rate: float, total: int) -> tuple[float, bytes]:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                part = b'--b\r\nContent-Disposition: form-data; name="mri"; filename="m.png"\r\n\r\n'
                s.sendall(b"POST /fuse HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                          + f"Content-Length: {total + len(part)}\r\n\r\n".encode() + part)
                t0, sent = time.monotonic(), 0
                try:
                    while sent < total:
                        step = min(200, total - sent)
                        s.sendall(b"x" * step)
                        sent += step
                        time.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
                except OSError:
                    pass
                answer = _read_all(s)
                return time.monotonic() - t0, answer

        slow_took, slow = upload(1600, 40_000)  # would take 25 s
        fast_took, fast = upload(3000, 9_000)  # 3 s, over the 2 s grace
    assert slow.startswith(b"HTTP/1.1 408") and b"minimum rate" in slow and 1.9 < slow_took < 4, (slow_took, slow)
    assert not fast.startswith(b"HTTP/1.1 408"), fast[:200]  # it finished (the parser refuses its x's: 4xx)


def test_malformed_http_is_answered_in_the_json_error_shape():
    """h11's parse errors (two Content-Lengths, a NUL in a header value, headers over h11's limit) were 400
    text/plain from uvicorn; every error of the service is JSON."""
    with serving("--no-warmup") as (proc, base, log):
        port = int(base.rsplit(":", 1)[1])
        answers = []
        for raw in (b"POST /fuse HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                try:
                    s.sendall(raw)
                except OSError:
                    pass
                answers.append(_read_all(s))
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head.lower(), answer[:200]
        assert json.loads(body)["error"] == "bad_request"


def test_an_upload_still_arriving_when_uvicorn_gives_up_gets_503_json_not_a_text_500():
    """An upload begun before SIGTERM and still arriving after the drain and uvicorn's own grace (~10 s) was
    cancelled by uvicorn and answered 500 text/plain; now 503 shutting_down JSON."""
    with serving("--no-warmup", "--body-timeout-s", "60", "--min-body-rate", "100") as (proc, base, log):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            part = b'--b\r\nContent-Disposition: form-data; name="mri"; filename="m.png"\r\n\r\n'
            s.sendall(b"POST /fuse HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 10000000\r\n\r\n" + part)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            try:
                while time.monotonic() - t0 < 30:
                    s.sendall(b"x" * 1000)
                    time.sleep(0.05)
            except OSError:
                pass
            answer = _read_all(s)
        proc.wait(30)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503") and b"application/json" in head.lower(), answer[:300]
    assert json.loads(body)["error"] == "shutting_down"
