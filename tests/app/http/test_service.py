"""HTTP service: /fuse and friends, every error path, limits, auth, metrics, readiness and shutdown."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.http.main import create_app
from app.settings import ServiceSettings
from dmfnet.cli import main as cli_main
from harness.servers import free_port, wait_for_http
from models.images.imaging import decode_image, encode_png
from models.images.phantoms import phantom_pair
from tests.conftest import RecordingPipeline

ROOT = Path(__file__).resolve().parents[3]


def _settings(**kw) -> ServiceSettings:
    base = {"warmup": False, "max_wait_ms": 5}
    base.update(kw)
    return ServiceSettings(**base)


@pytest.fixture(scope="module")
def client(tiny_pipeline):
    with TestClient(create_app(_settings(max_pixels=300 * 300, max_upload_bytes=2_000_000), tiny_pipeline)) as c:
        yield c


@pytest.fixture(scope="module")
def pet_bytes():
    m, f = phantom_pair("pet", 64, 80, seed=11)
    return encode_png(m), encode_png(f)


@pytest.fixture(scope="module")
def ct_bytes():
    m, f = phantom_pair("ct", 48, 48, seed=12)
    return encode_png(m), encode_png(f)


def _files(mri: bytes, functional: bytes) -> dict:
    return {"mri": ("a.png", mri, "image/png"), "functional": ("b.png", functional, "image/png")}


def _error(resp: httpx.Response, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"] == code, body
    assert body["detail"]
    return body


# ---------------------------------------------------------------------------------------------- success paths
def test_fuse_pet_returns_colour_png_with_provenance(client, pet_bytes):
    r = client.post("/fuse", files=_files(*pet_bytes), data={"modality": "pet"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    for h in ("x-model-version", "x-weights-sha256", "x-queue-ms", "x-inference-ms", "x-request-id"):
        assert r.headers[h]
    img = Image.open(io.BytesIO(r.content))
    assert img.mode == "RGB" and img.size == (80, 64)
    assert "not for primary diagnosis" in img.info["Comment"]


def test_fuse_is_deterministic(client, pet_bytes):
    a = client.post("/fuse", files=_files(*pet_bytes)).content
    b = client.post("/fuse", files=_files(*pet_bytes)).content
    assert a == b


def test_fuse_ct_16_bit_gray(client, ct_bytes):
    r = client.post("/fuse", files=_files(*ct_bytes), data={"bit_depth": "16"})
    assert r.status_code == 200, r.text
    img = decode_image(r.content)
    assert img.bit_depth == 16 and img.pixels.ndim == 2 and r.headers["x-modality"] == "ct"


def test_json_base64_matches_multipart(client, pet_bytes):
    multipart = client.post("/fuse", files=_files(*pet_bytes)).content
    body = {"mri": base64.b64encode(pet_bytes[0]).decode(), "functional": base64.b64encode(pet_bytes[1]).decode()}
    r = client.post("/fuse/json", json=body)
    assert r.status_code == 200 and r.content == multipart


def test_batch_zip_reports_each_pair(client, pet_bytes, ct_bytes):
    files = [("mri", ("0.png", pet_bytes[0])), ("functional", ("0.png", pet_bytes[1])),
             ("mri", ("1.png", b"not an image")), ("functional", ("1.png", pet_bytes[1])),
             ("mri", ("2.png", ct_bytes[0])), ("functional", ("2.png", ct_bytes[1]))]
    r = client.post("/fuse/batch", files=files)
    assert r.status_code == 200, r.text
    assert (r.headers["x-pairs-ok"], r.headers["x-pairs-failed"]) == ("2", "1")
    zf = zipfile.ZipFile(io.BytesIO(r.content))
    assert sorted(zf.namelist()) == ["000.png", "002.png", "manifest.json"]
    manifest = json.loads(zf.read("manifest.json"))["pairs"]
    assert [e["status"] for e in manifest] == [200, 415, 200]
    assert manifest[1]["error"] == "not_an_image"
    single = client.post("/fuse", files=_files(*pet_bytes)).content
    assert zf.read("000.png") == single


def test_resize_on_request(client):
    m, _ = phantom_pair("ct", 64, 64, seed=1)
    _, f = phantom_pair("ct", 32, 32, seed=1)
    r = client.post("/fuse", files=_files(encode_png(m), encode_png(f)), data={"resize": "true"})
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (64, 64)


@pytest.mark.slow
def test_small_pairs_are_coded_on_the_event_loop_and_large_ones_off_it(tiny_pipeline, monkeypatch):
    """Two threadpool hops cost more CPU than decoding and encoding a 256 px pair; a large pair must still leave
    the event loop free (every other connection waits on it)."""
    import asyncio

    import app.http.pair_flow as flow
    from models.images.imaging import ImageHeader

    where: list[tuple[str, bool]] = []

    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
            return True
        except RuntimeError:
            return False

    real_decode, real_encode = flow.decode_pair, flow.encode_png

    def decode(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        where.append(("decode", on_loop()))
        return real_decode(*args, **kw)

    def encode(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        where.append(("encode", on_loop()))
        return real_encode(*args, **kw)

    monkeypatch.setattr(flow, "decode_pair", decode)
    monkeypatch.setattr(flow, "encode_png", encode)
    side = 1024  # a gray pair above the limit (two 512 px colour images)
    assert flow.pair_cost(ImageHeader(side, side, 1), ImageHeader(side, side, 1)) > flow.INLINE_MAX_COST
    with TestClient(create_app(_settings(), tiny_pipeline)) as c:
        for size, inline in ((64, True), (side, False)):
            where.clear()
            m, f = phantom_pair("ct", size, size, seed=3)
            r = c.post("/fuse", files=_files(encode_png(m), encode_png(f)))
            assert r.status_code == 200, r.text
            assert where == [("decode", inline), ("encode", inline)], (size, where)


# ---------------------------------------------------------------------------------------------- error paths
def test_missing_part(client, pet_bytes):
    r = client.post("/fuse", files={"mri": ("a.png", pet_bytes[0], "image/png")})
    body = _error(r, 422, "invalid_request")
    assert any(d["field"] == "functional" for d in body["detail"])


def test_empty_part(client, pet_bytes):
    _error(client.post("/fuse", files=_files(b"", pet_bytes[1])), 422, "empty_file")


def test_not_an_image(client, pet_bytes):
    _error(client.post("/fuse", files=_files(b"%PDF-1.4 hello", pet_bytes[1])), 415, "not_an_image")


def test_corrupt_png(client, pet_bytes):
    _error(client.post("/fuse", files=_files(pet_bytes[0][:200], pet_bytes[1])), 422, "corrupt_image")


def test_size_mismatch(client, pet_bytes, ct_bytes):
    body = _error(client.post("/fuse", files=_files(pet_bytes[0], ct_bytes[1])), 422, "size_mismatch")
    assert "resize" in body["detail"]


def test_bad_modality_and_bit_depth(client, pet_bytes):
    _error(client.post("/fuse", files=_files(*pet_bytes), data={"modality": "xray"}), 422, "invalid_request")
    _error(client.post("/fuse", files=_files(*pet_bytes), data={"bit_depth": "12"}), 422, "bad_bit_depth")
    _error(client.post("/fuse", files=_files(*pet_bytes), data={"bit_depth": "16"}), 422, "unsupported_output")


def test_a_colour_result_at_16_bits_is_refused_before_fusing(tiny_pipeline, pet_bytes):
    from tests.conftest import RecordingPipeline

    rec = RecordingPipeline(tiny_pipeline)
    with TestClient(create_app(_settings(), rec)) as c:
        r = c.post("/fuse", files=_files(*pet_bytes), data={"bit_depth": "16"})
        assert r.status_code == 422 and r.json()["error"] == "unsupported_output" and "bit_depth 8" in r.text
        z = c.post("/fuse/batch", files=[("mri", ("m.png", pet_bytes[0])), ("functional", ("f.png", pet_bytes[1]))],
                   data={"bit_depth": "16"})
        assert z.status_code == 200
        with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
            (entry,) = json.loads(zf.read("manifest.json"))["pairs"]
        assert entry["status"] == 422 and entry["error"] == "unsupported_output"
    assert rec.batches == []  # nothing reached the model


def test_unsupported_pixel_format(client, pet_bytes):
    buf = io.BytesIO()
    Image.fromarray(np.ones((64, 80), np.float32)).save(buf, format="TIFF")  # 32-bit float
    _error(client.post("/fuse", files=_files(buf.getvalue(), pet_bytes[1])), 422, "unsupported_mode")


def test_pixel_limit(client):
    big = encode_png(np.zeros((400, 400), np.float32))  # 160k pixels > 90k limit, tiny file
    _error(client.post("/fuse", files=_files(big, big)), 413, "image_too_large")


def test_body_limit_by_content_length(client):
    blob = os.urandom(2_100_000)
    _error(client.post("/fuse", files=_files(blob, b"x")), 413, "payload_too_large")


def test_body_limit_while_streaming(client):
    sent = {"bytes": 0}

    def body():  # chunked: no Content-Length, so the limit must be enforced while reading
        for _ in range(100):
            sent["bytes"] += 100_000
            yield b"\0" * 100_000

    r = client.post("/fuse", content=body(), headers={"content-type": "multipart/form-data; boundary=x"})
    _error(r, 413, "payload_too_large")


def test_bad_base64(client):
    _error(client.post("/fuse/json", json={"mri": "@@@", "functional": "AAAA"}), 422, "bad_base64")


def test_batch_count_mismatch(client, pet_bytes):
    files = [("mri", ("0.png", pet_bytes[0])), ("functional", ("0.png", pet_bytes[1])),
             ("mri", ("1.png", pet_bytes[0]))]
    _error(client.post("/fuse/batch", files=files), 422, "count_mismatch")


def test_unknown_route_is_json(client):
    _error(client.get("/nope"), 404, "not_found")


# ---------------------------------------------------------------------------------------------- operations
def test_health_ready_version_metrics(client, pet_bytes):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    v = client.get("/version").json()
    assert v["model"]["config"] == "tiny" and v["model"]["random_init"] is True
    client.post("/fuse", files=_files(*pet_bytes))
    text = client.get("/metrics").text
    for name in ("dmfnet_requests_total", "dmfnet_request_seconds_bucket", "dmfnet_batch_size_bucket",
                 "dmfnet_queue_wait_seconds", "dmfnet_inference_seconds", "dmfnet_queue_depth",
                 'dmfnet_images_fused_total{modality="pet"}', "dmfnet_model_info", "dmfnet_ready 1.0"):
        assert name in text, name


def test_request_id_is_echoed_or_generated(client):
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = client.get("/healthz", headers={"X-Request-ID": "bad id\n"}).headers["x-request-id"]
    assert len(generated) == 32


def test_api_key(tiny_pipeline, pet_bytes):
    key = "k" * 24
    with TestClient(create_app(_settings(api_key=key), tiny_pipeline)) as c:
        _error(c.post("/fuse", files=_files(*pet_bytes)), 401, "unauthorized")
        _error(c.post("/fuse", files=_files(*pet_bytes), headers={"X-API-Key": "wrong"}), 401, "unauthorized")
        assert c.post("/fuse", files=_files(*pet_bytes), headers={"X-API-Key": key}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == 200
    with TestClient(create_app(_settings(api_key=key, metrics_require_key=True), tiny_pipeline)) as c:
        assert c.get("/metrics").status_code == 401


def test_overload_returns_503_with_retry_after(tiny_pipeline, pet_bytes):
    slow = RecordingPipeline(tiny_pipeline, delay_s=0.5)
    with TestClient(create_app(_settings(max_batch_size=1, queue_size=1, max_wait_ms=0), slow)) as c:
        results = []

        def post():
            results.append(c.post("/fuse", files=_files(*pet_bytes)))

        threads = [threading.Thread(target=post) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    codes = sorted(r.status_code for r in results)
    assert 200 in codes and 503 in codes
    refused = next(r for r in results if r.status_code == 503)
    assert refused.json()["error"] == "queue_full" and int(refused.headers["retry-after"]) >= 1


def test_deadline_returns_504(tiny_pipeline, pet_bytes):
    slow = RecordingPipeline(tiny_pipeline, delay_s=0.6)
    settings = _settings(max_batch_size=1, max_wait_ms=0, request_timeout_s=0.2)
    with TestClient(create_app(settings, slow)) as c:
        results = []
        threads = [threading.Thread(target=lambda: results.append(c.post("/fuse", files=_files(*pet_bytes))))
                   for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert any(r.status_code == 504 and r.json()["error"] == "deadline_exceeded" for r in results)
    assert len(slow.batches) < 3  # expired pairs were never computed


def test_load_warm_up_and_requests_share_the_model_thread(tiny_pipeline, pet_bytes, monkeypatch):
    rec = RecordingPipeline(tiny_pipeline)
    loaded_on: list[str] = []

    def fake_open(*args, **kw):
        loaded_on.append(threading.current_thread().name)
        return rec

    monkeypatch.setattr("models.inference.weights.open_pipeline", fake_open)
    with TestClient(create_app(_settings(warmup=True, model_process=False))) as c:
        assert rec.batches  # warm-up batch ran during start-up
        assert c.get("/version").json()["startup_s"] is not None
        assert c.post("/fuse", files=_files(*pet_bytes)).status_code == 200
    # One thread does all torch work (a second OpenMP pool in the process slows the model ~10% on CPU).
    assert len(rec.threads) == 3 and set(rec.threads) == set(loaded_on)  # warm-up twice (one timed), one request
    assert loaded_on[0] != threading.main_thread().name


def test_bad_configuration_fails_at_start(capsys, monkeypatch):
    monkeypatch.setenv("DMFNET_MAX_BATCH_SIZE", "0")
    assert cli_main(["serve", "--weights", "random:tiny"]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    monkeypatch.delenv("DMFNET_MAX_BATCH_SIZE")
    with pytest.raises(ValueError, match="api_key"):
        ServiceSettings(api_key="short")


# ---------------------------------------------------------------------------------------------- real server
@pytest.mark.system
def _wait_for_metric(url: str, name: str, value: float, timeout_s: float) -> bool:
    """Poll a Prometheus endpoint until the unlabelled sample ``name`` equals ``value``."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        text = httpx.get(url, timeout=5).text
        if any(line.split()[:2] == [name, repr(value)] for line in text.splitlines()):
            return True
        time.sleep(0.02)
    return False


