"""App factory: loads the model once, warms it up, runs the batching engine, maps errors to JSON."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine.admission import MemoryBudget, default_budget_bytes, resident_bytes
from app.engine.batcher import BatchEngine, new_model_thread
from app.engine.model_process import LoadOptions, ModelProcess, RemoteFuser
from app.http.api import admission_check, router
from app.http.metrics import ServiceMetrics
from app.http.middleware import ServiceMiddleware
from app.http.state import ApiError, ServiceState, out_of_memory
from app.http.tryit import router as tryit_router
from app.settings import ServiceSettings
from models import __version__
from models.images.phantoms import phantom_inputs

if TYPE_CHECKING:
    from models.inference.fuser import Fuser

log = logging.getLogger("dmfnet.service")

DESCRIPTION = """DM-FNet multimodal medical image fusion (MRI with CT, PET or SPECT).

Outputs are **derived images, not for primary diagnosis**. Errors are JSON `{"error": code, "detail": ...}`.
"""


def tier_names(settings: ServiceSettings) -> list[str]:
    """The tiers to serve: ``weights`` is one name or a comma list (``full,fast``); the first is the default."""
    names = [w.strip() for w in (settings.weights or "full").split(",") if w.strip()]
    return list(dict.fromkeys(names)) or ["full"]


def load_options(settings: ServiceSettings) -> LoadOptions:
    """What the model process needs from the settings to load every tier."""
    return LoadOptions(tuple(tier_names(settings)), settings.threads, settings.device, settings.precision,
                       settings.chunk_size, settings.tile_size, settings.tile_overlap, settings.runtime,
                       settings.log_json, settings.log_level)


def _load(settings: ServiceSettings | LoadOptions, weights: str) -> Fuser:
    """One tier's pipeline (in the model process, or in this one without it). torch is imported here only:
    with the model process the HTTP process never loads it (~180 MB less)."""
    import torch

    from models.inference.runtimes import use_runtime
    from models.inference.weights import open_pipeline

    if settings.threads:
        torch.set_num_threads(settings.threads)
    pipe = open_pipeline(weights, settings.device, precision=settings.precision,
                         chunk_size=settings.chunk_size, tile_size=settings.tile_size,
                         tile_overlap=settings.tile_overlap)
    return use_runtime(pipe, settings.runtime)


def _warm_up(pipe: Fuser, batch: int) -> tuple[float, int]:
    """Full-size batches through the model: first-call allocations and kernel selection happen in the first;
    the second is timed (seconds, pixels) to seed the engine's wait estimates."""
    pairs = phantom_inputs(1, 256) * min(batch, 2)
    pipe.fuse(pairs)
    t0 = time.perf_counter()
    pipe.fuse(pairs)
    return time.perf_counter() - t0, sum(p.size[0] * p.size[1] for p in pairs)


async def drain(state: ServiceState) -> int:
    """Stop taking fusion work (new requests: 503 shutting_down; readiness 503), give queued and running work
    the grace (all tiers at once), then answer what is left 503. Returns the pairs answered so."""
    state.ready = False
    state.metrics.ready.set(0)
    grace = state.settings.shutdown_grace_s
    failed = await asyncio.gather(*(engine.drain(grace) for _, engine in state.tiers.values()))
    return sum(failed)


