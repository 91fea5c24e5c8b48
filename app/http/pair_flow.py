"""One pair from uploaded bytes to a fused PNG, for every fusion route: reserve its memory (from the headers),
decode off the event loop, queue it on the tier's engine, wait (watching the client), encode."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from app.engine.admission import MemoryBusy, NeverFits, Reservation, pair_cost
from app.engine.batcher import BatchEngine, Timing
from app.http.state import ApiError, ServiceState, engine_error, image_error, out_of_memory, pipeline_of, ready_engine
from models.images.imaging import ImageError, ImageHeader, OpenedImage, encode_png, open_image
from models.images.pair_input import FusionResult, PairInput, decode_pair

if TYPE_CHECKING:
    from models.inference.fuser import Fuser

# Pairs up to two 512 px colour images are decoded and encoded on the event loop itself (about 9 ms at 512 px on
# the 2-core EPYC): a threadpool round trip cost more CPU than the work at 256 px (two hops per pair, each a
# futex wake-up and anyio's bookkeeping: 6.2-7.2 ms of service CPU per 256 px pair with them, 4.8 without).
# Larger pairs still go to the threadpool so that one of them cannot stall every other connection; so do uploads
# of many bytes whatever their header says (the chunk walk, CRCs and inflate scale with the file, not the pixels:
# a 16 MB deflate bomb with a small header held the loop 48.5 s under the old decoder).
INLINE_MAX_COST = pair_cost(ImageHeader(512, 512, 3), ImageHeader(512, 512, 3))
INLINE_MAX_BYTES = 2 * 1024 * 1024  # two 512 px colour PNGs at their worst (incompressible) are ~1.6 MB


async def off_loop_if_large(cost: int, fn, *args, nbytes: int = 0):  # noqa: ANN001, ANN002, ANN201 - a call
    """``fn(*args)`` here for a small pair (cost from :func:`~app.engine.admission.pair_cost`, ``nbytes`` of upload),
    else in the threadpool."""
    if cost <= INLINE_MAX_COST and nbytes <= INLINE_MAX_BYTES:
        return fn(*args)
    return await run_in_threadpool(fn, *args)


async def decode_upload(state: ServiceState, mri: OpenedImage, functional: OpenedImage, modality: str | None,
                        resize: bool, cost: int) -> PairInput:
    """Decode and validate an opened pair (off the event loop when it is large: see ``INLINE_MAX_COST``)."""
    try:
        return await off_loop_if_large(cost, decode_pair, mri, functional, modality, resize,
                                       nbytes=mri.nbytes + functional.nbytes)
    except ImageError as exc:
        state.metrics.rejected.labels(exc.code).inc()
        raise image_error(exc) from None
    except MemoryError:
        raise out_of_memory(state) from None


async def open_upload(state: ServiceState, mri: bytes, functional: bytes) -> tuple[OpenedImage, OpenedImage]:
    """Both parts opened from their headers, with every check that needs no pixel (empty, format, metadata,
    pixel limit; a PNG's every chunk and CRC): what the memory reservation is sized from, then decoded without a
    second parse. Large uploads are opened in the threadpool (the walk scales with the bytes)."""
    for name, data in (("mri", mri), ("functional", functional)):
        if not data:
            raise ApiError(422, "empty_file", f"the {name} part is empty")
    try:
        return await off_loop_if_large(0, _open_both, state.settings.max_pixels, mri, functional,
                                       nbytes=len(mri) + len(functional))
    except ImageError as exc:
        state.metrics.rejected.labels(exc.code).inc()
        raise image_error(exc) from None


def _open_both(max_pixels: int, mri: bytes, functional: bytes) -> tuple[OpenedImage, OpenedImage]:
    return open_image(mri, max_pixels, "mri"), open_image(functional, max_pixels, "functional")


async def reserve(state: ServiceState, engine: BatchEngine, cost: int, wait_until: float | None) -> Reservation:
    """Reserve a pair's decoded size (:func:`~app.engine.admission.pair_cost` of its headers) before decoding.

    ``wait_until`` None: now or 503; else wait in line until then (the pairs of one /fuse/batch call)."""
    assert state.budget is not None
    try:
        if wait_until is None:
            return state.budget.try_reserve(cost)
        return await state.budget.reserve(cost, wait_until)
    except NeverFits as exc:
        state.metrics.rejected.labels("too_large_for_memory").inc()
        raise ApiError(413, "too_large_for_memory", str(exc)) from None
    except MemoryBusy as exc:
        state.metrics.rejected.labels("memory_busy").inc()
        raise ApiError(503, "memory_busy", f"the memory budget is taken by work in progress ({exc}); retry later",
                       {"Retry-After": str(engine.retry_after())}) from None


@dataclass
class PairRequest:
    """One pair as uploaded plus what the caller asked for."""

    mri: bytes
    functional: bytes
    modality: str | None
    resize: bool
    bit_depth: int
    tier: str | None


async def fuse_pair(state: ServiceState, request: Request | None, job: PairRequest, deadline: float,
                     wait_for_memory: bool) -> tuple[bytes, FusionResult, Timing]:
    """Reserve memory, decode, queue, wait, encode: one pair from bytes to PNG (every fusion route)."""
    engine = ready_engine(state, job.tier)
    mri, functional = await open_upload(state, job.mri, job.functional)
    held = await reserve(state, engine, pair_cost(mri.header, functional.header),
                         deadline if wait_for_memory else None)
    try:
        pair = check_output(await decode_upload(state, mri, functional, job.modality, job.resize, held.size),
                            job.bit_depth)
        result, timing = await fuse_one(state, engine, request, pair, deadline)
        del pair  # the result holds what is still needed
        png = await off_loop_if_large(held.size, encode_result, state, pipeline_of(state, job.tier), result,
                                      job.bit_depth)
        state.metrics.fused.labels(result.modality).inc()
        return png, result, timing
    finally:
        held.release()


async def fuse_one(state: ServiceState, engine: BatchEngine, request: Request | None, pair: PairInput,
                   deadline: float) -> tuple[FusionResult, Timing]:
    """Queue one pair on ``engine``; if the client disconnects meanwhile, abandon the job (the model thread drops
    it). ``request`` None: the caller watches the client itself (one watcher per connection)."""
    work = engine.submit_many([pair], deadline)
    outcomes = await (work if request is None else until_disconnect(request, work))
    if isinstance(outcomes, BaseException):
        raise engine_error(state, outcomes) from None
    if isinstance(outcomes[0], BaseException):
        raise engine_error(state, outcomes[0]) from None
    return outcomes[0]


async def until_disconnect(request: Request, work):  # noqa: ANN001, ANN202 - a coroutine and its result
    """Await ``work`` (an engine submission); cancel it when the client goes away.

    Returns the submission's result, or the exception it raised (QueueFull, ShuttingDown, ...). The disconnect is
    an event, not polled: a poll every 250 ms cost each waiting request a timer, a wait and a cancel scope per
    round (~0.1 ms of CPU per pair under load).
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            exc = task.exception()
            return exc if exc is not None else task.result()
        task.cancel()
        raise ApiError(499, "client_closed_request", "the client disconnected; work stopped")
    finally:
        for pending in (task, gone):
            if not pending.done():
                pending.cancel()


async def _client_gone(request: Request) -> None:
    """Return when the client disconnects. The body has been read, so the server's ``receive`` has nothing left
    to give but ``http.disconnect`` (when the connection closes); if it fails, never return."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # noqa: BLE001 - a watcher that cannot watch must not end the request
        await asyncio.Future()


def encode_result(state: ServiceState, pipe: Fuser, result: FusionResult, bit_depth: int) -> bytes:
    """The fused PNG with its provenance text (in the threadpool: CPU work)."""
    try:
        return encode_png(result.pixels, bit_depth, pipe.provenance(), state.settings.png_compress_level)
    except ImageError as exc:
        raise image_error(exc) from None
    except MemoryError:
        raise out_of_memory(state) from None


def result_headers(state: ServiceState, pipe: Fuser, result: FusionResult, timing: Timing) -> dict[str, str]:
    """Provenance and timing headers of a fused PNG."""
    return {
        "X-Model-Version": f"dmfnet {state.version} {pipe.model_name}",
        "X-Weights-SHA256": str(pipe.weights_sha256 or pipe.weights_path),
        "X-Modality": result.modality,
        "X-Queue-Ms": f"{timing.queue_ms:.1f}",
        "X-Inference-Ms": f"{timing.inference_ms:.1f}",
        "X-Batch-Size": str(timing.batch_size),
        "X-Derived-Image": "true; not for primary diagnosis",
    }


def check_output(pair: PairInput, bit_depth: int) -> PairInput:
    """A colour result cannot be 16-bit: known from the decoded input, so refused before any fusion work."""
    if bit_depth == 16 and pair.chroma is not None:
        raise ApiError(422, "unsupported_output", "16-bit output is available for gray results only; this pair's "
                       "functional image is colour (PET/SPECT), so its result is RGB: ask for bit_depth 8")
    return pair
