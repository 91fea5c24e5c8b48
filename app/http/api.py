"""HTTP routes (fusion, probes, metrics, version). Every error is JSON ``{"error": code, "detail": ...}``; images
are never logged. The work of one pair is in :mod:`app.http.pair_flow`."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import re
import time
import zipfile
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, BeforeValidator, Field
from starlette.concurrency import run_in_threadpool

from app.engine.outcomes import QueueFull
from app.http.pair_flow import PairRequest, fuse_pair, result_headers, until_disconnect
from app.http.state import ERRORS, ApiError, ServiceState, engine_error, pipeline_of, ready_engine, tier_of
from app.settings import ServiceSettings

router = APIRouter()


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


FUSION_PATHS = frozenset({"/fuse", "/fuse/json", "/fuse/batch"})


def admission_check(state: ServiceState, path: str) -> tuple[int, dict, dict[str, str]] | None:
    """Refuse fusion work before its body is read when it would be refused anyway (not ready, queue full)."""
    if path not in FUSION_PATHS:
        return None
    try:
        engine = ready_engine(state)
    except ApiError as exc:
        return exc.status, exc.body(), exc.headers
    if engine.saturated:
        exc = engine_error(state, QueueFull(engine.retry_after()))
        return exc.status, exc.body(), exc.headers
    return None


def _check_bit_depth(bit_depth: int) -> None:
    if bit_depth not in (8, 16):
        raise ApiError(422, "bad_bit_depth", f"bit_depth must be 8 or 16, not {bit_depth}")


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
    tier_of(state, tier)
    job = PairRequest(await mri.read(), await functional.read(), modality, resize, bit_depth, tier)
    return await _png_response(state, request, job, deadline)


async def _png_response(state: ServiceState, request: Request, job: PairRequest, deadline: float) -> Response:
    """The shared tail of /fuse and /fuse/json."""
    png, result, timing = await fuse_pair(state, request, job, deadline, wait_for_memory=False)
    headers = result_headers(state, pipeline_of(state, job.tier), result, timing)
    return Response(png, media_type="image/png", headers=headers)


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
        obj = dict(pairs)
        if len(obj) == len(pairs):  # linear: a hostile body may hold millions of keys
            return obj
        seen: set[str] = set()
        twice = sorted({k for k, _ in pairs if k in seen or seen.add(k)})
        raise ApiError(422, "duplicate_field", f"JSON key(s) sent more than once: {', '.join(twice)}")

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
    tier_of(state, body.tier)
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
    tier_of(state, tier)
    if len(mri) != len(functional):
        raise ApiError(422, "count_mismatch", f"{len(mri)} mri files but {len(functional)} functional files")
    if len(mri) > state.settings.max_batch_pairs:
        raise ApiError(413, "too_many_pairs", f"at most {state.settings.max_batch_pairs} pairs per call")
    ready_engine(state, tier)
    jobs = [PairRequest(await m.read(), await f.read(), modality, resize, bit_depth, tier)
            for m, f in zip(mri, functional, strict=True)]

    async def one(i: int, job: PairRequest) -> tuple[dict, bytes | None]:
        try:
            png, result, timing = await fuse_pair(state, None, job, deadline, wait_for_memory=True)
        except ApiError as exc:
            return {"index": i, "status": exc.status, "error": exc.code, "detail": exc.detail}, None
        return {"index": i, "status": 200, "file": f"{i:03d}.png", "modality": result.modality,
                "queue_ms": round(timing.queue_ms, 1), "inference_ms": round(timing.inference_ms, 1)}, png

    outcomes = await until_disconnect(request, asyncio.gather(*(one(i, job) for i, job in enumerate(jobs))))
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
    if engine.stalled(state.settings.stall_after_s):
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
