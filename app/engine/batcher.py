"""Dynamic batching: one worker thread owns the model; concurrent requests are fused together.

Requests enter a bounded queue. The batching task waits for the first job, then for up to
``max_wait_ms`` more (or until ``max_batch_size`` jobs are in hand), and hands the batch to the model thread.
A job's deadline runs from the request's arrival and covers the queue and the compute: the submitter answers
504 at the deadline itself (queued or running), and the pipeline asks between UNet chunks and tiles whether
each pair is still wanted, so work whose deadline passed or whose client went away is stopped or never
started. The engine measures seconds per pixel on every batch, so it can say how long new work would wait
(readiness and Retry-After use that estimate).
Pairs of different sizes share a batch: the pipeline buckets them by padded size (multiples of the UNet's 16 px),
pads by reflection and crops back, so a pair's output does not depend on its batch-mates. If a whole batch
fails, its pairs are retried one by one so that one bad pair fails only its own request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.engine.memory import release_free_memory
from app.engine.outcomes import DeadlineExceeded, QueueFull, ShuttingDown, failure, is_out_of_memory
from models.images.pair_input import FusionResult, PairInput

if TYPE_CHECKING:
    from models.inference.fuser import Fuser

log = logging.getLogger("dmfnet.batcher")


STALL_FACTOR = 4.0  # a batch this many times slower than measured (plus the margin) has stalled
STALL_MARGIN_S = 5.0  # ... with this much slack for a slow first batch or a busy machine


@dataclass
class Timing:
    """Where a job's time went (milliseconds)."""

    queue_ms: float = 0.0
    inference_ms: float = 0.0
    batch_size: int = 0


@dataclass(eq=False)  # compared by identity: its fields hold numpy arrays
class _Job:
    pair: PairInput
    future: asyncio.Future
    deadline: float
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def pixels(self) -> int:
        return self.pair.size[0] * self.pair.size[1]


class BatchObserver:
    """Hooks for metrics; the default does nothing."""

    def queue_depth(self, depth: int) -> None:  # noqa: D102
        pass

    def batch(self, size: int, inference_s: float) -> None:  # noqa: D102
        pass

    def queue_wait(self, seconds: float) -> None:  # noqa: D102
        pass

    def expired(self) -> None:  # noqa: D102
        pass

    def in_flight(self, pairs: int) -> None:  # noqa: D102
        pass


def new_model_thread() -> ThreadPoolExecutor:
    """The one thread that runs all torch work of the service: loading, warm-up and every batch (with the
    model process, app/engine/model_process.py, the thread that hands batches to it and waits).

    Why one: each thread that runs a parallel torch op gets its own OpenMP thread pool, and once a process
    holds more OpenMP threads than CPUs, libgomp stops spinning between parallel regions and sleeps
    instead. Measured on 2 cores: a second live pool raised context switches from ~140 to ~5,300 per
    256x256 pair and slowed the model ~10% (the server loaded the model on another thread before).
    """
    return ThreadPoolExecutor(1, thread_name_prefix="dmfnet-model")


