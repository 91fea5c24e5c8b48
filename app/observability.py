"""Prometheus metrics and structured logs. Logs carry request ids, timings and sizes: never pixels or names."""

from __future__ import annotations

import json
import logging
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from app.batcher import BatchObserver

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class ServiceMetrics(BatchObserver):
    """All metrics of one app instance, in their own registry (tests build many apps)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dmfnet_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("dmfnet_request_seconds", "HTTP request latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait_s = Histogram("dmfnet_queue_wait_seconds", "time a pair waited in the queue",
                                      buckets=LATENCY_BUCKETS, registry=r)
        self.inference_s = Histogram("dmfnet_inference_seconds", "model time per batch",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("dmfnet_batch_size", "pairs per model batch",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r)
        self.depth = Gauge("dmfnet_queue_depth", "pairs waiting for the model", registry=r)
        self.fused = Counter("dmfnet_images_fused", "fused images by functional modality", ["modality"],
                             registry=r)
        self.expired_jobs = Counter("dmfnet_deadline_expired",
                                    "pairs dropped after their deadline passed (in the queue or mid-fusion)",
                                    registry=r)
        self.batch_age = Gauge("dmfnet_inflight_batch_age_seconds",
                               "how long the batch now on the model has held it (0 when idle)", registry=r)
        self.rejected = Counter("dmfnet_rejected", "requests refused before fusion, by reason", ["reason"],
                                registry=r)
        self.model = Info("dmfnet_model", "model configuration, weights checksum and device", registry=r)
        self.ready = Gauge("dmfnet_ready", "1 when the model is loaded and warmed up", registry=r)
        self.model_restarts = Gauge("dmfnet_model_process_restarts",
                                    "times the model process died and was replaced since start-up", registry=r)

    # BatchObserver
    def queue_depth(self, depth: int) -> None:  # noqa: D102
        self.depth.set(depth)

    def batch(self, size: int, inference_s: float) -> None:  # noqa: D102
        self.batch_size.observe(size)
        self.inference_s.observe(inference_s)

    def queue_wait(self, seconds: float) -> None:  # noqa: D102
        self.queue_wait_s.observe(seconds)

    def expired(self) -> None:  # noqa: D102
        self.expired_jobs.inc()


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with any ``extra`` fields the call passed."""

    _skip = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:  # noqa: D102
        doc = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        doc.update({k: v for k, v in vars(record).items() if k not in self._skip})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class KeyValueFormatter(logging.Formatter):
    """Human-readable line with the ``extra`` fields as key=value."""

    def format(self, record: logging.LogRecord) -> str:  # noqa: D102
        extras = {k: v for k, v in vars(record).items() if k not in JsonFormatter._skip}
        base = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname:<7} {record.name}: "
        line = base + record.getMessage() + "".join(f" {k}={v}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a CLI run inside a test harness swaps it)."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class RepeatFilter(logging.Filter):
    """Passes a message once per ``window_s`` per (logger, template); the next one that passes says how many
    were held back. Under fd exhaustion asyncio logs every failed accept(): 933,882 lines in one probe."""

    def __init__(self, window_s: float = 10.0) -> None:
        super().__init__()
        self.window_s = window_s
        self._seen: dict[tuple[str, object], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        key = (record.name, record.msg)
        now = time.monotonic()
        last, held = self._seen.get(key, (float("-inf"), 0))
        if now - last < self.window_s:
            self._seen[key] = (last, held + 1)
            return False
        if len(self._seen) > 1000:  # bounded: many distinct messages are not a flood of one
            self._seen.clear()
        self._seen[key] = (now, 0)
        if held:
            record.repeated = held
        return True


def configure_logging(json_logs: bool, level: str,
                      names: tuple[str, ...] = ("dmfnet", "uvicorn", "uvicorn.error", "asyncio"),
                      propagate: bool = False) -> None:
    """Route the service's loggers (and uvicorn's and asyncio's) to stderr in the chosen format; warnings and
    errors repeated within 10 s are collapsed (info lines, e.g. one per request, are never dropped)."""
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if json_logs else KeyValueFormatter())
    repeats = RepeatFilter()
    handler.addFilter(lambda r: r.levelno < logging.WARNING or repeats.filter(r))
    for name in names:
        lg = logging.getLogger(name)
        lg.handlers[:] = [handler]
        lg.setLevel(level.upper())
        lg.propagate = propagate
    logging.getLogger("uvicorn.access").disabled = True  # we log requests ourselves (with ids, no query strings)
