"""The HTTP server: uvicorn, plus the connection guards and the shutdown sequence the service needs.

Connections (``GuardedProtocol``, uvicorn's h11 protocol with three additions):

* a cap on open connections. Over the cap, once a newcomer has had 50 ms to send its headers, the connections
  that have waited longest *between* requests (idle keep-alive or still sending headers: slow clients) are
  closed to make room; when every other connection is in a request, the newcomer gets
  ``503 too_many_connections`` (JSON) and is closed. So 20,000 slowloris sockets cannot starve
  ``/healthz``, and the process never runs out of file descriptors: at most :func:`fd_bound` are open (the
  cap, a listen backlog accepted in one go, evicted sockets awaiting their close, a reserve), and the soft fd
  limit is raised to that (or the cap lowered to fit).
* a header deadline: a request's headers must be complete ``header_timeout_s`` after the connection (or its
  previous response) was ready for them.
* a body idle timeout: a request body that stalls for ``body_timeout_s`` closes the connection; and a minimum
  rate: after its first ``body_timeout_s`` a body must have averaged ``min_body_rate`` bytes/s (the deadline moves
  on by one second per ``min_body_rate`` bytes received, as Apache's mod_reqtimeout does), else ``408`` and close.
  Over the cap, uploads below that rate are closed before idle keep-alive connections, so a flood of 1-byte/s
  uploads cannot hold every slot nor push real clients' connections out.
* a lingering close: an answer decided before the request body arrived (503 while draining or when the queue is
  full, 401, 413) is followed by a half-close, and the rest of the body is read and dropped (at most
  ``LINGER_S`` and ``LINGER_BYTES``) before the socket closes. Closing a socket with unread bytes makes the
  kernel send a reset, and a client still sending its body then loses the answer it was given.

The shutdown sequence and the entry point that runs uvicorn with these guards: app/http/shutdown.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections.abc import Callable
from typing import NamedTuple

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("dmfnet.server")

SETTLE_S = 0.05  # a newcomer over the cap gets this long to send its headers before slots are reclaimed
SLOW_GRACE_S = 0.25  # an upload is judged by its rate only after this long (a real one has sent far more by then)
HOLD_S = 1.0  # a newcomer over the cap whose request headers are complete waits up to this long for a slot: uploads
# admitted under SLOW_GRACE_S ago cannot be judged yet (slowloris clients reconnecting at once keep some slots that
# young; a real client refused at that instant lost ~1 fusion in 5 in test_slow_uploads_cannot_starve_...)
FD_RESERVE = 128  # descriptors kept for the model, logs, files and the PACS client beyond connections
BACKLOG = 1024  # asyncio accepts up to this many sockets in one go before any is handled: they need fds too
LINGER_S = 5.0  # after an early answer, how long the rest of a request body is read and dropped
LINGER_BYTES = 64 * 2**20  # ... and how much of it at most
HOLD_BYTES = 64 * 1024  # a newcomer over the cap: bytes kept before reading pauses (it is decided in SETTLE_S)


def fd_bound(cap: int) -> int:
    """Descriptors the server may hold at once: the cap, a backlog's worth over it while newcomers settle, one
    accept burst, as many evicted sockets whose close waits for the next loop iteration, as many lingering after
    an early answer, and the reserve."""
    return cap + 4 * BACKLOG + FD_RESERVE


def _raw_response(status: int, reason: str, body: dict, extra: str = "") -> bytes:
    payload = json.dumps(body).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n"
            f"connection: close\r\n{extra}\r\n")
    return head.encode() + payload


TOO_MANY = _raw_response(503, "Service Unavailable", {
    "error": "too_many_connections", "detail": "every connection slot is serving a request; retry shortly"},
    "retry-after: 1\r\n")
HEADER_TIMEOUT = _raw_response(408, "Request Timeout", {
    "error": "request_timeout", "detail": "request headers were not complete in time"})
SLOW_BODY = _raw_response(408, "Request Timeout", {
    "error": "request_timeout", "detail": "the request body arrived slower than the minimum rate (min_body_rate)"})


class ConnectionLimits(NamedTuple):
    """The connection guards' settings (see the module docstring)."""

    max_connections: int = 1000
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    min_body_rate: int = 8192


