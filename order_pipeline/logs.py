"""Logging set-up: one JSON object a line (or text), with the request ID on every line.

`request_id` is a context variable: the HTTP layer sets it for each request, and
Trio copies the context into every task the request starts, so the order's step
and compensation logs carry it too.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

import orjson

__all__ = ["JsonFormatter", "configure_logging", "request_id"]

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """Renders a record as one JSON object; `extra={"fields": {...}}` adds keys."""

    # The time's second, written once a second (a datetime for each line cost a fifth of the
    # line); one tuple, so that a formatter shared by two threads' handlers reads a pair whole.
    _second: tuple[int, str] = (-1, "")

    def _time(self, record: logging.LogRecord) -> str:
        """`2026-11-28T21:20:05.123+00:00`: UTC, to the millisecond (the record's own msecs)."""
        second, written = self._second
        if int(record.created) != second:
            second = int(record.created)
            written = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = (second, written)
        return f"{written}.{int(record.msecs):03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self._time(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            line["request_id"] = rid
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """For people: a record's message, then its fields as key=value.

    A record made with `extra={"summary": True}` (an order's line) says it all in
    its message already, so its fields are left to the JSON format.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = getattr(record, "request_id", None)
        fields = {} if getattr(record, "summary", False) else getattr(record, "fields", {})
        extra = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in fields.items())
        return " ".join(p for p in (text, f"request_id={rid}" if rid else "", extra) if p)


def configure_logging(
    level: str = "info", fmt: str = "json", stream: IO[str] | None = None
) -> None:
    """Send every log record to `stream` (stderr) in `fmt`, from `level` up.

    Records skip what no line of ours shows (the caller's file and line, the
    thread, the multiprocessing name): the logging HOWTO's "Optimization" switches,
    a fifth of the instructions of each order's line.
    """
    logging._srcfile = None  # documented in the HOWTO, though private
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Its warnings are about a caller's malformed `tracestate` (left out anyway): one line per
    # such request would let any client fill the log.
    logging.getLogger("opentelemetry.trace.span").setLevel(logging.ERROR)
