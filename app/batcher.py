"""Dynamic batching: one worker thread owns the model; concurrent requests are fused together.

Requests enter a bounded queue. The batching task waits for the first job, then for up to
``max_wait_ms`` more (or until ``max_batch_size`` jobs are in hand), drops jobs whose deadline has
passed (they are never computed), and hands the batch to the model thread. A job's deadline runs from the
request's arrival and covers the queue and the compute: the pipeline asks between UNet chunks and tiles
whether each pair is still wanted, and stops work whose deadline passed or whose client went away.
Pairs of different sizes share a batch: the pipeline buckets them by padded size (multiples of the UNet's 16 px),
pads by reflection and crops back, so a pair's output does not depend on its batch-mates. If a whole batch
fails, its pairs are retried one by one so that one bad pair fails only its own request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from models.memory import release_free_memory
from models.pair_input import PairInput
from models.pipeline import Fuser, FusionResult

log = logging.getLogger("dmfnet.batcher")


class QueueFull(Exception):
    """The queue is at capacity: the client should retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full, retry after {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The engine is stopping and takes no new work (or could not finish this job in the grace period)."""


class OutOfMemory(Exception):
    """The device (or host) ran out of memory for this pair; the model thread stays alive for the next one."""


class DeadlineExceeded(Exception):
    """The job's deadline passed (in the queue or during fusion); its work was dropped."""


@dataclass
class Timing:
    """Where a job's time went (milliseconds)."""

    queue_ms: float = 0.0
    inference_ms: float = 0.0
    batch_size: int = 0


@dataclass
class _Job:
    pair: PairInput
    future: asyncio.Future
    deadline: float
    enqueued: float = field(default_factory=time.monotonic)


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


def new_model_thread() -> ThreadPoolExecutor:
    """The one thread that runs all torch work of the service: loading, warm-up and every batch.

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
        self._task: asyncio.Task | None = None
        self._executor = model_thread or new_model_thread()
        self._accepting = False
        self._busy_since: float | None = None
        self._collecting: list[_Job] = []
        self._recent_batch_s = 1.0  # for Retry-After estimates

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Create the queue and the batching task on the running loop."""
        self._queue = asyncio.Queue(self.queue_size)
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
    def accepting(self) -> bool:
        """False before start and once shutdown began."""
        return self._accepting

    async def stop(self, grace_s: float) -> int:
        """Stop accepting, let queued work finish for up to ``grace_s``, fail the rest; returns jobs failed."""
        self._accepting = False
        if self._queue is None:
            return 0
        deadline = time.monotonic() + grace_s
        while (self._queue.qsize() or self._busy_since is not None) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        failed = 0
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(ShuttingDown("service shut down before this pair was fused"))
                failed += 1
        while self._busy_since is not None:  # a batch on the model cannot be interrupted: let it deliver
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self._collecting:  # taken off the queue by a batch that was still gathering
            if not job.future.done():
                job.future.set_exception(ShuttingDown("service shut down before this pair was fused"))
                failed += 1
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
        self.observer.queue_depth(self._queue.qsize())
        return await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)

    def retry_after(self) -> int:
        """Seconds until the queue has probably drained enough to take new work."""
        batches_ahead = self.depth / self.max_batch_size + 1
        return max(1, round(batches_ahead * self._recent_batch_s))

    # ------------------------------------------------------------------ batching loop
    async def _collect(self) -> list[_Job]:
        assert self._queue is not None
        first = await self._queue.get()
        batch = self._collecting = [first]
        until = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            remaining = until - time.monotonic()
            try:
                batch.append(self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(
                    self._queue.get(), remaining))
            except (asyncio.QueueEmpty, TimeoutError):
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            self.observer.queue_depth(self.depth)
            now = time.monotonic()
            live = []
            for job in batch:
                if job.future.done():  # the client went away
                    continue
                if now > job.deadline:
                    job.future.set_exception(DeadlineExceeded("request deadline passed while queued"))
                    self.observer.expired()
                    continue
                self.observer.queue_wait(now - job.enqueued)
                live.append(job)
            if not live:
                continue
            t0 = self._busy_since = time.monotonic()
            try:
                outcomes = await loop.run_in_executor(self._executor, self._fuse_isolated, live)
            except Exception as exc:  # executor gone (shutdown): fail this batch, keep the loop alive
                outcomes = [exc] * len(live)
            finally:
                self._busy_since = None
            elapsed = time.monotonic() - t0
            self._recent_batch_s = 0.8 * self._recent_batch_s + 0.2 * elapsed
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
            if _is_oom(exc):
                _free_device_memory()
            if len(pairs) == 1:
                log.exception("fusion failed for a single pair")
                return [_failure(exc)]
            log.warning("batch of %d failed; retrying pair by pair to isolate the failure", len(pairs))
        finally:
            release_free_memory(pairs)
        out: list[FusionResult | BaseException | None] = []
        for k, p in enumerate(pairs):
            try:
                out.extend(self.pipeline.fuse([p], lambda i, k=k: alive(i, k)))
            except Exception as exc:  # noqa: BLE001 - reported to that request only
                log.exception("fusion failed for one pair of a batch")
                if _is_oom(exc):
                    _free_device_memory()
                out.append(_failure(exc))
        return out


def _is_oom(exc: BaseException) -> bool:
    """CUDA out-of-memory (torch.OutOfMemoryError) or a host MemoryError."""
    import torch

    return isinstance(exc, (torch.OutOfMemoryError, MemoryError))


def _failure(exc: BaseException) -> BaseException:
    """What the request is told: out of memory (retry later, 503) or a plain fusion failure (500)."""
    if _is_oom(exc):
        return OutOfMemory("not enough memory to fuse this pair now; retry later or send a smaller image")
    return RuntimeError(f"fusion failed: {type(exc).__name__}")


def _free_device_memory() -> None:
    """After a CUDA OOM: hand cached blocks back so the next batch starts clean."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
