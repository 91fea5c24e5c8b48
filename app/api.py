"""HTTP routes. Every error is JSON ``{"error": code, "detail": ...}``; images are never logged."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
import time
import zipfile
from dataclasses import dataclass, field
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, BeforeValidator, Field
from starlette.concurrency import run_in_threadpool

from app.admission import MemoryBudget, MemoryBusy, NeverFits, Reservation, pair_cost
from app.batcher import BatchEngine, DeadlineExceeded, OutOfMemory, QueueFull, ShuttingDown, Timing
from app.observability import ServiceMetrics
from app.settings import ServiceSettings
from models.imaging import ImageError, encode_png, peek_image
from models.pair_input import PairInput, decode_pair
from models.pipeline import Fuser, FusionResult

router = APIRouter()


@dataclass
class ServiceState:
    """What the routes need; created by the app factory, filled in by the lifespan."""

    settings: ServiceSettings
    metrics: ServiceMetrics
    pipeline: Fuser | None = None  # the default tier (the first of ``weights``)
    engine: BatchEngine | None = None
    tiers: dict[str, tuple[Fuser, BatchEngine]] = field(default_factory=dict)  # every tier served, by name
    budget: MemoryBudget | None = None  # decoded bytes all requests may hold (app/admission.py)
    ready: bool = False
    startup_s: float | None = None
    version: str = "0"


class ApiError(Exception):
    """An error response: status, stable code, human detail, optional headers."""

    def __init__(self, status: int, code: str, detail: object, headers: dict[str, str] | None = None) -> None:
        super().__init__(str(detail))
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}

    def body(self) -> dict:
        """The JSON error body every error response carries."""
        return {"error": self.code, "detail": self.detail}


ERRORS = {
    400: {"description": "malformed request"},
    401: {"description": "missing or wrong X-API-Key (when auth is on)"},
    413: {"description": "body, image bytes or pixel count over the limit, or a pair larger than the memory budget"},
    415: {"description": "not an image"},
    422: {"description": "corrupt image, empty part, size mismatch, bad modality/bit depth"},
    503: {"description": "queue full or memory budget taken (Retry-After), out of memory, not ready, shutting down"},
    504: {"description": "request deadline passed (in the queue or during fusion; the work was stopped)"},
}

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks whether its client is still there


# ImageError codes (models/) -> HTTP status; every other code is 422 (the request's content is wrong).
IMAGE_ERROR_STATUS = {"image_too_large": 413, "not_an_image": 415}


def image_error(exc: ImageError) -> ApiError:
    """The HTTP error for an input-image problem."""
    return ApiError(IMAGE_ERROR_STATUS.get(exc.code, 422), exc.code, exc.detail)


def _state(request: Request) -> ServiceState:
    return request.app.state.service


def request_deadline(request: Request, settings: ServiceSettings) -> float:
    """The request's deadline (``time.monotonic()``): arrival + ``request_timeout_s``, or sooner when the client
    sends ``X-Request-Timeout`` (seconds; capped by the server's limit)."""
    arrived = request.scope.get("state", {}).get("arrived", time.monotonic())
    timeout = settings.request_timeout_s
    header = request.headers.getlist("x-request-timeout")
    if header:
        try:
            asked = float(header[0]) if len(header) == 1 else float("nan")
        except ValueError:
            asked = float("nan")
        if not 0 < asked < float("inf"):
            raise ApiError(422, "bad_timeout", "X-Request-Timeout must be one positive number of seconds")
        timeout = min(timeout, asked)
    return arrived + timeout


async def _decode_pair(state: ServiceState, mri: bytes, functional: bytes, modality: str | None,
                       resize: bool) -> PairInput:
    """Decode and validate a pair off the event loop (decoding big images is CPU work)."""
    def work() -> PairInput:
        limit = state.settings.max_pixels
        return decode_pair(mri, functional, modality, resize, limit)

    try:
        return await run_in_threadpool(work)
    except ImageError as exc:
        state.metrics.rejected.labels(exc.code).inc()
        raise image_error(exc) from None
    except MemoryError:
        raise out_of_memory(state) from None


def out_of_memory(state: ServiceState) -> ApiError:
    """An allocation failed (decode, fusion or encoding): this pair is answered 503, the service goes on."""
    state.metrics.rejected.labels("out_of_memory").inc()
    return ApiError(503, "out_of_memory", "not enough memory to fuse this pair now; retry later or send a "
                    "smaller image", {"Retry-After": "10"})


async def _reserve(state: ServiceState, engine: BatchEngine, mri: bytes, functional: bytes,
                   wait_until: float | None) -> Reservation:
    """Reserve the pair's decoded size before decoding (from the headers: the same checks as decoding).

    ``wait_until`` None: now or 503; else wait in line until then (the pairs of one /fuse/batch call)."""
    for name, data in (("mri", mri), ("functional", functional)):
        if not data:
            raise ApiError(422, "empty_file", f"the {name} part is empty")
    try:
        cost = pair_cost(peek_image(mri, state.settings.max_pixels, "mri"),
                         peek_image(functional, state.settings.max_pixels, "functional"))
    except ImageError as exc:
        state.metrics.rejected.labels(exc.code).inc()
        raise image_error(exc) from None
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


async def _fuse_pair(state: ServiceState, request: Request | None, job: PairRequest, deadline: float,
                     wait_for_memory: bool) -> tuple[bytes, FusionResult, Timing]:
    """Reserve memory, decode, queue, wait, encode: one pair from bytes to PNG (every fusion route)."""
    engine = _ready_engine(state, job.tier)
    held = await _reserve(state, engine, job.mri, job.functional, deadline if wait_for_memory else None)
    try:
        pair = _check_output(await _decode_pair(state, job.mri, job.functional, job.modality, job.resize),
                             job.bit_depth)
        result, timing = await _fuse_one(state, request, pair, deadline, job.tier)
        del pair  # the result holds what is still needed
        png = await run_in_threadpool(_png, state, _pipeline(state, job.tier), result, job.bit_depth)
        state.metrics.fused.labels(result.modality).inc()
        return png, result, timing
    finally:
        held.release()


async def _fuse_one(state: ServiceState, request: Request | None, pair: PairInput, deadline: float,
                    tier: str | None) -> tuple[FusionResult, Timing]:
    """Queue one pair; if the client disconnects meanwhile, abandon the job (the model thread drops it).

    ``request`` None: the caller watches the client itself (one watcher per connection)."""
    engine = _ready_engine(state, tier)
    work = engine.submit_many([pair], deadline)
    outcomes = await (work if request is None else _until_disconnect(request, work))
    if isinstance(outcomes, BaseException):
        raise _engine_error(state, outcomes) from None
    if isinstance(outcomes[0], BaseException):
        raise _engine_error(state, outcomes[0]) from None
    return outcomes[0]


async def _until_disconnect(request: Request, work):  # noqa: ANN001, ANN202 - a coroutine and its result
    """Await ``work`` (an engine submission); cancel it when the client goes away.

    Returns the submission's result, or the exception it raised (QueueFull, ShuttingDown, ...).
    """
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                exc = task.exception()
                return exc if exc is not None else task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ApiError(499, "client_closed_request", "the client disconnected; work stopped")
    finally:
        if not task.done():
            task.cancel()


FUSION_PATHS = frozenset({"/fuse", "/fuse/json", "/fuse/batch"})


def admission_check(state: ServiceState, path: str) -> tuple[int, dict, dict[str, str]] | None:
    """Refuse fusion work before its body is read when it would be refused anyway (not ready, queue full)."""
    if path not in FUSION_PATHS:
        return None
    try:
        engine = _ready_engine(state)
    except ApiError as exc:
        return exc.status, exc.body(), exc.headers
    if engine.saturated:
        exc = _engine_error(state, QueueFull(engine.retry_after()))
        return exc.status, exc.body(), exc.headers
    return None


def _tier(state: ServiceState, tier: str | None) -> tuple[Fuser, BatchEngine] | None:
    """The (pipeline, engine) of a tier; None for the default (and while loading: the caller answers 503);
    unknown names are a 422."""
    if not tier or not state.tiers:
        return None
    if tier not in state.tiers:
        raise ApiError(422, "unknown_tier", f"this service serves tier(s) {', '.join(state.tiers) or 'none yet'}, "
                       f"not {tier!r} (start it with DMFNET_WEIGHTS=full,fast to serve both)")
    return state.tiers[tier]


def _ready_engine(state: ServiceState, tier: str | None = None) -> BatchEngine:
    chosen = _tier(state, tier)
    engine = chosen[1] if chosen else state.engine
    if engine is not None and engine.started and not engine.accepting:
        raise ApiError(503, "shutting_down", "the service is shutting down: send this to another replica",
                       {"Retry-After": "5", "Connection": "close"})
    if not state.ready or engine is None or not engine.accepting:
        raise ApiError(503, "not_ready", "the model is loading or the service is shutting down",
                       {"Retry-After": "5"})
    return engine


def _pipeline(state: ServiceState, tier: str | None) -> Fuser:
    chosen = _tier(state, tier)
    pipe = chosen[0] if chosen else state.pipeline
    assert pipe is not None
    return pipe


def _engine_error(state: ServiceState, exc: BaseException) -> ApiError:
    """Map an engine outcome to the HTTP error the client sees."""
    if isinstance(exc, QueueFull):
        state.metrics.rejected.labels("queue_full").inc()
        return ApiError(503, "queue_full", "too many pairs waiting; retry later",
                        {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, ShuttingDown):
        return ApiError(503, "shutting_down", str(exc), {"Retry-After": "5"})
    if isinstance(exc, DeadlineExceeded):
        return ApiError(504, "deadline_exceeded", str(exc))
    if isinstance(exc, OutOfMemory):
        state.metrics.rejected.labels("out_of_memory").inc()
        return ApiError(503, "out_of_memory", str(exc), {"Retry-After": "10"})
    return ApiError(500, "fusion_failed", "fusion failed for this pair (see server log with the request id)")


def _png(state: ServiceState, pipe: Fuser, result: FusionResult, bit_depth: int) -> bytes:
    try:
        return encode_png(result.pixels, bit_depth, pipe.png_text(), state.settings.png_compress_level)
    except ImageError as exc:
        raise image_error(exc) from None
    except MemoryError:
        raise out_of_memory(state) from None


def _headers(state: ServiceState, pipe: Fuser, result: FusionResult, timing: Timing) -> dict[str, str]:
    return {
        "X-Model-Version": f"dmfnet {state.version} {pipe.model_name}",
        "X-Weights-SHA256": str(pipe.weights_sha256 or pipe.weights_path),
        "X-Modality": result.modality,
        "X-Queue-Ms": f"{timing.queue_ms:.1f}",
        "X-Inference-Ms": f"{timing.inference_ms:.1f}",
        "X-Batch-Size": str(timing.batch_size),
        "X-Derived-Image": "true; not for primary diagnosis",
    }


def _check_bit_depth(bit_depth: int) -> None:
    if bit_depth not in (8, 16):
        raise ApiError(422, "bad_bit_depth", f"bit_depth must be 8 or 16, not {bit_depth}")


def _check_output(pair: PairInput, bit_depth: int) -> PairInput:
    """A colour result cannot be 16-bit: known from the decoded input, so refused before any fusion work."""
    if bit_depth == 16 and pair.chroma is not None:
        raise ApiError(422, "unsupported_output", "16-bit output is available for gray results only; this pair's "
                       "functional image is colour (PET/SPECT), so its result is RGB: ask for bit_depth 8")
    return pair


# Form fields are typed without "| None" although they default to None: a multipart field cannot carry JSON
# null, and an OpenAPI schema that allows null invites clients (and schemathesis) to send the text "null".
Modality = Literal["ct", "pet", "spect"]


def _form_bool(value: object) -> object:
    """Form booleans are the words true/false (any case): "0", "on" or "yes" are refused, not guessed."""
    if isinstance(value, str):
        if value.lower() not in ("true", "false"):
            raise ValueError("must be true or false")
        return value.lower() == "true"
    return value


FormBool = Annotated[bool, BeforeValidator(_form_bool)]
TIER_HELP = "which served tier fuses (names in GET /version 'tiers'); default: the first served"
PNG = {200: {"content": {"image/png": {}}, "description": "fused image (PNG)"}, **ERRORS}


@router.post("/fuse", responses=PNG, response_class=Response, summary="Fuse one MRI + CT/PET/SPECT pair")
async def fuse(
    request: Request,
    mri: UploadFile = File(..., description="MRI slice (PNG/JPEG/TIFF, 8/16-bit)"),
    functional: UploadFile = File(..., description="CT (gray) or PET/SPECT (pseudo-colour RGB) slice"),
    modality: Modality = Form(None, description="default: PET if colour, else CT"),
    bit_depth: int = Form(8, description="8 or 16 (16 for gray results only)"),
    resize: Annotated[FormBool, Form(description="resample the functional image to the MRI size if they differ")] \
        = False,
    tier: str = Form(None, description=TIER_HELP),
) -> Response:
    """Fuse a co-registered pair; returns the fused PNG (RGB for colour functional input, else gray)."""
    state = _state(request)
    deadline = request_deadline(request, state.settings)
    _check_bit_depth(bit_depth)
    await _refuse_duplicate_parts(request, ("mri", "functional", "modality", "bit_depth", "resize", "tier"))
    _tier(state, tier)
    job = PairRequest(await mri.read(), await functional.read(), modality, resize, bit_depth, tier)
    return await _png_response(state, request, job, deadline)


async def _png_response(state: ServiceState, request: Request, job: PairRequest, deadline: float) -> Response:
    """The shared tail of /fuse and /fuse/json."""
    png, result, timing = await _fuse_pair(state, request, job, deadline, wait_for_memory=False)
    return Response(png, media_type="image/png", headers=_headers(state, _pipeline(state, job.tier), result, timing))


NOT_EMPTY = ("modality", "bit_depth", "resize")  # FastAPI reads an empty value as "not sent": refuse it instead


async def _refuse_duplicate_parts(request: Request, names: tuple[str, ...]) -> None:
    """A form field sent twice is ambiguous: refuse it (422) instead of silently keeping the last one; an empty
    modality, bit_depth or resize is not a value either (422, not the default)."""
    form = await request.form()  # already parsed by FastAPI: cached, not read again
    twice = [n for n in names if len(form.getlist(n)) > 1]
    if twice:
        raise ApiError(422, "duplicate_field", f"form field(s) sent more than once: {', '.join(twice)}")
    empty = [n for n in NOT_EMPTY if form.get(n) == ""]
    if empty:
        raise ApiError(422, "empty_field", f"form field(s) sent empty: {', '.join(empty)} (leave them out for "
                       "the default)")


class FuseJson(BaseModel):
    """A pair as base64 strings, for clients that cannot send multipart."""

    mri: str = Field(..., min_length=1, description="base64 of the MRI image file")
    functional: str = Field(..., min_length=1, description="base64 of the CT/PET/SPECT image file")
    modality: Literal["ct", "pet", "spect"] | None = None
    bit_depth: int = 8
    resize: bool = False
    tier: str | None = Field(None, description="which served tier fuses (see /version tiers); default: the first")


_WHITESPACE = re.compile(r"\s+")


def _b64(name: str, text: str) -> bytes:
    """Strict base64, but line breaks and spaces (as ``base64`` wraps its output at 76 columns) are allowed."""
    try:
        return base64.b64decode(_WHITESPACE.sub("", text), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "bad_base64", f"{name} is not valid base64") from None


def _refuse_duplicate_keys(raw: bytes) -> None:
    """JSON objects with a key twice are ambiguous (json keeps the last): 422, as for form fields."""
    def pairs_hook(pairs: list[tuple[str, object]]) -> dict:
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ApiError(422, "duplicate_field", f"JSON key(s) sent more than once: {', '.join(twice)}")
        return dict(pairs)

    try:
        json.loads(raw, object_pairs_hook=pairs_hook)
    except ValueError:  # not JSON at all: FastAPI has already answered that
        pass


@router.post("/fuse/json", responses=PNG, response_class=Response, summary="Fuse one pair sent as base64 JSON")
async def fuse_json(request: Request, body: FuseJson) -> Response:
    """Same as ``/fuse`` with the images base64-encoded in a JSON body."""
    state = _state(request)
    deadline = request_deadline(request, state.settings)
    _refuse_duplicate_keys(await request.body())  # cached by FastAPI: not read twice
    _check_bit_depth(body.bit_depth)
    _tier(state, body.tier)
    job = PairRequest(_b64("mri", body.mri), _b64("functional", body.functional), body.modality, body.resize,
                      body.bit_depth, body.tier)
    return await _png_response(state, request, job, deadline)


@router.post("/fuse/batch", response_class=Response, summary="Fuse many pairs; returns a ZIP",
             responses={200: {"content": {"application/zip": {}}, "description": "fused PNGs + manifest.json"},
                        **ERRORS})
async def fuse_batch(
    request: Request,
    mri: list[UploadFile] = File(..., description="MRI files, in order", json_schema_extra={"minItems": 1}),
    functional: list[UploadFile] = File(..., description="functional files, same order and count",
                                        json_schema_extra={"minItems": 1}),
    modality: Modality = Form(None, description="one modality for all pairs"),
    bit_depth: int = Form(8),
    resize: Annotated[FormBool, Form()] = False,
    tier: str = Form(None, description=TIER_HELP),
) -> Response:
    """Pairs are matched by position. The ZIP holds ``NNN.png`` for each fused pair and ``manifest.json``
    with every pair's status; a bad pair is reported there and does not fail the others. Pairs wait for
    memory in order (until the deadline), so a call larger than the memory budget is fused piece by piece."""
    state = _state(request)
    deadline = request_deadline(request, state.settings)
    _check_bit_depth(bit_depth)
    await _refuse_duplicate_parts(request, ("modality", "bit_depth", "resize", "tier"))
    _tier(state, tier)
    if len(mri) != len(functional):
        raise ApiError(422, "count_mismatch", f"{len(mri)} mri files but {len(functional)} functional files")
    if len(mri) > state.settings.max_batch_pairs:
        raise ApiError(413, "too_many_pairs", f"at most {state.settings.max_batch_pairs} pairs per call")
    _ready_engine(state, tier)
    jobs = [PairRequest(await m.read(), await f.read(), modality, resize, bit_depth, tier)
            for m, f in zip(mri, functional, strict=True)]

    async def one(i: int, job: PairRequest) -> tuple[dict, bytes | None]:
        try:
            png, result, timing = await _fuse_pair(state, None, job, deadline, wait_for_memory=True)
        except ApiError as exc:
            return {"index": i, "status": exc.status, "error": exc.code, "detail": exc.detail}, None
        return {"index": i, "status": 200, "file": f"{i:03d}.png", "modality": result.modality,
                "queue_ms": round(timing.queue_ms, 1), "inference_ms": round(timing.inference_ms, 1)}, png

    outcomes = await _until_disconnect(request, asyncio.gather(*(one(i, job) for i, job in enumerate(jobs))))
    if isinstance(outcomes, BaseException):
        raise outcomes
    return await run_in_threadpool(_zip_response, outcomes)


def _zip_response(outcomes: list[tuple[dict, bytes | None]]) -> Response:
    """The fused PNGs and the manifest in one ZIP (in the threadpool: it copies every PNG)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # PNG is already compressed
        for entry, png in outcomes:
            if png is not None:
                zf.writestr(entry["file"], png)
        entries = [entry for entry, _ in outcomes]
        zf.writestr("manifest.json", json.dumps({"pairs": entries, "derived": "not for primary diagnosis"},
                                                indent=2))
    ok = sum(1 for e in entries if e["status"] == 200)
    return Response(buf.getvalue(), media_type="application/zip",
                    headers={"X-Pairs-OK": str(ok), "X-Pairs-Failed": str(len(entries) - ok),
                             "Content-Disposition": 'attachment; filename="fused.zip"'})


@router.get("/healthz", summary="Liveness: the process is up")
async def healthz() -> dict:
    """Always 200 while the process serves HTTP."""
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: model loaded, queue not full, new work would start soon",
            responses={503: {"description": "not ready"}})
async def readyz(request: Request) -> JSONResponse:
    """200 when new work would be accepted now; 503 with the reason otherwise."""
    state = _state(request)
    engine = state.engine
    if engine is not None and engine.started and not engine.accepting:
        return JSONResponse({"status": "shutting_down"}, 503)
    if not state.ready or engine is None:
        return JSONResponse({"status": "loading"}, 503)
    if engine.saturated:
        return JSONResponse({"status": "saturated", "queue_depth": engine.depth}, 503)
    if engine.batch_age_s > state.settings.stall_after_s:
        return JSONResponse({"status": "stalled", "batch_age_s": round(engine.batch_age_s, 1)}, 503)
    wait = round(engine.estimated_wait_s(), 1)
    if wait > state.settings.ready_max_wait_s:
        return JSONResponse({"status": "busy", "estimated_wait_s": wait, "queue_depth": engine.depth}, 503,
                            headers={"Retry-After": str(engine.retry_after())})
    return JSONResponse({"status": "ready", "queue_depth": engine.depth, "estimated_wait_s": wait})


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of this process's metrics."""
    return Response(generate_latest(_state(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/version", summary="Code version, model config, weights checksum, device, dtype")
async def version(request: Request) -> dict:
    """What is serving: for audit trails and for clients to record provenance."""
    state = _state(request)
    doc: dict = {"dmfnet": state.version, "ready": state.ready, "startup_s": state.startup_s}
    if state.pipeline is not None:
        doc["model"] = state.pipeline.describe()
        doc["tiers"] = {name: pipe.describe()["model"] for name, (pipe, _) in state.tiers.items()}
    s = state.settings
    doc["batching"] = {"max_batch_size": s.max_batch_size, "max_wait_ms": s.max_wait_ms, "queue_size": s.queue_size,
                       "request_timeout_s": s.request_timeout_s, "stall_after_s": s.stall_after_s,
                       "ready_max_wait_s": s.ready_max_wait_s,
                       "memory_budget_mb": state.budget.limit >> 20 if state.budget else None}
    return doc
