"""What hospitals (and attackers) send: foreign formats, deadlines, disconnects, overload, secrets, odd encodings.

Every entry point goes through the same decoder; these tests check the refusals through HTTP and the CLI.
"""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from app.http.main import create_app
from app.http.metrics import ServiceMetrics
from app.http.middleware import ServiceMiddleware
from app.settings import ServiceSettings
from dmfnet.cli import main as cli_main
from harness.servers import free_port, wait_for_http
from models.images.imaging import ImageError, decode_image, encode_png
from models.images.phantoms import phantom_pair
from models.inference.pipeline import FusionPipeline

pytestmark = pytest.mark.system  # real servers, tools or builds: see pyproject markers

LOOPING_EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n{ } loop\n"


def _settings(**kw) -> ServiceSettings:
    return ServiceSettings(**{"warmup": False, "max_wait_ms": 5, **kw})


def _slow_tiled_pipeline(delay_s: float = 0.02) -> tuple[FusionPipeline, list[int]]:
    """A tiny model that tiles at 32 px and sleeps in every UNet call; returns it and a call counter."""
    pipe = FusionPipeline.random_init("tiny", seed=0, tile_size=32, tile_overlap=8)
    calls: list[int] = []

    def hook(module, args):
        calls.append(1)
        time.sleep(delay_s)

    pipe.unet.register_forward_pre_hook(hook)
    return pipe, calls


def _png_pair(size: int = 64, modality: str = "pet") -> tuple[bytes, bytes]:
    m, f = phantom_pair(modality, size, size, seed=5)
    return encode_png(m), encode_png(f)


def _files(mri: bytes, functional: bytes) -> dict:
    return {"mri": ("a.png", mri, "image/png"), "functional": ("b.png", functional, "image/png")}


def _foreign_files() -> dict[str, bytes]:
    """The same small image in every format we refuse (EPS/PDF written by Pillow itself, PS by hand)."""
    im = Image.fromarray((phantom_pair("ct", 32, 32)[0] * 255).astype(np.uint8)).convert("RGB")
    out = {"ps": b"%!PS-Adobe-3.0\n0 0 moveto 10 10 lineto stroke showpage\n", "eps_loop": LOOPING_EPS}
    for fmt in ("EPS", "PDF", "GIF", "BMP", "WEBP"):
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        out[fmt.lower()] = buf.getvalue()
    return out


@pytest.fixture
def no_subprocess(monkeypatch):
    """Fail loudly if anything starts a child process (Pillow runs Ghostscript through subprocess)."""
    started: list[object] = []
    real_init = subprocess.Popen.__init__

    def spy(self, *args, **kw):
        started.append(args[0] if args else kw.get("args"))
        return real_init(self, *args, **kw)

    monkeypatch.setattr(subprocess.Popen, "__init__", spy)
    return started


# ------------------------------------------------------------------------------------------ strict decoding
def test_ghostscript_would_run_without_the_format_restriction(no_subprocess):
    """Sanity check that the refusals below mean something: plain Pillow hands EPS to Ghostscript."""
    if shutil.which("gs") is None:
        pytest.skip("Ghostscript not installed (scripts/install-test-deps.sh installs it)")
    im = Image.open(io.BytesIO(_foreign_files()["eps"]))
    im.load()
    assert no_subprocess, "Pillow opened EPS without Ghostscript: the restriction test would prove nothing"


def test_decoder_refuses_every_foreign_format_without_a_child_process(no_subprocess):
    for name, data in _foreign_files().items():
        with pytest.raises(ImageError) as err:
            decode_image(data, label=name)
        assert err.value.code == "not_an_image", name
    assert no_subprocess == []


def test_http_refuses_foreign_formats_with_415(tiny_pipeline, no_subprocess):
    mri, func = _png_pair()
    with TestClient(create_app(_settings(), tiny_pipeline)) as c:
        for name, data in _foreign_files().items():
            r = c.post("/fuse", files=_files(mri, data))
            assert r.status_code == 415 and r.json()["error"] == "not_an_image", (name, r.text)
            r = c.post("/fuse/json", json={"mri": base64.b64encode(data).decode(),
                                           "functional": base64.b64encode(func).decode()})
            assert r.status_code == 415, (name, r.text)
        r = c.post("/fuse/batch", files=[("mri", ("a", mri)), ("functional", ("b.eps", LOOPING_EPS))])
        assert r.status_code == 200 and r.headers["x-pairs-failed"] == "1"
    assert no_subprocess == []


