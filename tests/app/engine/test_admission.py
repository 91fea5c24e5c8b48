"""Admission by memory, deadlines that hold in the queue, wait estimates, allocation failures, duplicate JSON
keys: the service app with a real (tiny) pipeline slowed down where a test needs work in progress."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.engine.admission import MemoryBudget, MemoryBusy, NeverFits, pair_cost
from app.http.main import create_app
from app.settings import ServiceSettings
from models.images.colour import hot_colormap
from models.images.imaging import ImageHeader, encode_png
from tests.conftest import RecordingPipeline


def _settings(**kw) -> ServiceSettings:
    return ServiceSettings(**{"warmup": False, "max_wait_ms": 5, **kw})


def _pair(n: int) -> tuple[bytes, bytes]:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    return encode_png((xx + yy) / 2), encode_png(hot_colormap(xx))


def _files(m: bytes, f: bytes) -> dict:
    return {"mri": ("m.png", m, "image/png"), "functional": ("f.png", f, "image/png")}


def _in_thread(fn, *args, **kw) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        t0 = time.monotonic()
        out["r"] = fn(*args, **kw)
        out["s"] = time.monotonic() - t0

    t = threading.Thread(target=run)
    t.start()
    return t, out


# ------------------------------------------------------------------------------------------ deadlines
def test_a_queued_deadline_is_answered_at_the_deadline_not_when_the_model_frees(tiny_pipeline):
    rec = RecordingPipeline(tiny_pipeline, delay_s=4.0)
    with TestClient(create_app(_settings(max_batch_size=1), rec)) as c:
        long, _ = _in_thread(c.post, "/fuse", files=_files(*_pair(64)))
        assert rec.started.wait(10)
        t0 = time.monotonic()
        r = c.post("/fuse", files=_files(*_pair(64)), headers={"X-Request-Timeout": "1"})
        waited = time.monotonic() - t0
        long.join()
    assert r.status_code == 504 and r.json()["error"] == "deadline_exceeded"
    assert waited < 2.5  # the old engine answered when the model freed up (~4 s)
    assert rec.batches == [1]  # the expired pair was never computed


@pytest.mark.slow
def test_readiness_and_retry_after_follow_the_estimated_wait(tiny_pipeline):
    rec = RecordingPipeline(tiny_pipeline, delay_s=2.0)
    with TestClient(create_app(_settings(max_batch_size=1, ready_max_wait_s=2.5), rec)) as c:
        assert c.post("/fuse", files=_files(*_pair(64))).status_code == 200  # measures ~2 s per pair
        assert c.get("/readyz").json()["status"] == "ready"
        busy = [_in_thread(c.post, "/fuse", files=_files(*_pair(64)))[0] for _ in range(3)]
        time.sleep(0.5)
        ready = c.get("/readyz")
        for t in busy:
            t.join()
        after = c.get("/readyz")
    assert ready.status_code == 503 and ready.json()["status"] == "busy"
    assert ready.json()["estimated_wait_s"] > 2.5  # ~1.5 s left of the running pair + 2 queued x 2 s
    assert int(ready.headers["retry-after"]) >= 3
    assert after.status_code == 200 and after.json()["estimated_wait_s"] == 0


# ------------------------------------------------------------------------------------------ memory budget
def test_pair_cost_from_headers():
    gray, colour = ImageHeader(100, 100, 1), ImageHeader(100, 100, 3)
    assert pair_cost(gray, colour) > pair_cost(gray, gray) > 0
    assert pair_cost(ImageHeader(200, 200, 1), colour) > pair_cost(gray, colour)


def test_budget_grants_in_order_and_gives_back():
    import asyncio

    async def main():
        budget = MemoryBudget(100)
        a = budget.try_reserve(60)
        with pytest.raises(MemoryBusy):
            budget.try_reserve(50)
        with pytest.raises(NeverFits):
            budget.try_reserve(101)
        waiter = asyncio.ensure_future(budget.reserve(50, time.monotonic() + 5))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        a.release()
        a.release()  # idempotent
        b = await waiter
        with pytest.raises(MemoryBusy):  # a deadline passes in line
            await budget.reserve(60, time.monotonic() + 0.05)
        b.release()
        return budget.used

    assert asyncio.run(main()) == 0


@pytest.mark.slow
def test_memory_budget_refuses_now_or_never_and_batches_wait_in_line(tiny_pipeline):
    fits, huge = _pair(300), _pair(700)  # ~5.8 MB and ~31 MB decoded against a 16 MB budget
    rec = RecordingPipeline(tiny_pipeline, delay_s=1.0)
    with TestClient(create_app(_settings(memory_budget_mb=16, max_batch_size=1), rec)) as c:
        never = c.post("/fuse", files=_files(*huge))
        holders = [_in_thread(c.post, "/fuse", files=_files(*fits))[0] for _ in range(2)]
        time.sleep(0.5)  # both hold ~11.5 MB: a third does not fit now
        busy = c.post("/fuse", files=_files(*fits))
        for t in holders:
            t.join()
        files = [("mri", ("m.png", fits[0])), ("functional", ("f.png", fits[1]))] * 3
        files += [("mri", ("m.png", huge[0])), ("functional", ("f.png", huge[1]))]
        batch = c.post("/fuse/batch", files=files)
        state = c.app.state.service
        used_after = state.budget.used
    assert never.status_code == 413 and never.json()["error"] == "too_large_for_memory"
    assert busy.status_code == 503 and busy.json()["error"] == "memory_busy" and int(busy.headers["retry-after"]) >= 1
    assert batch.status_code == 200
    manifest = json.loads(zipfile.ZipFile(io.BytesIO(batch.content)).read("manifest.json"))["pairs"]
    assert [p["status"] for p in manifest] == [200, 200, 200, 413]  # in line for memory, one never fits
    assert used_after == 0


def test_allocation_failures_are_503_per_pair_never_500(tiny_pipeline, monkeypatch):
    import models.images.pair_input

    real = models.images.pair_input.decode_pair
    calls = {"n": 0}

    def flaky(*a, **k):  # the second pair's decode cannot allocate (numpy's _ArrayMemoryError is a MemoryError)
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("Unable to allocate 256. MiB")
        return real(*a, **k)

    monkeypatch.setattr("app.http.pair_flow.decode_pair", flaky)
    m, f = _pair(64)
    with TestClient(create_app(_settings(), tiny_pipeline)) as c:
        files = [("mri", ("m.png", m)), ("functional", ("f.png", f))] * 3
        batch = c.post("/fuse/batch", files=files)
        calls["n"] = 1
        single = c.post("/fuse", files=_files(m, f))
    manifest = json.loads(zipfile.ZipFile(io.BytesIO(batch.content)).read("manifest.json"))["pairs"]
    assert sorted(p["status"] for p in manifest) == [200, 200, 503]
    assert [p.get("error") for p in manifest if p["status"] == 503] == ["out_of_memory"]
    assert single.status_code == 503 and single.json()["error"] == "out_of_memory" and "retry-after" in single.headers


# ------------------------------------------------------------------------------------------ JSON body
def test_duplicate_json_keys_are_refused(tiny_pipeline):
    m, f = (base64.b64encode(x).decode() for x in _pair(64))
    body = f'{{"mri": "{m}", "functional": "{f}", "modality": "pet", "modality": "ct"}}'
    with TestClient(create_app(_settings(), tiny_pipeline)) as c:
        dup = c.post("/fuse/json", content=body, headers={"content-type": "application/json"})
        ok = c.post("/fuse/json", json={"mri": m, "functional": f, "modality": "pet"})
    assert dup.status_code == 422 and dup.json()["error"] == "duplicate_field" and "modality" in dup.json()["detail"]
    assert ok.status_code == 200


def test_heap_is_trimmed_after_large_pairs_not_small_ones():
    """The HTTP process gives freed pages back once 256 MB of reservations were released (it sat at 2 GB idle
    after two 4096² batches): small pairs never trigger it, large ones do once, shortly after release."""
    import asyncio

    calls = []

    async def main():
        budget = MemoryBudget(1 << 40, trim=lambda: calls.append(time.monotonic()))
        for _ in range(100):  # 100 small pairs: 10 MB in all
            budget.try_reserve(100 << 10).release()
        await asyncio.sleep(2.3)
        small = len(calls)
        big = [budget.try_reserve(200 << 20) for _ in range(2)]
        for r in big:
            r.release()
        assert len(calls) == small  # not at once: the answers are still being written
        await asyncio.sleep(2.3)
        return small, len(calls)

    assert asyncio.run(main()) == (0, 1)


def test_default_budget_respects_an_address_space_limit():
    import resource
    import subprocess
    import sys

    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, resource.RLIM_INFINITY)); "
            "from app.engine.admission import default_budget_bytes, address_space_left; "
            "print(default_budget_bytes(0), address_space_left())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    budget, left = int(out[0]), int(out[1])
    assert 0 < left < 6 << 30 and budget <= left // 2 + 1
    assert resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY  # this process untouched


def test_freed_image_buffers_are_reused_not_mapped_again():
    """With the service's malloc settings a freed 40 MB buffer (above glibc's largest adaptive mmap threshold)
    is reused for the next one of its size: no new pages, where the default maps and faults in every one."""
    import subprocess
    import sys

    code = """
import resource, sys
import numpy as np
from app.engine.memory import keep_buffers_for_reuse
if sys.argv[1] == "tuned":
    assert keep_buffers_for_reuse()
for _ in range(2):
    np.ones(10 << 20, np.float32)  # 40 MB, freed at once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    np.ones(10 << 20, np.float32)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 20)
"""
    faults = {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                                       check=True, cwd=Path(__file__).resolve().parents[3]).stdout)
              for mode in ("default", "tuned")}
    # 40 MB is 10,240 pages of 4 kB (fewer faults with transparent huge pages: 532 seen); reused, none
    assert faults["default"] > 100 and faults["tuned"] < 10, faults
