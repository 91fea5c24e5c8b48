"""ASGI middleware: request body limit (enforced while streaming), request ids, access log, API key."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable

from app.http.metrics import ServiceMetrics

log = logging.getLogger("dmfnet.http")

EXEMPT_FROM_AUTH = {"/healthz", "/readyz", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc", "/"}


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send a complete JSON response on a raw ASGI channel."""
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


SHUTTING_DOWN = {"error": "shutting_down", "detail": "the service is shutting down; retry on another instance"}


class CloseIfBodyUnread:
    """``receive``/``send`` of one request: a response that starts before the request body was read to its end
    says ``Connection: close`` (401, 413, 503 answered from the headers, a cut-off body). Without it uvicorn kept
    the connection, read and dropped the rest of the body with no cap (15 GB in 10 s on one connection) and then
    wrote a spurious 408; with it the server half-closes and drops what still arrives, bounded (app/http/server.py)."""

    def __init__(self, receive, send, headers: dict[bytes, bytes]) -> None:
        length = headers.get(b"content-length", b"0")
        self.unread = b"transfer-encoding" in headers or not length.isdigit() or int(length) > 0
        self._receive, self._send = receive, send

    async def receive(self) -> dict:  # noqa: D102
        message = await self._receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            self.unread = False
        return message

    async def send(self, message: dict) -> None:  # noqa: D102
        if message["type"] == "http.response.start" and self.unread:
            headers = list(message.get("headers", []))
            if not any(k.lower() == b"connection" for k, _ in headers):
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await self._send(message)


class BodyTooLarge(Exception):
    """Raised from ``receive`` once the streamed body passes the limit."""


Refusal = tuple[int, dict, dict[str, str]]
"""(status, JSON body, headers) of a request refused before its body is read."""

Admission = Callable[[str], Refusal | None]
"""Asked with the path of every POST before its body is read: a refusal, or None to let it in."""


