"""Structured logs for every process of the product (HTTP, model process, PACS commands): JSON or key=value
lines on stderr carrying request ids, timings and sizes: never pixels or patient identifiers."""

from __future__ import annotations

import json
import logging
import sys
import time


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