def test_cli_refuses_foreign_formats(tmp_path, capsys, no_subprocess):
    mri, _ = _png_pair()
    (tmp_path / "mri.png").write_bytes(mri)
    for name, data in _foreign_files().items():
        path = tmp_path / f"functional.{name}"
        path.write_bytes(data)
        code = cli_main(["fuse", str(tmp_path / "mri.png"), str(path), "-o", str(tmp_path / "out.png"),
                         "--weights", "random:tiny"])
        assert code == 1 and "not a recognised image" in capsys.readouterr().err, name
    assert not (tmp_path / "out.png").exists() and no_subprocess == []


# ------------------------------------------------------------------------------------------ deadlines
def test_deadline_stops_work_mid_fusion_with_504():
    pipe, calls = _slow_tiled_pipeline()
    mri, func = _png_pair(256)
    with TestClient(create_app(_settings(), pipe)) as c:
        t0 = time.monotonic()
        r = c.post("/fuse", files=_files(mri, func), headers={"X-Request-Timeout": "0.5"})
        took = time.monotonic() - t0
        assert r.status_code == 504 and r.json()["error"] == "deadline_exceeded", r.text
        time.sleep(0.3)
        assert 'dmfnet_deadline_expired_total 1.0' in c.get("/metrics").text
    total_calls = 11 * 11 * 2 * len(pipe.cfg.fusion.timesteps)  # 121 tiles of 32 px at 256 px
    assert took < 3 and len(calls) < total_calls / 4  # stopped within a chunk, not after ~10 s of work


def test_bad_request_timeout_header_is_422(tiny_pipeline):
    mri, func = _png_pair()
    with TestClient(create_app(_settings(), tiny_pipeline)) as c:
        for bad in ("soon", "-1", "inf", "nan"):
            r = c.post("/fuse", files=_files(mri, func), headers={"X-Request-Timeout": bad})
            assert r.status_code == 422 and r.json()["error"] == "bad_timeout"