class BatchEngine:
    """Bounded queue + batching task + single model thread. Use ``start``/``submit``/``stop`` on one loop."""

    def __init__(
        self,
        pipeline: Fuser,
        max_batch_size: int = 8,
        max_wait_ms: float = 10.0,
        queue_size: int = 64,
        observer: BatchObserver | None = None,
        model_thread: ThreadPoolExecutor | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.queue_size = queue_size
        self.observer = observer or BatchObserver()
        self._queue: asyncio.Queue[_Job] | None = None
        self._closing: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._executor = model_thread or new_model_thread()
        self._accepting = False
        self._busy_since: float | None = None
        self._collecting: list[_Job] = []
        self._running: list[_Job] = []
        self._queued_pixels = 0
        self._in_flight = 0  # pairs accepted and not yet answered: queued, collecting or on the model
        self._s_per_pixel = 1e-6  # measured on every batch (calibrate() sets it from the warm-up)
        self._measured = False  # the first measurement replaces the guess instead of averaging with it

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Create the queue and the batching task on the running loop."""
        self._queue = asyncio.Queue(self.queue_size)
        self._closing = asyncio.get_running_loop().create_future()  # set by drain(): stop waiting for company
        self._task = asyncio.get_running_loop().create_task(self._run(), name="dmfnet-batcher")
        self._accepting = True

    async def run_on_model_thread(self, fn, *args):  # noqa: ANN001, ANN201 - any callable, its result
        """Run ``fn(*args)`` on the model thread (see :func:`new_model_thread`), e.g. the warm-up."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet handed to the model)."""
        return self._queue.qsize() if self._queue else 0

    @property
    def saturated(self) -> bool:
        """True when the queue is full (readiness reports not-ready)."""
        return self._queue is not None and self._queue.full()

    @property
    def batch_age_s(self) -> float:
        """How long the batch now on the model thread has held it (0 when idle)."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def started(self) -> bool:
        """True once :meth:`start` ran (it stays True through shutdown)."""
        return self._queue is not None

    @property
    def accepting(self) -> bool:
        """False before start and once shutdown began."""
        return self._accepting

    def calibrate(self, seconds: float, pixels: int) -> None:
        """Seed the per-pixel cost (from the warm-up) before the first real batch measures it."""
        if pixels > 0 and seconds > 0:
            self._s_per_pixel, self._measured = seconds / pixels, True

    def stalled(self, stall_after_s: float) -> bool:
        """The batch on the model has held it for ``stall_after_s``, or for STALL_FACTOR times what its pixels
        should take plus STALL_MARGIN_S (a frozen or hung model process shows within seconds, not minutes)."""
        age = self.batch_age_s
        if age <= 0:
            return False
        expected = sum(j.pixels for j in self._running) * self._s_per_pixel
        return age > stall_after_s or age > STALL_FACTOR * expected + STALL_MARGIN_S

    def estimated_wait_s(self) -> float:
        """Seconds until new work would start: what the running batch has left plus everything queued, at the
        measured seconds per pixel."""
        running = sum(j.pixels for j in self._running) * self._s_per_pixel - self.batch_age_s
        running_ids = {id(j) for j in self._running}
        gathering = sum(j.pixels for j in self._collecting if id(j) not in running_ids and not j.future.done())
        return max(0.0, running) + (self._queued_pixels + gathering) * self._s_per_pixel

    async def drain(self, grace_s: float) -> int:
        """Stop accepting; give queued and running work up to ``grace_s``; then answer every pair still
        waiting or running with ShuttingDown (the model thread drops them at its next check). Returns how many."""
        self._accepting = False
        if self._queue is None:
            return 0
        if self._closing is not None and not self._closing.done():
            self._closing.set_result(None)
        deadline = time.monotonic() + grace_s
        # _collecting holds the batch from its first pair until it is answered: collecting or on the model.
        while (self._queue.qsize() or self._collecting) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        unfinished = [*self._collecting, *self._running]
        while not self._queue.empty():
            unfinished.append(self._queue.get_nowait())
        self._queued_pixels = 0
        failed = 0
        for job in unfinished:
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the service shut down before this pair was fused"))
                failed += 1
        return failed

    async def stop(self, grace_s: float) -> int:
        """:meth:`drain`, then wait for the model thread to leave its current chunk and end the batching task."""
        failed = await self.drain(grace_s)
        while self._busy_since is not None:  # stops at its next chunk: every pair of the batch is answered
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False)
        return failed

    # ------------------------------------------------------------------ requests
    async def submit(self, pair: PairInput, deadline: float) -> tuple[FusionResult, Timing]:
        """Queue one pair and wait for its fused result (raises QueueFull, ShuttingDown, DeadlineExceeded).

        ``deadline`` is a ``time.monotonic()`` instant. Cancelling the caller abandons the job: the model
        thread stops working on it at its next check.
        """
        results = await self.submit_many([pair], deadline)
        outcome = results[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def submit_many(
        self, pairs: list[PairInput], deadline: float
    ) -> list[tuple[FusionResult, Timing] | BaseException]:
        """Queue several pairs at once (all or none: QueueFull if they do not all fit); per-pair outcomes."""
        if not self._accepting or self._queue is None:
            raise ShuttingDown("service is shutting down")
        free = self.queue_size - self._queue.qsize()
        if len(pairs) > free:
            raise QueueFull(self.retry_after())
        loop = asyncio.get_running_loop()
        jobs = [_Job(p, loop.create_future(), deadline) for p in pairs]
        for job in jobs:
            self._queue.put_nowait(job)
            self._queued_pixels += job.pixels
        self.observer.queue_depth(self._queue.qsize())
        self._in_flight += len(jobs)
        self.observer.in_flight(self._in_flight)
        futures = [j.future for j in jobs]
        try:
            await asyncio.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:  # the caller gave up (client gone): the model thread skips these
            for fut in futures:
                fut.cancel()
            raise
        finally:
            self._in_flight -= len(jobs)
            self.observer.in_flight(self._in_flight)
        for fut in futures:  # the deadline passed first: answer now, queued or running (the model drops it)
            if not fut.done():
                fut.set_exception(DeadlineExceeded("request deadline passed before this pair was fused"))
                self.observer.expired()
        return [f.exception() or f.result() for f in futures]

    def retry_after(self) -> int:
        """Seconds until new work would start (the estimated wait, at least 1)."""
        return max(1, math.ceil(self.estimated_wait_s()))

    # ------------------------------------------------------------------ batching loop
    async def _collect(self) -> list[_Job]:
        assert self._queue is not None
        first = await self._queue.get()
        self._queued_pixels -= first.pixels
        batch = self._collecting = [first]
        until = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            # What is queued already is taken without yielding: wait_for() runs its own task, so each await
            # cost a loop iteration, and every iteration ran whatever decodes and encodes were ready meanwhile
            # (at 32 clients the model process sat idle ~25% of the time between batches).
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = until - time.monotonic()
                if remaining <= 0:
                    break
                # Waits for the next pair, the window's end or a drain (no more pairs can come: go now).
                getter = asyncio.ensure_future(self._queue.get())
                assert self._closing is not None
                await asyncio.wait((getter, self._closing), timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()  # Queue.get leaves an item it was woken for in the queue when cancelled
                    break
                job = getter.result()
            self._queued_pixels -= job.pixels
            batch.append(job)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            self.observer.queue_depth(self.depth)
            now = time.monotonic()
            live = [job for job in batch if not job.future.done()]  # answered: deadline, client gone, shutdown
            for job in live:
                self.observer.queue_wait(now - job.enqueued)
            if not live:
                self._collecting = []
                continue
            t0 = self._busy_since = time.monotonic()
            self._running = live
            try:
                outcomes = await loop.run_in_executor(self._executor, self._fuse_isolated, live)
            except Exception as exc:  # executor gone (shutdown): fail this batch, keep the loop alive
                outcomes = [exc] * len(live)
            finally:
                self._busy_since, self._running = None, []
            elapsed = time.monotonic() - t0
            finished = sum(j.pixels for j, o in zip(live, outcomes, strict=True) if isinstance(o, FusionResult))
            if finished == sum(j.pixels for j in live):  # a batch cut short says nothing about the cost
                weight = 0.3 if self._measured else 1.0
                self._s_per_pixel = (1 - weight) * self._s_per_pixel + weight * elapsed / finished
                self._measured = True
            self.observer.batch(len(live), elapsed)
            for job, outcome in zip(live, outcomes, strict=True):
                if job.future.done():
                    continue
                if outcome is None:  # dropped mid-fusion: its deadline passed (or its client left, handled above)
                    job.future.set_exception(DeadlineExceeded("request deadline passed during fusion; work stopped"))
                    self.observer.expired()
                elif isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    timing = Timing((t0 - job.enqueued) * 1000, elapsed * 1000, len(live))
                    job.future.set_result((outcome, timing))
            # Drop this batch's jobs now: each holds its decoded pair and its result, and the memory budget has
            # already been handed back for them (measured: holding them to the next batch doubled the peak).
            del batch, live, outcomes, job
            self._collecting = []

    def _fuse_isolated(self, jobs: list[_Job]) -> list[FusionResult | BaseException | None]:
        """Runs on the model thread: the whole batch, or pair by pair if the batch fails.

        None marks a pair dropped because nobody wants it any more. ``future.done()`` is read from this
        thread: a single attribute read, safe under the GIL, and a stale answer only costs one more chunk.
        """
        def alive(i: int, offset: int = 0) -> bool:
            job = jobs[i + offset]
            return not job.future.done() and time.monotonic() < job.deadline

        pairs = [j.pair for j in jobs]
        try:
            return list(self.pipeline.fuse(pairs, alive))
        except Exception as exc:
            if is_out_of_memory(exc):
                _free_device_memory()
            if len(pairs) == 1:
                log.exception("fusion failed for a single pair")
                return [failure(exc)]
            log.warning("batch of %d failed; retrying pair by pair to isolate the failure", len(pairs))
        finally:
            release_free_memory(pairs)
        out: list[FusionResult | BaseException | None] = []
        for k, p in enumerate(pairs):
            try:
                out.extend(self.pipeline.fuse([p], lambda i, k=k: alive(i, k)))
            except Exception as exc:  # noqa: BLE001 - reported to that request only
                log.exception("fusion failed for one pair of a batch")
                if is_out_of_memory(exc):
                    _free_device_memory()
                out.append(failure(exc))
        return out


def _free_device_memory() -> None:
    """After a CUDA OOM: hand cached blocks back so the next batch starts clean."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
