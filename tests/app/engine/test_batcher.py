"""Batching engine: batches form, results match unbatched fusion, overload, deadlines, isolation, shutdown."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.engine.batcher import BatchEngine
from app.engine.outcomes import DeadlineExceeded, QueueFull, ShuttingDown
from models.images.imaging import to_uint
from models.images.pair_input import prepare_pair
from models.images.phantoms import phantom_pair
from tests.conftest import RecordingPipeline, decoded
from tests.picture_compare import HUE_DEG, picture_differences


def _pairs(n: int, size: int = 48) -> list:
    out = []
    for i in range(n):
        m, f = phantom_pair("pet" if i % 2 else "ct", size, size + 8 * (i % 3), seed=i)
        out.append(prepare_pair(decoded(m), decoded(f), "pet" if i % 2 else "ct"))
    return out


def soon(seconds: float) -> float:
    """A deadline ``seconds`` from now."""
    return time.monotonic() + seconds


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_are_batched_and_match_unbatched(tiny_pipeline):
    rec = RecordingPipeline(tiny_pipeline)
    pairs = _pairs(6)

    async def main():
        engine = BatchEngine(rec, max_batch_size=8, max_wait_ms=200, queue_size=16)
        engine.start()
        results = await asyncio.gather(*(engine.submit(p, soon(30)) for p in pairs))
        await engine.stop(5)
        return results

    results = run(main())
    assert max(rec.batches) > 1  # grouped, although the pairs have three different sizes
    for pair, (res, timing) in zip(pairs, results):
        alone = tiny_pipeline.fuse([pair])[0]
        # Same noise and padding whatever the batch-mates; only the CPU kernels' summation order may
        # change with the batch size (float32 rounding), never more than 1 grey level of luminance at 8 bits;
        # colour compared as luminance and hue (tests/picture_compare.py).
        d = picture_differences(to_uint(res.pixels), to_uint(alone.pixels))
        assert d["y_max"] <= 2.0 and d["hue_max"] <= HUE_DEG, d
        assert 1 <= timing.batch_size <= 8


def test_max_batch_size_is_respected(tiny_pipeline):
    rec = RecordingPipeline(tiny_pipeline)

    async def main():
        engine = BatchEngine(rec, max_batch_size=2, max_wait_ms=100, queue_size=16)
        engine.start()
        await asyncio.gather(*(engine.submit(p, soon(30)) for p in _pairs(5)))
        await engine.stop(5)

    run(main())
    assert max(rec.batches) <= 2 and sum(rec.batches) == 5


def test_queue_full_is_refused_with_retry_after(tiny_pipeline):
    rec = RecordingPipeline(tiny_pipeline, delay_s=0.3)

    async def main():
        engine = BatchEngine(rec, max_batch_size=1, max_wait_ms=0, queue_size=2)
        engine.start()
        first = asyncio.ensure_future(engine.submit(_pairs(1)[0], soon(30)))
        await asyncio.to_thread(rec.started.wait, 5)  # the model is busy with the first pair
        queued = [asyncio.ensure_future(engine.submit(p, soon(30))) for p in _pairs(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as info:
            await engine.submit(_pairs(1)[0], soon(30))
        assert info.value.retry_after >= 1
        await asyncio.gather(first, *queued)
        await engine.stop(5)

    run(main())


def test_expired_work_is_not_computed(tiny_pipeline):
    rec = RecordingPipeline(tiny_pipeline, delay_s=0.4)

    async def main():
        engine = BatchEngine(rec, max_batch_size=1, max_wait_ms=0, queue_size=8)
        engine.start()
        slow = asyncio.ensure_future(engine.submit(_pairs(1)[0], soon(30)))
        await asyncio.to_thread(rec.started.wait, 5)
        with pytest.raises(DeadlineExceeded):
            await engine.submit(_pairs(1)[0], soon(0.05))  # waits behind a 0.4 s batch
        await slow
        await engine.stop(5)

    run(main())
    assert rec.batches == [1]  # the expired pair never reached the model


def test_one_bad_pair_fails_only_its_request(tiny_pipeline):
    rec = RecordingPipeline(tiny_pipeline)
    pairs = _pairs(4)
    rec.poison.add(id(pairs[2]))

    async def main():
        engine = BatchEngine(rec, max_batch_size=8, max_wait_ms=200, queue_size=8)
        engine.start()
        out = await asyncio.gather(*(engine.submit(p, soon(30)) for p in pairs), return_exceptions=True)
        await engine.stop(5)
        return out

    out = run(main())
    assert isinstance(out[2], RuntimeError)
    assert all(not isinstance(o, BaseException) for i, o in enumerate(out) if i != 2)


def test_shutdown_finishes_queued_work_within_grace_and_refuses_new(tiny_pipeline):
    rec = RecordingPipeline(tiny_pipeline, delay_s=0.05)

    async def main():
        engine = BatchEngine(rec, max_batch_size=1, max_wait_ms=0, queue_size=8)
        engine.start()
        futs = [asyncio.ensure_future(engine.submit(p, soon(30))) for p in _pairs(3)]
        await asyncio.sleep(0.01)
        failed = await engine.stop(grace_s=10)
        with pytest.raises(ShuttingDown):
            await engine.submit(_pairs(1)[0], soon(30))
        return failed, await asyncio.gather(*futs, return_exceptions=True)

    failed, results = run(main())
    assert failed == 0 and all(not isinstance(r, BaseException) for r in results)


def test_shutdown_fuses_pairs_waiting_in_the_collecting_window_and_ends_the_window(tiny_pipeline):
    """Pairs the collector holds while it waits for company are work in flight: a drain fuses them (once it
    answered them 503 at once: CI's SIGTERM test caught it) and does not wait out the 5 s window first."""
    async def main():
        engine = BatchEngine(tiny_pipeline, max_batch_size=8, max_wait_ms=5000, queue_size=8)
        engine.start()
        futs = [asyncio.ensure_future(engine.submit(p, soon(30))) for p in _pairs(3)]
        while engine.depth or len(engine._collecting) < 3:
            await asyncio.sleep(0.005)
        t0 = time.monotonic()
        failed = await engine.stop(grace_s=20)
        return failed, time.monotonic() - t0, await asyncio.gather(*futs, return_exceptions=True)

    failed, took_s, results = run(main())
    assert failed == 0 and all(not isinstance(r, BaseException) for r in results)
    assert [r[1].batch_size for r in results] == [3, 3, 3]  # one batch: the window closed, nothing split it
    assert took_s < 4  # the window's 5 s were not waited out


def test_shutdown_past_grace_fails_the_rest_clearly(tiny_pipeline):
    rec = RecordingPipeline(tiny_pipeline, delay_s=0.3)

    async def main():
        engine = BatchEngine(rec, max_batch_size=1, max_wait_ms=0, queue_size=8)
        engine.start()
        futs = [asyncio.ensure_future(engine.submit(p, soon(30))) for p in _pairs(4)]
        await asyncio.to_thread(rec.started.wait, 5)
        failed = await engine.stop(grace_s=0.0)
        return failed, await asyncio.gather(*futs, return_exceptions=True)

    failed, results = run(main())
    # the pair on the model is answered too (the model drops it at its next check): nobody waits past the grace
    assert failed == 4 and all(isinstance(r, ShuttingDown) for r in results)


def test_wait_estimate_while_a_batch_of_several_runs(tiny_pipeline):
    """The estimate reads the running batch and the one being gathered (a readiness probe mid-batch once
    raised: jobs were compared by value, numpy arrays and all)."""
    rec = RecordingPipeline(tiny_pipeline, delay_s=0.5)

    async def main():
        engine = BatchEngine(rec, max_batch_size=4, max_wait_ms=50, queue_size=16)
        engine.start()
        engine.calibrate(0.5, 4 * 32 * 32)
        futs = [asyncio.ensure_future(engine.submit(p, soon(30))) for p in _pairs(6)]
        await asyncio.to_thread(rec.started.wait, 5)
        during = engine.estimated_wait_s()
        await asyncio.gather(*futs)
        after = engine.estimated_wait_s()
        await engine.stop(5)
        return during, after

    during, after = run(main())
    assert during > 0 and after == 0


def test_a_full_batch_already_queued_goes_to_the_model_without_waiting_on_the_event_loop(tiny_pipeline):
    """Jobs waiting in the queue are taken at once: before, each one cost a loop iteration (wait_for's own task),
    and every iteration ran whatever decodes and encodes were ready, so the model sat idle between batches."""
    ticks = [0]
    seen_at_fuse: list[int] = []

    class CountingPipeline:
        def fuse(self, pairs, alive=None):  # noqa: ANN001, ANN201
            seen_at_fuse.append(ticks[0])
            return tiny_pipeline.fuse(pairs)

    async def main():
        loop = asyncio.get_running_loop()
        running = True

        def tick():  # one increment per event-loop iteration
            ticks[0] += 1
            if running:
                loop.call_soon(tick)

        engine = BatchEngine(CountingPipeline(), max_batch_size=8, max_wait_ms=500, queue_size=16)
        engine.start()
        await asyncio.sleep(0.05)  # the engine now waits on an empty queue
        loop.call_soon(tick)
        start = ticks[0]
        results = await engine.submit_many(_pairs(8, 32), soon(30))
        running = False
        await engine.stop(5)
        return start, results

    start, results = run(main())
    assert all(not isinstance(r, BaseException) for r in results)
    assert len(seen_at_fuse) == 1  # one batch of eight
    assert seen_at_fuse[0] - start <= 3, f"{seen_at_fuse[0] - start} loop iterations before the batch left"
