"""The watcher's health and metrics on a port: ``/healthz`` (liveness for Kubernetes, a quick look for an admin)
and ``/metrics`` (Prometheus), served from a small thread so the watcher needs no web framework."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class WatchHealth:
    """What the watcher did: counters by outcome and reason kind, last success, pass duration, PACS errors."""

    def __init__(self, stale_after_s: float) -> None:
        self.stale_after_s, self.started = stale_after_s, time.time()
        self.last_success: float | None = None
        self.state = "starting"
        self.registry = r = CollectorRegistry()
        self.up = Gauge("dmfnet_watch_up", "1 when the last pass succeeded", registry=r)
        self.last = Gauge("dmfnet_watch_last_success_timestamp_seconds", "end of the last successful pass",
                          registry=r)
        self.duration = Gauge("dmfnet_watch_pass_duration_seconds", "duration of the last successful pass",
                              registry=r)
        self.studies = Counter("dmfnet_watch_studies_total", "studies looked at", registry=r)
        self.pairs = Counter("dmfnet_watch_pairs_total", "MR + partner pairs by outcome and reason kind",
                             ["outcome", "kind"], registry=r)
        self.errors = Counter("dmfnet_watch_pass_errors_total", "passes that failed, by kind (pacs_unreachable, "
                              "pacs_rejected, ...)", ["kind"], registry=r)

    def pass_done(self, reports: list, seconds: float) -> None:
        """Record a completed pass."""
        self.last_success, self.state = time.time(), "ok"
        self.up.set(1)
        self.last.set(self.last_success)
        self.duration.set(seconds)
        self.studies.inc(len({r.study for r in reports if r.study}))
        for r in reports:
            self.pairs.labels(r.status, r.kind or "-").inc()

    def pass_failed(self, kind: str) -> None:
        """Record a pass that could not run (listing failed: PACS down, rejected ...)."""
        self.state = f"error: {kind}"
        self.up.set(0)
        self.errors.labels(kind).inc()

    def status(self) -> tuple[int, dict]:
        """(HTTP status, body) of /healthz: 503 once no pass succeeded for ``stale_after_s``."""
        now = time.time()
        since = now - (self.last_success or self.started)
        body = {"state": self.state, "last_success_age_s": None if self.last_success is None else round(since, 1),
                "stale_after_s": self.stale_after_s}
        return (200 if since <= self.stale_after_s else 503), body

    def serve(self, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
        """Start serving /healthz and /metrics in a daemon thread; returns the server (``server_port``)."""
        return HealthServer(self.registry, {"/healthz": self.status}).serve(port, host)


class HealthServer:
    """JSON probes and Prometheus /metrics on a port, from a daemon thread (no web framework needed)."""

    def __init__(self, registry: CollectorRegistry, probes: dict) -> None:
        self.registry, self.probes = registry, probes
        self.server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        """The port it listens on (0 before :meth:`serve`)."""
        return self.server.server_port if self.server else 0

    def serve(self, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
        """Start serving; returns the server."""
        probes, registry = self.probes, self.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                if self.path in probes:
                    code, body = probes[self.path]()
                    data, ctype = json.dumps(body).encode(), "application/json"
                elif self.path == "/metrics":
                    code, data, ctype = 200, generate_latest(registry), CONTENT_TYPE_LATEST
                else:
                    code, data, ctype = 404, b'{"error": "not_found"}', "application/json"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # scrapes every few seconds: not worth a log line each
                return

        self.server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=self.server.serve_forever, name="pacs-health", daemon=True).start()
        return self.server
