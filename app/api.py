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
from typing import Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from app.batcher import BatchEngine, DeadlineExceeded, OutOfMemory, QueueFull, ShuttingDown, Timing
from app.observability import ServiceMetrics
from app.settings import ServiceSettings
from models.imaging import ImageError, encode_png
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
    413: {"description": "body, image bytes or pixel count over the limit"},
    415: {"description": "not an image"},
    422: {"description": "corrupt image, empty part, size mismatch, bad modality/bit depth"},
    503: {"description": "queue full (Retry-After), out of memory, or not ready / shutting down"},
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
    for name, data in (("mri", mri), ("functional", functional)):
        if not data:
            raise ApiError(422, "empty_file", f"the {name} part is empty")

    def work() -> PairInput:
        limit = state.settings.max_pixels
        return decode_pair(mri, functional, modality, resize, limit)

    try:
        return await run_in_threadpool(work)
    except ImageError as exc:
        state.metrics.rejected.labels(exc.code).inc()
        raise image_error(exc) from None


async def _fuse_one(state: ServiceState, request: Request, pair: PairInput, deadline: float,
                    tier: str | None) -> tuple[FusionResult, Timing]:
    """Queue one pair; if the client disconnects meanwhile, abandon the job (the model thread drops it)."""
    engine = _ready_engine(state, tier)
    outcomes = await _until_disconnect(request, engine.submit_many([pair], deadline))
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


def _png(pipe: Fuser, result: FusionResult, bit_depth: int) -> bytes:
    try:
        return encode_png(result.pixels, bit_depth, pipe.png_text())
    except ImageError as exc:
        raise image_error(exc) from None


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


TIER_HELP = "which served tier fuses (names in GET /version 'tiers'); default: the first served"
PNG = {200: {"content": {"image/png": {}}, "description": "fused image (PNG)"}, **ERRORS}


@router.post("/fuse", responses=PNG, response_class=Response, summary="Fuse one MRI + CT/PET/SPECT pair")
async def fuse(
    request: Request,
    mri: UploadFile = File(..., description="MRI slice (PNG/JPEG/TIFF, 8/16-bit)"),
    functional: UploadFile = File(..., description="CT (gray) or PET/SPECT (pseudo-colour RGB) slice"),
    modality: Literal["ct", "pet", "spect"] | None = Form(None, description="default: PET if colour, else CT"),
    bit_depth: int = Form(8, description="8 or 16 (16 for gray results only)"),
    resize: bool = Form(False, description="resample the functional image to the MRI size if they differ"),
    tier: str | None = Form(None, description=TIER_HELP),
) -> Response:
    """Fuse a co-registered pair; returns the fused PNG (RGB for colour functional input, else gray)."""
    state = _state(request)
    deadline = request_deadline(request, state.settings)
    _check_bit_depth(bit_depth)
    await _refuse_duplicate_parts(request, ("mri", "functional", "modality", "bit_depth", "resize", "tier"))
    _tier(state, tier)
    pair = await _decode_pair(state, await mri.read(), await functional.read(), modality, resize)
    return await _fused_png(state, request, _check_output(pair, bit_depth), deadline, bit_depth, tier)


async def _fused_png(state: ServiceState, request: Request, pair: PairInput, deadline: float,
                     bit_depth: int, tier: str | None) -> Response:
    """The shared tail of /fuse and /fuse/json: queue, wait, encode (off the event loop), answer."""
    result, timing = await _fuse_one(state, request, pair, deadline, tier)
    state.metrics.fused.labels(result.modality).inc()
    pipe = _pipeline(state, tier)
    png = await run_in_threadpool(_png, pipe, result, bit_depth)
    return Response(png, media_type="image/png", headers=_headers(state, pipe, result, timing))


async def _refuse_duplicate_parts(request: Request, names: tuple[str, ...]) -> None:
    """A form field sent twice is ambiguous: refuse it (422) instead of silently keeping the last one."""
    form = await request.form()  # already parsed by FastAPI: cached, not read again
    twice = [n for n in names if len(form.getlist(n)) > 1]
    if twice:
        raise ApiError(422, "duplicate_field", f"form field(s) sent more than once: {', '.join(twice)}")


class FuseJson(BaseModel):
    """A pair as base64 strings, for clients that cannot send multipart."""

    mri: str = Field(..., description="base64 of the MRI image file")
    functional: str = Field(..., description="base64 of the CT/PET/SPECT image file")
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