class ServiceMiddleware:
    """One pass over every HTTP request.

    * X-Request-ID: taken from the client when sane, else generated; echoed on the response.
    * Body limit: Content-Length over the limit is refused at once; a chunked/lying body is counted as it
      streams in and cut off with 413 the moment it passes the limit (the rest is never read).
    * API key (when configured): constant-time comparison; health and docs exempt, metrics optional; a key
      header sent twice is refused (never last-wins).
    * Admission: a POST that would be refused anyway (queue full, not ready) is answered before its body is
      uploaded and decoded.
    * The arrival time (``scope["state"]["arrived"]``): request deadlines run from it.
    * One structured access-log line and the request counter/histogram per request.
    """

    def __init__(self, app, metrics: ServiceMetrics, max_body: int, api_key: str | None,
                 metrics_require_key: bool, admission: Admission | None = None) -> None:
        self.app = app
        self.admission = admission
        self.metrics = metrics
        self.max_body = max_body
        self.api_key = api_key.encode() if api_key else None
        self.metrics_require_key = metrics_require_key

    async def __call__(self, scope, receive, send) -> None:  # noqa: D102
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrived = time.monotonic()
        raw_headers = scope.get("headers") or []
        headers = dict(raw_headers)
        framing = CloseIfBodyUnread(receive, send, headers)
        receive, send = framing.receive, framing.send
        rid = headers.get(b"x-request-id", b"").decode("latin-1")
        if not (0 < len(rid) <= 64 and rid.replace("-", "").replace("_", "").isalnum()):
            rid = uuid.uuid4().hex
        scope.setdefault("state", {}).update(request_id=rid, arrived=arrived)
        path = scope["path"]
        endpoint = path if path in _KNOWN else "other"
        started = time.perf_counter()
        status_holder = {"status": 500, "started": False}

        rid_header = [(b"x-request-id", rid.encode())]
        over_limit = False  # set once the streamed body passed the limit: this middleware answers 413 itself

        async def send_wrapped(message) -> None:
            if over_limit:  # whatever the app made of the cut-off body (a parser's 400, ...) is replaced
                if message["type"] == "http.response.start" and not status_holder["started"]:
                    await self._too_large(send, rid_header, status_holder)
                    status_holder["started"] = True
                return
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                status_holder["started"] = True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            refusal = self._refusal(scope["method"], path, raw_headers)
            if refusal is not None:
                status, body, extra = refusal
                status_holder["status"] = status
                await send_json(send, status, body,
                                [*rid_header, *((k.lower().encode(), v.encode()) for k, v in extra.items())])
                return
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                scope["state"]["body_too_large"] = True
                await self._too_large(send, rid_header, status_holder)
                return
            received = 0

            async def receive_limited():
                nonlocal received, over_limit
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        over_limit = scope["state"]["body_too_large"] = True
                        raise BodyTooLarge
                return message

            try:
                await self.app(scope, receive_limited, send_wrapped)
            except asyncio.CancelledError:  # uvicorn's shutdown cancels what outlived its grace (an upload still
                if not status_holder["started"]:  # arriving): the documented 503, not uvicorn's text/plain 500
                    status_holder["status"] = 503
                    await send_json(send, 503, SHUTTING_DOWN, rid_header)
                raise
            except Exception:  # BodyTooLarge itself, or whatever a parser wrapped it in; or a bug
                await self._after_exception(send, rid_header, status_holder, over_limit, endpoint)

        finally:
            elapsed = time.perf_counter() - started
            status = status_holder["status"]
            if scope["state"].get("body_too_large"):
                self.metrics.rejected.labels("too_large").inc()
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(elapsed)
            if endpoint not in ("/healthz", "/readyz", "/metrics"):
                log.info("request", extra={"request_id": rid, "method": scope["method"], "path": endpoint,
                                           "status": status, "ms": round(elapsed * 1000, 1)})

    def _refusal(self, method: str, path: str, raw_headers: list) -> Refusal | None:
        """A response decided from the request line and headers alone: ambiguous framing (400), auth (401),
        then admission (503)."""
        names = {k for k, _ in raw_headers}
        if b"content-length" in names and b"transfer-encoding" in names:  # a proxy may frame it the other way
            return 400, {"error": "bad_request", "detail": "both Content-Length and Transfer-Encoding: ambiguous "
                         "message framing (request smuggling risk); send exactly one"}, {"Connection": "close"}
        if self.api_key and self._needs_key(path):
            keys = [v for k, v in raw_headers if k == b"x-api-key"]
            if len(keys) != 1 or not hmac.compare_digest(keys[0], self.api_key):
                self.metrics.rejected.labels("auth").inc()
                why = "X-API-Key sent more than once" if len(keys) > 1 else "missing or wrong X-API-Key"
                return 401, {"error": "unauthorized", "detail": why}, {}
        if self.admission is not None and method == "POST":
            return self.admission(path)
        return None

    def _needs_key(self, path: str) -> bool:
        if path in EXEMPT_FROM_AUTH or path.startswith("/samples/"):  # the try-it page and its phantoms
            return False
        return path != "/metrics" or self.metrics_require_key

    async def _after_exception(self, send, rid_header, status_holder: dict, over_limit: bool, endpoint: str) -> None:
        """The answer when the app raised: 413 for a body cut off at the limit, else a logged bug as 500 JSON
        (the service's error shape, not uvicorn's text/plain) quoting the request id."""
        rid = rid_header[0][1].decode()
        if not over_limit:
            log.exception("unhandled error", extra={"request_id": rid, "path": endpoint})
        if status_holder["started"]:
            return
        if over_limit:
            await self._too_large(send, rid_header, status_holder)
            return
        status_holder["status"] = 500
        await send_json(send, 500, {"error": "internal_error", "detail": f"unexpected server error; quote request id "
                                    f"{rid}"}, rid_header)

    async def _too_large(self, send, headers, status_holder) -> None:
        status_holder["status"] = 413
        await send_json(send, 413, too_large_body(self.max_body), headers)


def too_large_body(limit: int) -> dict:
    """The 413 error body."""
    return {"error": "payload_too_large", "detail": f"request body exceeds {limit} bytes"}


_KNOWN = {"/fuse", "/fuse/json", "/fuse/batch", "/healthz", "/readyz", "/metrics", "/version", "/docs",
          "/openapi.json"}
