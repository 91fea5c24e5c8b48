"""What every route shares: the service state, the JSON error type, and which tier (pipeline + engine) serves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.engine.admission import MemoryBudget
from app.engine.batcher import BatchEngine
from app.engine.outcomes import DeadlineExceeded, ModelLost, OutOfMemory, QueueFull, ShuttingDown
from app.http.metrics import ServiceMetrics
from app.settings import ServiceSettings
from models.images.imaging import ImageError

if TYPE_CHECKING:
    from models.inference.fuser import Fuser


@dataclass
class ServiceState:
    """What the routes need; created by the app factory, filled in by the lifespan."""

    settings: ServiceSettings
    metrics: ServiceMetrics
    pipeline: Fuser | None = None  # the default tier (the first of ``weights``)
    engine: BatchEngine | None = None
    tiers: dict[str, tuple[Fuser, BatchEngine]] = field(default_factory=dict)  # every tier served, by name
    budget: MemoryBudget | None = None  # decoded bytes all requests may hold (app/engine/admission.py)
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
    503: {"description": "queue full or memory budget taken (Retry-After), out of memory, not ready, shutting down, "
                         "model process restarting"},
    504: {"description": "request deadline passed (in the queue or during fusion; the work was stopped)"},
}

# ImageError codes (models/) -> HTTP status; every other code is 422 (the request's content is wrong).
IMAGE_ERROR_STATUS = {"image_too_large": 413, "not_an_image": 415}


def image_error(exc: ImageError) -> ApiError:
    """The HTTP error for an input-image problem."""
    return ApiError(IMAGE_ERROR_STATUS.get(exc.code, 422), exc.code, exc.detail)


def tier_of(state: ServiceState, tier: str | None) -> tuple[Fuser, BatchEngine] | None:
    """The (pipeline, engine) of a tier; None for the default (and while loading: the caller answers 503);
    unknown names are a 422."""
    if not tier or not state.tiers:
        return None
    if tier not in state.tiers:
        raise ApiError(422, "unknown_tier", f"this service serves tier(s) {', '.join(state.tiers) or 'none yet'}, "
                       f"not {tier!r} (start it with DMFNET_WEIGHTS=full,fast to serve both)")
    return state.tiers[tier]


def ready_engine(state: ServiceState, tier: str | None = None) -> BatchEngine:
    """The engine that takes new work for this tier, or 503 (loading, shutting down)."""
    chosen = tier_of(state, tier)
    engine = chosen[1] if chosen else state.engine
    if engine is not None and engine.started and not engine.accepting:
        raise engine_error(state, ShuttingDown("the service is shutting down: send this to another replica"))
    if not state.ready or engine is None or not engine.accepting:
        raise ApiError(503, "not_ready", "the model is loading or the service is shutting down",
                       {"Retry-After": "5"})
    return engine


def pipeline_of(state: ServiceState, tier: str | None) -> Fuser:
    """The pipeline of this tier (the default one for None)."""
    chosen = tier_of(state, tier)
    pipe = chosen[0] if chosen else state.pipeline
    assert pipe is not None
    return pipe


def engine_error(state: ServiceState, exc: BaseException) -> ApiError:
    """Map an engine outcome to the HTTP error the client sees."""
    if isinstance(exc, QueueFull):
        state.metrics.rejected.labels("queue_full").inc()
        return ApiError(503, "queue_full", "too many pairs waiting; retry later",
                        {"Retry-After": str(exc.retry_after)})
    if isinstance(exc, ShuttingDown):  # this process is going away: the client should reconnect elsewhere
        return ApiError(503, "shutting_down", str(exc), {"Retry-After": "5", "Connection": "close"})
    if isinstance(exc, DeadlineExceeded):
        return ApiError(504, "deadline_exceeded", str(exc))
    if isinstance(exc, OutOfMemory):
        state.metrics.rejected.labels("out_of_memory").inc()
        return ApiError(503, "out_of_memory", str(exc), {"Retry-After": "10"})
    if isinstance(exc, ModelLost):
        return ApiError(503, "model_restarting", "the model process stopped while it held this pair and is being "
                        "restarted; retry", {"Retry-After": "5"})
    return ApiError(500, "fusion_failed", "fusion failed for this pair (see server log with the request id)")


def out_of_memory(state: ServiceState) -> ApiError:
    """An allocation failed (decode, fusion or encoding): this pair is answered 503, the service goes on."""
    state.metrics.rejected.labels("out_of_memory").inc()
    return ApiError(503, "out_of_memory", "not enough memory to fuse this pair now; retry later or send a "
                    "smaller image", {"Retry-After": "10"})