@router.post("/fuse/json", responses=PNG, response_class=Response, summary="Fuse one pair sent as base64 JSON")
async def fuse_json(request: Request, body: FuseJson) -> Response:
    """Same as ``/fuse`` with the images base64-encoded in a JSON body."""
    state = _state(request)
    deadline = request_deadline(request, state.settings)
    _check_bit_depth(body.bit_depth)
    _tier(state, body.tier)
    pair = await _decode_pair(state, _b64("mri", body.mri), _b64("functional", body.functional), body.modality,
                              body.resize)
    return await _fused_png(state, request, _check_output(pair, body.bit_depth), deadline, body.bit_depth,
                            body.tier)


@router.post("/fuse/batch", response_class=Response, summary="Fuse many pairs; returns a ZIP",
             responses={200: {"content": {"application/zip": {}}, "description": "fused PNGs + manifest.json"},
                        **ERRORS})
async def fuse_batch(
    request: Request,
    mri: list[UploadFile] = File(..., description="MRI files, in order"),
    functional: list[UploadFile] = File(..., description="functional files, same order and count"),
    modality: Literal["ct", "pet", "spect"] | None = Form(None, description="one modality for all pairs"),
    bit_depth: int = Form(8),
    resize: bool = Form(False),
    tier: str | None = Form(None, description=TIER_HELP),
) -> Response:
    """Pairs are matched by position. The ZIP holds ``NNN.png`` for each fused pair and ``manifest.json``
    with every pair's status; a bad pair is reported there and does not fail the others."""
    state = _state(request)
    deadline = request_deadline(request, state.settings)
    _check_bit_depth(bit_depth)
    await _refuse_duplicate_parts(request, ("modality", "bit_depth", "resize", "tier"))
    _tier(state, tier)
    if len(mri) != len(functional):
        raise ApiError(422, "count_mismatch", f"{len(mri)} mri files but {len(functional)} functional files")
    if len(mri) > state.settings.max_batch_pairs:
        raise ApiError(413, "too_many_pairs", f"at most {state.settings.max_batch_pairs} pairs per call")
    entries: list[dict] = []
    prepared: list[tuple[int, PairInput]] = []
    for i, (m, f) in enumerate(zip(mri, functional, strict=True)):
        try:
            pair = await _decode_pair(state, await m.read(), await f.read(), modality, resize)
            prepared.append((i, _check_output(pair, bit_depth)))
            entries.append({"index": i, "status": "pending"})
        except ApiError as exc:
            entries.append({"index": i, "status": exc.status, "error": exc.code, "detail": exc.detail})
    engine = _ready_engine(state, tier)
    outcomes = await _until_disconnect(request, engine.submit_many([p for _, p in prepared], deadline))
    if isinstance(outcomes, BaseException):
        raise _engine_error(state, outcomes) from None
    return await run_in_threadpool(_zip_response, state, _pipeline(state, tier), entries, prepared, outcomes,
                                   bit_depth)


def _zip_response(state: ServiceState, pipe: Fuser, entries: list[dict], prepared: list[tuple[int, PairInput]],
                  outcomes: list, bit_depth: int) -> Response:
    """Encode the fused PNGs and the manifest into one ZIP (runs in the threadpool: PNG encoding is CPU work)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # PNG is already compressed
        for (i, _), outcome in zip(prepared, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                err = _engine_error(state, outcome)
                entries[i].update(status=err.status, error=err.code, detail=err.detail)
                continue
            result, timing = outcome
            try:
                zf.writestr(f"{i:03d}.png", _png(pipe, result, bit_depth))
            except ApiError as err:
                entries[i].update(status=err.status, error=err.code, detail=err.detail)
                continue
            state.metrics.fused.labels(result.modality).inc()
            entries[i].update(status=200, file=f"{i:03d}.png", modality=result.modality,
                              queue_ms=round(timing.queue_ms, 1), inference_ms=round(timing.inference_ms, 1))
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


@router.get("/readyz", summary="Readiness: model loaded, warmed up, queue not saturated",
            responses={503: {"description": "not ready"}})
async def readyz(request: Request) -> JSONResponse:
    """200 when new work would be accepted now; 503 with the reason otherwise."""
    state = _state(request)
    engine = state.engine
    if not state.ready or engine is None:
        return JSONResponse({"status": "loading"}, 503)
    if not engine.accepting:
        return JSONResponse({"status": "shutting_down"}, 503)
    if engine.saturated:
        return JSONResponse({"status": "saturated", "queue_depth": engine.depth}, 503)
    if engine.batch_age_s > state.settings.stall_after_s:
        return JSONResponse({"status": "stalled", "batch_age_s": round(engine.batch_age_s, 1)}, 503)
    return JSONResponse({"status": "ready", "queue_depth": engine.depth})


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
                       "request_timeout_s": s.request_timeout_s, "stall_after_s": s.stall_after_s}
    return doc