def _serve(app, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for_http(f"http://127.0.0.1:{port}/readyz", 30)
    return server, thread


def test_client_disconnect_stops_the_work_and_stalled_batch_shows_in_readyz():
    """Real uvicorn: the client gives up after 1.2 s; the model thread stops soon after, and while the batch
    held the model longer than stall_after_s, /readyz said 503 and /metrics showed the batch's age."""
    pipe, calls = _slow_tiled_pipeline()
    port = free_port()
    server, thread = _serve(create_app(_settings(stall_after_s=0.3), pipe), port)
    base = f"http://127.0.0.1:{port}"
    seen: dict[str, object] = {}

    def watch():  # polls while the batch holds the model (a loaded CI machine starts it later than 0.3 s)
        deadline, seen["age"] = time.monotonic() + 1.6, 0.0
        time.sleep(0.35)
        while time.monotonic() < deadline and not (seen.get("ready", {}).get("status") == "stalled"
                                                   and seen["age"] > 0.3):
            ready = httpx.get(f"{base}/readyz").json()
            if ready["status"] == "stalled" or "ready" not in seen:
                seen["ready"] = ready
            metrics = httpx.get(f"{base}/metrics").text
            age = [ln for ln in metrics.splitlines() if ln.startswith("dmfnet_inflight_batch_age_seconds ")]
            seen["age"] = max(seen["age"], float(age[0].split()[1]) if age else 0.0)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        mri, func = _png_pair(256)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/fuse", files=_files(mri, func), timeout=1.2)
        watcher.join()
        time.sleep(0.5)  # the disconnect is noticed at once, the work stops within one UNet call
        stopped_at = len(calls)
        time.sleep(0.5)
        assert len(calls) == stopped_at and stopped_at < 11 * 11 * 4 / 4
        assert httpx.get(f"{base}/readyz").json()["status"] == "ready"
    finally:
        server.should_exit = True
        thread.join(10)
    assert seen["ready"]["status"] == "stalled" and seen["ready"]["batch_age_s"] >= 0.3  # rounded to 0.1 s
    assert seen["age"] > 0.3  # /metrics showed the batch's age while it held the model


# ------------------------------------------------------------------------------------------ overload
async def _asgi_call(app, method: str, path: str) -> tuple[int, bool]:
    """Call an ASGI app directly; returns (status, whether the app ever asked for the body)."""
    asked: list[bool] = []
    sent: list[dict] = []

    async def receive():
        asked.append(True)
        return {"type": "http.request", "body": b"x" * 10, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": [(b"content-length", b"10")]}
    await app(scope, receive, send)
    return sent[0]["status"], bool(asked)


def test_admission_refuses_before_the_body_is_read():
    import asyncio

    async def inner(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    refusal = (503, {"error": "queue_full", "detail": "full"}, {"Retry-After": "3"})
    mw = ServiceMiddleware(inner, ServiceMetrics(), 1000, None, False,
                           admission=lambda path: refusal if path == "/fuse" else None)
    assert asyncio.run(_asgi_call(mw, "POST", "/fuse")) == (503, False)
    assert asyncio.run(_asgi_call(mw, "POST", "/other")) == (200, True)


def test_full_queue_answers_503_without_decoding(tiny_pipeline, monkeypatch):
    pipe, _ = _slow_tiled_pipeline(delay_s=0.05)
    decoded: list[str] = []
    real = decode_image
    monkeypatch.setattr("models.images.pair_input.decode_image",
                        lambda *a, **k: (decoded.append(a[2]), real(*a, **k))[1])
    big, small = _png_pair(256), _png_pair(64)
    with TestClient(create_app(_settings(max_batch_size=1, queue_size=1, max_wait_ms=0), pipe)) as c:
        threads = [threading.Thread(target=c.post, args=("/fuse",), kwargs={
            "files": _files(*big), "headers": {"X-Request-Timeout": "4"}})]
        threads[0].start()
        while c.get("/readyz").json().get("status") == "ready" and not decoded:
            time.sleep(0.01)
        time.sleep(0.3)  # first pair on the model
        threads.append(threading.Thread(target=c.post, args=("/fuse",), kwargs={
            "files": _files(*big), "headers": {"X-Request-Timeout": "4"}}))
        threads[1].start()
        deadline = time.monotonic() + 5
        while c.get("/readyz").json().get("status") != "saturated" and time.monotonic() < deadline:
            time.sleep(0.01)
        n_decoded = len(decoded)
        r = c.post("/fuse", files=_files(*small))
        assert r.status_code == 503 and r.json()["error"] == "queue_full" and int(r.headers["retry-after"]) >= 1
        assert len(decoded) == n_decoded  # refused before decoding (and before reading the body)
        for t in threads:
            t.join()


# ------------------------------------------------------------------------------------------ secrets
def test_settings_errors_never_show_the_api_key(tmp_path, capsys, monkeypatch):
    with pytest.raises(ValidationError) as err:
        ServiceSettings(api_key="tooShortKey42")
    assert "tooShortKey42" not in str(err.value) and "api_key" in str(err.value)
    key = "ThisIsTheSecretApiKeyValue123456"
    (tmp_path / "key").write_text("AnotherSecretKeyFromTheFile12345")
    with pytest.raises(ValidationError) as err:
        ServiceSettings(api_key=key, api_key_file=tmp_path / "key")
    text = str(err.value)
    assert key[:6] not in text and "AnotherSecret" not in text and "not both" in text
    monkeypatch.setenv("DMFNET_API_KEY", "tooShortKey42")
    assert cli_main(["serve", "--weights", "random:tiny"]) == 2
    captured = capsys.readouterr()
    assert "tooShortKey42" not in captured.err + captured.out and "api_key" in captured.err


# ------------------------------------------------------------------------------------------ ergonomics
def test_wrapped_base64_is_accepted(tiny_pipeline):
    mri, func = _png_pair()

    def wrapped(b: bytes) -> str:  # what `base64` prints: 76 columns, newline-terminated
        text = base64.b64encode(b).decode()
        return "\n".join(text[i:i + 76] for i in range(0, len(text), 76)) + "\n"

    with TestClient(create_app(_settings(), tiny_pipeline)) as c:
        plain = c.post("/fuse", files=_files(mri, func))
        r = c.post("/fuse/json", json={"mri": wrapped(mri), "functional": " " + wrapped(func)})
        assert r.status_code == 200, r.text
        assert r.content == plain.content
        r = c.post("/fuse/json", json={"mri": wrapped(mri) + "!", "functional": wrapped(func)})
        assert r.status_code == 422 and r.json()["error"] == "bad_base64"


def test_duplicate_parts_and_key_headers_are_refused(tiny_pipeline):
    mri, func = _png_pair()
    other, _ = _png_pair(64, "ct")
    with TestClient(create_app(_settings(), tiny_pipeline)) as c:
        r = c.post("/fuse", files=[("mri", ("a.png", mri)), ("mri", ("c.png", other)), ("functional", ("b", func))])
        assert r.status_code == 422 and r.json()["error"] == "duplicate_field" and "mri" in r.json()["detail"]
        r = c.post("/fuse", files=_files(mri, func), data={"modality": ["pet", "ct"]})
        assert r.status_code == 422 and "modality" in r.json()["detail"]
    key = "k" * 24
    with TestClient(create_app(_settings(api_key=key), tiny_pipeline)) as c:
        r = c.post("/fuse", files=_files(mri, func), headers=[("X-API-Key", key), ("X-API-Key", "wrong")])
        assert r.status_code == 401 and "more than once" in r.json()["detail"]
        r = c.post("/fuse", files=_files(mri, func), headers=[("X-API-Key", "wrong"), ("X-API-Key", key)])
        assert r.status_code == 401
        assert c.post("/fuse", files=_files(mri, func), headers={"X-API-Key": key}).status_code == 200


def test_out_of_memory_is_a_503_and_the_worker_survives(tiny_pipeline, monkeypatch):
    """A CUDA OOM (simulated: torch raises torch.OutOfMemoryError) answers 503 and the next request works."""
    import torch

    mri, func = _png_pair()
    real_fuse = tiny_pipeline.fuse
    calls: list[int] = []

    def oom_once(pairs, alive=None):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 17.2 GiB")
        return real_fuse(pairs, alive)

    monkeypatch.setattr(tiny_pipeline, "fuse", oom_once)
    with TestClient(create_app(_settings(), tiny_pipeline)) as c:
        r = c.post("/fuse", files=_files(mri, func))
        assert r.status_code == 503 and r.json()["error"] == "out_of_memory" and r.headers["retry-after"]
        assert c.post("/fuse", files=_files(mri, func)).status_code == 200


def test_content_length_with_transfer_encoding_is_refused_and_closed():
    """Both framings on one request (a smuggling vector behind a proxy): 400 JSON, and the connection closes."""
    import socket
    import sys

    from harness.servers import free_port, wait_for_http
    from tests.conftest import ROOT

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dmfnet", "serve", "--weights", "random:tiny", "--port", str(port),
                             "--no-warmup"], cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        assert wait_for_http(f"http://127.0.0.1:{port}/readyz", timeout_s=60)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /fuse HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"0\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):  # returns b"" once the server closes the connection
                data += chunk
        assert data.startswith(b"HTTP/1.1 400") and b'"bad_request"' in data
        assert data.count(b"HTTP/1.1") == 1  # the smuggled second request was never answered
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_batch_over_the_form_parsers_part_cap_is_413_too_many_pairs_like_any_other(tiny_pipeline):
    """33 pairs and 1,000 pairs are the same mistake: one limit, one code (1,000 was 400 "Too many files")."""
    m, f = _png_pair(8)
    with TestClient(create_app(_settings(), tiny_pipeline)) as c:
        for pairs in (33, 1000):
            files = [("mri", ("a.png", m, "image/png")), ("functional", ("b.png", f, "image/png"))] * pairs
            r = c.post("/fuse/batch", files=files)
            assert r.status_code == 413 and r.json()["error"] == "too_many_pairs", (pairs, r.text[:200])


def test_tiff_pixel_formats_we_cannot_fuse_are_named_422():
    """Signed 16-bit is named as such (it was called "32-bit integer"); 16-bit gray+alpha and float16 TIFFs are
    TIFFs in an unsupported pixel format (422 unsupported_mode), not "not an image" (415)."""
    tifffile = pytest.importorskip("tifffile")

    def tiff(data, **kw) -> bytes:
        buf = io.BytesIO()
        tifffile.imwrite(buf, data, **kw)
        return buf.getvalue()

    with pytest.raises(ImageError) as signed:
        decode_image(tiff(np.full((16, 16), -5, np.int16)))
    assert signed.value.code == "unsupported_bit_depth" and "signed" in signed.value.detail
    gray_alpha = tiff(np.ones((16, 16, 2), np.uint16), photometric="minisblack", extrasamples=[2])
    for data, fmt in ((gray_alpha, "2 sample(s) x 16-bit unsigned"), (tiff(np.ones((16, 16), np.float16)),
                                                                     "1 sample(s) x 16-bit float")):
        with pytest.raises(ImageError) as err:
            decode_image(data)
        assert err.value.code == "unsupported_mode" and fmt in err.value.detail
    with pytest.raises(ImageError) as truncated:
        decode_image(gray_alpha[:6] + b"\0" * 10)
    assert truncated.value.code == "not_an_image"