def test_real_server_sigterm_finishes_in_flight_requests(pet_bytes):
    """uvicorn subprocess: SIGTERM while requests are being fused -> they complete, then a clean exit."""
    port = free_port()
    # A 2 s collecting window holds the four pairs before the model; SIGTERM goes once all four are accepted
    # (a fixed sleep raced a busy CI machine: a request not yet arrived is rightly refused 503 shutting_down).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DMFNET_MAX_WAIT_MS": "2000", "DMFNET_SHUTDOWN_GRACE_S": "30"}
    proc = subprocess.Popen([sys.executable, "-m", "dmfnet", "serve", "--weights", "random:tiny", "--port",
                             str(port), "--log-json"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        if not wait_for_http(f"{base}/readyz", timeout_s=120):  # generous: CI machines can be busy
            pytest.fail("server did not become ready")
        results = []

        def post():
            with httpx.Client(timeout=180) as c:
                results.append(c.post(f"{base}/fuse", files=_files(*pet_bytes)))

        threads = [threading.Thread(target=post) for _ in range(4)]
        for t in threads:
            t.start()
        assert _wait_for_metric(f"{base}/metrics", "dmfnet_pairs_in_flight", 4.0, timeout_s=60)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        # uvicorn re-raises the captured SIGTERM after its graceful shutdown: "killed by SIGTERM" is the clean exit.
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [r.status_code for r in results] == [200] * 4
    logs = proc.stderr.read()
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert any(entry["msg"] == "ready" for entry in lines)
    assert not any("png" in json.dumps(entry).lower() and "a.png" in json.dumps(entry) for entry in lines)


def test_api_key_from_file(tmp_path):
    f = tmp_path / "key"
    f.write_text("s3cret-key-from-a-file\n")
    assert ServiceSettings(api_key_file=f).api_key.get_secret_value() == "s3cret-key-from-a-file"
    with pytest.raises(ValueError, match="api_key_file"):
        ServiceSettings(api_key_file=tmp_path / "missing")


def test_concurrent_clients_are_batched_and_get_their_own_result(tiny_pipeline):
    """Distinct pairs from concurrent clients: batch-size metric > 1, each answer is that client's fusion."""
    from models.images.pair_input import prepare_pair

    def fused_8bit(m, f) -> np.ndarray:
        inp = prepare_pair(decode_image(encode_png(m)), decode_image(encode_png(f)))
        return np.round(tiny_pipeline.fuse([inp])[0].pixels * 255)

    pairs = [phantom_pair("pet", 64, 64, seed=40 + i) for i in range(6)]
    with TestClient(create_app(_settings(max_wait_ms=300, max_batch_size=8), tiny_pipeline)) as c:
        results: dict[int, httpx.Response] = {}

        def post(i: int) -> None:
            m, f = pairs[i]
            results[i] = c.post("/fuse", files=_files(encode_png(m), encode_png(f)))

        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(pairs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        metrics = c.get("/metrics").text
    count = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("dmfnet_batch_size_count")))
    total = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("dmfnet_batch_size_sum")))
    assert total / count > 1  # requests really shared batches
    assert max(int(r.headers["x-batch-size"]) for r in results.values()) > 1
    for i, (m, f) in enumerate(pairs):
        assert results[i].status_code == 200
        # Same as the CLI path (pipeline on the decoded 8-bit inputs), within one grey level ...
        got = np.asarray(Image.open(io.BytesIO(results[i].content)), dtype=np.float64)
        assert np.abs(got - fused_8bit(m, f)).max() <= 1, i
        # ... and not a neighbour's image.
        j = (i + 1) % len(pairs)
        assert np.abs(got - fused_8bit(*pairs[j])).max() > 1