def create_app(settings: ServiceSettings | None = None, pipeline: Fuser | None = None) -> FastAPI:
    """Build the service. ``pipeline`` may be injected (tests); otherwise it is loaded at start-up."""
    settings = settings or ServiceSettings()
    metrics = ServiceMetrics()
    state = ServiceState(settings=settings, metrics=metrics, version=__version__)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        t0 = time.perf_counter()
        model_thread = new_model_thread()  # loading, warm-up and inference of every tier all run on it
        loop = asyncio.get_running_loop()
        process = None
        if pipeline is None and settings.model_process:
            process = ModelProcess(load_options(settings), _load)
            await loop.run_in_executor(model_thread, process.start)
        for name in tier_names(settings):
            if pipeline is not None:
                pipe = pipeline
            elif process is not None:
                pipe = RemoteFuser(process, name)
            else:
                pipe = await loop.run_in_executor(model_thread, _load, settings, name)
            if pipe.is_random:
                log.warning("serving a RANDOM-INITIALISED model: outputs are not a trained fusion",
                            extra={"weights": pipe.weights_path})
            engine = BatchEngine(pipe, settings.max_batch_size, settings.max_wait_ms, settings.queue_size, metrics,
                                 model_thread)
            if settings.warmup:
                engine.calibrate(*await engine.run_on_model_thread(_warm_up, pipe, settings.max_batch_size))
            engine.start()
            state.tiers[name] = (pipe, engine)
            if pipeline is not None:  # an injected pipeline (tests) is the one tier
                break
        state.pipeline, state.engine = next(iter(state.tiers.values()))
        mb = settings.memory_budget_mb
        model_bytes = process.resident_bytes() if process is not None else 0
        budget = mb << 20 if mb else default_budget_bytes(resident_bytes() + model_bytes)
        state.budget = MemoryBudget(budget)
        engine, pipe = state.engine, state.pipeline
        metrics.batch_age.set_function(lambda: engine.batch_age_s)
        if process is not None:
            metrics.model_restarts.set_function(lambda: process.restarts)
        state.startup_s = round(time.perf_counter() - t0, 2)
        d = pipe.describe()
        metrics.model.info({k: str(d[k]) for k in ("model", "config", "device", "precision", "weights_sha256")})
        state.ready = True
        metrics.ready.set(1)
        log.info("ready", extra={"startup_s": state.startup_s, "device": d["device"], "precision": d["precision"],
                                 "model": d["model"], "weights_sha256": d["weights_sha256"],
                                 "memory_budget_mb": budget >> 20})
        try:
            yield
        finally:
            failed = await drain(state)  # nothing left after a SIGTERM drain (app/http/server.py); else here
            for _, tier_engine in state.tiers.values():
                failed += await tier_engine.stop(0)
            if process is not None:
                process.close()
            log.info("stopped", extra={"unfinished_pairs": failed})

    # FastAPI's built-in OpenTelemetry off: the service exports Prometheus metrics and its own JSON logs, and the
    # per-request provider checks cost ~2% of a 256 px pair's service CPU (py-spy) with no provider configured;
    # its "logs" would also record validation failures with their messages, which may carry request data.
    app = FastAPI(title="DM-FNet fusion service", version=__version__, description=DESCRIPTION, lifespan=lifespan,
                  telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False})
    app.state.service = state
    app.include_router(router)
    app.include_router(tryit_router)
    _answer_errors_as_json(app, state)
    key = settings.api_key.get_secret_value() if settings.api_key else None
    app.add_middleware(ServiceMiddleware, metrics=metrics, max_body=settings.max_upload_bytes, api_key=key,
                       metrics_require_key=settings.metrics_require_key,
                       admission=lambda path: admission_check(state, path))
    return app


def _answer_errors_as_json(app: FastAPI, state: ServiceState) -> None:
    """Every error is ``{"error": code, "detail": ...}``: ours, validation, routing, allocation failures (503)
    and anything unexpected (500, logged with the request id)."""
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"field": ".".join(str(p) for p in e.get("loc", ())[1:]), "problem": e.get("msg")}
                  for e in exc.errors()]
        return JSONResponse({"error": "invalid_request", "detail": detail}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and str(exc.detail).startswith("Too many files") \
                and request.url.path == "/fuse/batch":  # the form parser's own cap (1,000 parts): one limit, one code
            body = {"error": "too_many_pairs", "detail": f"at most {state.settings.max_batch_pairs} pairs per call"}
            return JSONResponse(body, 413)
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": code, "detail": exc.detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(MemoryError)
    async def _out_of_memory(request: Request, exc: MemoryError) -> JSONResponse:
        err = out_of_memory(state)
        return JSONResponse(err.body(), err.status, headers=err.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", extra={"request_id": request.scope.get("state", {}).get("request_id")})
        return JSONResponse({"error": "internal_error", "detail": "unexpected server error"}, 500)