class _LingeringTransport:
    """The connection's transport as uvicorn sees it: ``close()`` while the client is still sending a request body
    half-closes instead (the answer is flushed, then FIN) and lets the protocol drop the rest of the body."""

    def __init__(self, transport: asyncio.Transport, protocol: GuardedProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:  # noqa: D102
        return self._protocol._lingering or self._transport.is_closing()

    def close(self) -> None:  # noqa: D102
        p = self._protocol
        if not p._lingering and p.conn.their_state is h11.SEND_BODY and not self._transport.is_closing() \
                and self._transport.can_write_eof():
            p._start_linger()
            return
        self._transport.close()


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with a connection cap (evicting idle/slow connections first) and read deadlines.

    The limits are class attributes: :func:`guarded_protocol` makes a subclass with the configured values.
    """

    max_connections = 1000
    header_timeout_s = 10.0
    body_timeout_s = 30.0
    min_body_rate = 8192
    uploads: set[GuardedProtocol] = set()  # connections receiving a request body (one set per server class)
    lingering: set[GuardedProtocol] = set()  # answered, dropping the rest of a body: out of the cap, bounded apart

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # noqa: D102
        self._lingering = False
        self._lingered = 0
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        self._idle_since = time.monotonic()
        self._body_started = self._last_body_data = self._idle_since
        self._body_bytes = 0
        self._read_timer: asyncio.TimerHandle | None = None
        self._held: bytearray | None = None  # bytes of a newcomer over the cap, kept from h11 until it is admitted
        if len(self.connections) > self.max_connections:  # room from clients that had their chance
            self._evict_to_cap(older_than=self._idle_since - SETTLE_S)
        over = len(self.connections) - self.max_connections
        if over > BACKLOG:  # far over and nothing to reclaim: refuse at once
            self._refuse()
            return
        self._arm(self.header_timeout_s, self._header_timeout)
        if over > 0:  # decide once its first bytes had a moment to arrive; until then they are only kept, so a
            self._held = bytearray()  # refused client's request is never decoded and always gets its 503
            self.loop.call_later(SETTLE_S, self._enforce_cap)

    @property
    def between_requests(self) -> bool:
        """No request in progress: idle keep-alive, or its headers are still arriving."""
        return self.cycle is None or self.cycle.response_complete

    def _refuse(self) -> None:
        """503 too_many_connections and close: a newcomer's request was never handed to h11 (held), so the answer
        is always a whole response; what it still sends is read and dropped (bounded) so the close is no reset."""
        if self.between_requests:
            self.transport.write(TOO_MANY)
        self._held = None
        raw = self.transport._transport  # type: ignore[attr-defined]
        if not raw.is_closing() and raw.can_write_eof():
            self._start_linger()
        else:
            raw.close()
        self.connections.discard(self)  # its slot is free now; connection_lost follows from the loop

    @property
    def holds_a_request(self) -> bool:
        """A newcomer over the cap whose request headers are complete: a real client awaiting its own decision,
        never evicted as idle by other newcomers (a slowloris's partial headers are)."""
        return self._held is not None and b"\r\n\r\n" in self._held

    @property
    def slow_upload(self) -> bool:
        """Sending a request body below the minimum rate (after a moment to get going)."""
        if self.conn.their_state is not h11.SEND_BODY or not self.min_body_rate:
            return False
        elapsed = time.monotonic() - self._body_started
        return elapsed > SLOW_GRACE_S and self._body_bytes / elapsed < self.min_body_rate

    def _evict_to_cap(self, older_than: float = float("inf")) -> None:
        """Close other connections until the count is back at the cap: uploads below the minimum rate first
        (slowest first), then those waiting between requests (slow or idle clients), longest-waiting first;
        only those idle since before ``older_than``. Runs for every newcomer over the cap, so it stays one pass
        over the connections (the uploads are tracked apart)."""
        excess = len(self.connections) - self.max_connections
        if excess <= 0:
            return
        now = time.monotonic()
        victims = sorted((c for c in self.uploads if c is not self and c.slow_upload
                          and not c.transport.is_closing()),
                         key=lambda c: c._body_bytes / max(now - c._body_started, 1e-3))[:excess]
        if len(victims) < excess:
            idle = [c for c in self.connections if c is not self and isinstance(c, GuardedProtocol)
                    and not c.holds_a_request and c.between_requests and c._idle_since < older_than
                    and not c.transport.is_closing()]
            victims += sorted(idle, key=lambda c: c._idle_since)[: excess - len(victims)]
        for c in victims:
            if c.conn.their_state is h11.SEND_BODY:
                c.transport.write(SLOW_BODY)
                log.warning("slow request body closed to make room", extra={"bytes": c._body_bytes})
            c.transport._transport.close()  # no lingering for a connection we are taking back
            self.connections.discard(c)
            self.uploads.discard(c)

    def _enforce_cap(self) -> None:
        """Over the cap once this newcomer had its moment: reclaim idle slots; if every other connection is in a
        request, this newcomer is refused (one with its whole request headers after up to ``HOLD_S``)."""
        if self.transport.is_closing():
            return
        self._evict_to_cap()
        if len(self.connections) > self.max_connections:
            if self.holds_a_request and time.monotonic() - self._idle_since < HOLD_S:
                self.loop.call_later(SLOW_GRACE_S, self._enforce_cap)  # ask again once the young ones can be judged
                return
            self._refuse()
            return
        held, self._held = self._held, None  # admitted: what arrived meanwhile goes to h11 now
        if held:
            self.data_received(bytes(held))

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._read_timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _header_timeout(self) -> None:
        if self.between_requests and not self.transport.is_closing():
            self.transport.write(HEADER_TIMEOUT)
            self.transport.close()

    def _body_deadline(self) -> float:
        """When the body is next judged: idle ``body_timeout_s`` after its last bytes; and from ``body_timeout_s``
        after it began, whenever its average rate since it began would fall below ``min_body_rate`` (the bytes
        received so far buy ``bytes / min_body_rate`` seconds from the start)."""
        idle = self._last_body_data + self.body_timeout_s
        if not self.min_body_rate:
            return idle
        paid = max(self.body_timeout_s, self._body_bytes / self.min_body_rate)
        return min(idle, self._body_started + paid)

    def _arm_body(self) -> None:
        self._arm(max(0.0, self._body_deadline() - time.monotonic()), self._body_timeout)

    def _body_timeout(self) -> None:
        if self.conn.their_state is not h11.SEND_BODY or self.transport.is_closing():
            return
        if time.monotonic() < self._body_deadline() - 1e-3:  # bytes arrived since the timer was set: re-judge then
            self._arm_body()
            return
        if self.slow_upload:  # still sending, too slowly: say so (an idle one has nobody listening)
            self.transport.write(SLOW_BODY)
            log.warning("slow request body closed", extra={"bytes": self._body_bytes})
        self.transport._transport.close()  # type: ignore[attr-defined]  # the app sees a disconnect

    def handle_events(self) -> None:  # noqa: D102
        before = self.cycle
        super().handle_events()
        if self.cycle is not before and not self.between_requests:  # headers complete: a request began
            if self.conn.their_state is h11.SEND_BODY:
                self._body_started = self._last_body_data = time.monotonic()
                self._body_bytes = 0
                self.uploads.add(self)
                self._arm_body()
            else:
                self._disarm()

    def send_400_response(self, msg: str) -> None:
        """h11's parse errors (two Content-Lengths, a NUL in a header, headers over h11's limit) as this service's
        JSON error shape, not uvicorn's text/plain."""
        detail = "malformed HTTP request (framing or header syntax): not parsed" \
            if msg.startswith("Invalid HTTP") else msg
        self.transport.write(_raw_response(400, "Bad Request", {"error": "bad_request", "detail": detail}))
        self.transport._transport.close()  # type: ignore[attr-defined]  # the stream cannot be framed: no linger

    def _start_linger(self) -> None:
        """Answer sent while the body is still arriving: half-close, then read and drop the rest (bounded). The
        connection leaves the cap (it serves nobody now: counted, it held slots that real clients needed) and
        joins at most ``BACKLOG`` others doing the same; beyond that it is closed at once."""
        raw = self.transport._transport  # type: ignore[attr-defined]
        self.connections.discard(self)
        self.uploads.discard(self)
        self._held = None
        if len(self.lingering) >= BACKLOG:
            raw.close()
            return
        self._lingering = True
        self.lingering.add(self)
        raw.write_eof()  # after the buffered answer
        raw.resume_reading()
        self._arm(LINGER_S, raw.close)

    def data_received(self, data: bytes) -> None:  # noqa: D102
        if self._lingering:  # the rest of a body nobody will read
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES:
                self.transport._transport.close()  # type: ignore[attr-defined]
            return
        if self._held is not None:  # over the cap, not admitted yet
            self._held += data
            if len(self._held) > HOLD_BYTES:
                self.transport._transport.pause_reading()  # type: ignore[attr-defined]  # TCP holds the rest
            return
        sending = self.conn.their_state is h11.SEND_BODY
        super().data_received(data)
        if sending:
            self._body_bytes += len(data)
            self._last_body_data = time.monotonic()
        if not self.between_requests:
            if self.conn.their_state is h11.SEND_BODY:
                self._arm_body()  # still arriving: the idle clock restarts, the rate deadline moves on
            else:
                self.uploads.discard(self)
                self._disarm()

    def on_response_complete(self) -> None:  # noqa: D102
        super().on_response_complete()
        self.uploads.discard(self)
        self._idle_since = time.monotonic()
        if not self.transport.is_closing():
            self._arm(self.header_timeout_s, self._header_timeout)

    def eof_received(self) -> bool | None:  # noqa: D102
        if self._lingering:  # the client sent all it had: close now
            self.transport._transport.close()  # type: ignore[attr-defined]
            return None
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: D102
        self._disarm()
        self.uploads.discard(self)
        self.lingering.discard(self)
        super().connection_lost(exc)


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft open-files limit towards ``wanted`` (up to the hard limit); returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedProtocol]:
    """A protocol class with these limits; the cap is lowered to what the fd limit allows."""
    soft = raise_fd_limit(fd_bound(limits.max_connections))
    cap = max(1, min(limits.max_connections, soft - fd_bound(0)))
    if cap < limits.max_connections:
        log.warning("connection cap lowered to fit the open-files limit",
                    extra={"max_connections": limits.max_connections, "cap": cap, "nofile": soft})
    return type("GuardedProtocol", (GuardedProtocol,), {**limits._asdict(), "max_connections": cap,
                                                         "uploads": set(), "lingering": set()})