def test_two_tiers_served_and_picked_per_request(pet_bytes):
    """DMFNET_WEIGHTS=a,b serves both: requests pick with `tier` (default: the first); unknown tiers are 422."""
    settings = _settings(weights="random:tiny,random:fast")
    with TestClient(create_app(settings)) as c:
        tiers = c.get("/version").json()["tiers"]
        assert tiers == {"random:tiny": "dmfnet-tiny", "random:fast": "dmfnet-fast"}
        assert "dmfnet-tiny" in c.post("/fuse", files=_files(*pet_bytes)).headers["x-model-version"]
        fast = c.post("/fuse", files=_files(*pet_bytes), data={"tier": "random:fast"})
        assert fast.status_code == 200 and "dmfnet-fast" in fast.headers["x-model-version"]
        _error(c.post("/fuse", files=_files(*pet_bytes), data={"tier": "paper"}), 422, "unknown_tier")
        m, f = (base64.b64encode(b).decode() for b in pet_bytes)
        j = c.post("/fuse/json", json={"mri": m, "functional": f, "tier": "random:fast"})
        assert j.status_code == 200 and "dmfnet-fast" in j.headers["x-model-version"]
        z = c.post("/fuse/batch", files=[("mri", ("m.png", pet_bytes[0])), ("functional", ("f.png", pet_bytes[1]))],
                   data={"tier": "random:fast"})
        with zipfile.ZipFile(io.BytesIO(z.content)) as zf:
            assert b"dmfnet-fast" in zf.read("000.png")  # the PNG's provenance names the tier that fused it
