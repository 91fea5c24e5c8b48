"""The server's shutdown, and the entry point that runs uvicorn with the connection guards of app/http/server.py.

Shutdown (``FusionServer``): on SIGTERM the socket stays open while the app drains (new fusion requests are
answered ``503 shutting_down``, readiness is 503, queued and running work gets ``shutdown_grace_s``, whatever is
left is answered 503 JSON), and only then does uvicorn's own shutdown run, so its graceful timeout never cancels
a request underneath the app; an upload still arriving when that grace ends is answered 503 JSON by the
middleware as its task is cancelled. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn

from app.engine.memory import keep_buffers_for_reuse
from app.http.server import BACKLOG, ConnectionLimits, guarded_protocol

log = logging.getLogger("dmfnet.server")

ANSWER_FLUSH_S = 5.0  # after the drain: time for the 503 answers to be written before uvicorn's shutdown
UVICORN_GRACE_S = 5  # uvicorn's own graceful timeout: by then only idle connections are left


class FusionServer(uvicorn.Server):
    """uvicorn's server whose first SIGTERM/SIGINT drains the app before uvicorn's shutdown begins."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[int]]) -> None:
        super().__init__(config)
        self._drain_app = drain
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:  # noqa: ANN001, D102
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:  # noqa: D102
        if self._loop is None or self.should_exit:
            super().handle_exit(sig, frame)  # before start-up, or after the drain: uvicorn's own handling
            return
        if self._draining:  # a second signal during the drain: exit now, unfinished requests are cut off
            self._captured_signals.append(sig)
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        self._captured_signals.append(sig)  # re-raised after shutdown, as uvicorn does
        log.info("draining", extra={"signal": signal.Signals(sig).name})
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        assert self._loop is not None
        self._drain_task = self._loop.create_task(self._drain())  # referenced: a bare task may be collected

    async def _drain(self) -> None:
        try:
            answered = await self._drain_app()
            log.info("drained", extra={"answered_503": answered})
            deadline = time.monotonic() + ANSWER_FLUSH_S
            while self.server_state.tasks and time.monotonic() < deadline:  # let the 503s go out
                await asyncio.sleep(0.02)
        finally:
            self.should_exit = True


def run(app, host: str, port: int, log_level: str, limits: ConnectionLimits,  # noqa: ANN001
        drain: Callable[[], Awaitable[int]]) -> None:
    """Serve ``app`` until a signal, with these connection guards."""
    keep_buffers_for_reuse()  # every pair's arrays reuse freed heap instead of new pages (app/engine/memory.py)
    config = uvicorn.Config(app, host=host, port=port, log_config=None, log_level=log_level,
                            http=guarded_protocol(limits), backlog=BACKLOG,
                            timeout_graceful_shutdown=UVICORN_GRACE_S,
                            lifespan="on")
    FusionServer(config, drain).run()
