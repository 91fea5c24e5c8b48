"""The service's Prometheus metrics: one registry per app, fed by the HTTP layer and, as the engine's
BatchObserver, by the batch engine."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from app.engine.batcher import BatchObserver

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
        self.in_flight_pairs = Gauge("dmfnet_pairs_in_flight",
                                     "pairs accepted and not yet answered (queued, collecting or on the model)",
                                     registry=r)
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

    def in_flight(self, pairs: int) -> None:  # noqa: D102
        self.in_flight_pairs.set(pairs)
