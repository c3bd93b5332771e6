"""Logging set-up: one JSON object a line (or text), with the request ID on every line.

`request_id` is a context variable: the HTTP layer sets it for each request, and
Trio copies the context into every task the request starts, so the order's step
and compensation logs carry it too.

Lines are written by a thread of their own (`BufferedHandler`), never by the thread
that logs: a reader of stderr that stops reading would otherwise stop the Trio thread
in write(), and with it the serving, the drain and the hard deadline.
"""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import json
import logging
import os
import re
import sys
import threading
import time
from datetime import UTC, datetime
from types import TracebackType
from typing import IO, Any, Final

import orjson

__all__ = [
    "ANY_LEVEL",
    "BufferedHandler",
    "JsonFormatter",
    "configure_logging",
    "flush_logs",
    "log_at_any_level",
    "log_stray_reports",
    "request_id",
    "write_line",
]

# The writer thread writes what has accumulated this often (or once WAKE_AT lines wait): one
# write of many lines, and no hand-over to another thread per line (docs/performance.md).
PERIOD_S: Final = 0.05
WAKE_AT: Final = 512
# Lines waiting to be written, those being written included: a burst of thousands (orders'
# lines are about 600 bytes: 6 MB at most). Past it a line is dropped and counted.
CAPACITY: Final = 10_000
# How long a flush (at exit) waits for a stream that takes nothing before it gives up.
EXIT_WAIT_S: Final = 2.0


def _json_escape(error: UnicodeError) -> tuple[str, int]:
    """Characters an encoding lacks as JSON's escapes (`\\u00e9`), valid in a JSON line's
    strings, where every such character of ours is (and readable in a text line)."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    escaped = error.object[error.start : error.end].encode("utf-16-be", "surrogatepass")
    units = (escaped[n : n + 2].hex() for n in range(0, len(escaped), 2))
    return "".join(f"\\u{unit}" for unit in units), error.end


_JSON_ESCAPE: Final = "order_pipeline.json_escape"
codecs.register_error(_JSON_ESCAPE, _json_escape)

# `extra=ANY_LEVEL`: a line of the server's life ("Running on", the drain's start, the last
# line), logged whatever `--log-level` (README) by a logger given to `log_at_any_level`.
ANY_LEVEL: Final = {"any_level": True}

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


# Line breaks (Python's, a terminal's, Unicode's) and the other control characters.
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(match: re.Match[str]) -> str:
    return repr(match.group())[1:-1]  # \n, \x1b, \u2028


class TextFormatter(logging.Formatter):
    """For people: a record's message, then its fields as key=value.

    A record made with `extra={"summary": True}` (an order's line) says it all in
    its message already, so its fields are left to the JSON format. A message holds what
    clients sent (an order_id, a decoded path in hypercorn's access line): its control
    characters are escaped, so that a client cannot end a line and forge the next one.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _CONTROL.sub(_escaped, super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = getattr(record, "request_id", None)
        fields = {} if getattr(record, "summary", False) else getattr(record, "fields", {})
        extra = " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in fields.items())
        return " ".join(p for p in (text, f"request_id={rid}" if rid else "", extra) if p)


class BufferedHandler(logging.Handler):
    """Formats each record on the thread that logs it (where its request ID is) and leaves
    the line to a daemon writer thread, which wakes every `period` seconds (sooner once
    WAKE_AT lines wait) and writes all that waits at once.

    A stream that does not take lines (a stalled reader of a pipe) then stops only the
    writer: past `capacity` waiting lines, each new one is dropped and counted, and the
    next line kept is preceded by one that says how many were dropped. `flush` (and so
    `close`, and `logging.shutdown` at exit) waits at most `exit_wait` seconds, and not at
    all again until the stream takes a line. A stream with a file descriptor is written
    with os.write, so that the writer, blocked, holds no lock of the stream's that the
    interpreter's exit would wait for.
    """

    def __init__(
        self,
        stream: IO[str],
        *,
        period: float = PERIOD_S,
        capacity: int = CAPACITY,
        exit_wait: float = EXIT_WAIT_S,
    ) -> None:
        super().__init__()
        self.stream = stream
        self._period, self._capacity, self._exit_wait = period, capacity, exit_wait
        self._encoding = getattr(stream, "encoding", None) or "utf-8"
        # A character the encoding lacks is escaped, not an error: a batch is written at once,
        # and an error would lose every line of it.
        self._errors = _JSON_ESCAPE
        try:
            self._fd: int | None = stream.fileno()
            stream.flush()  # what it holds comes first
        except (AttributeError, OSError, ValueError):  # io.StringIO, pytest's capsys
            self._fd = None
        self._lock = threading.Lock()  # what follows (held briefly: a list's append or swap)
        self._written_more = threading.Condition(self._lock)
        self._lines: list[str] = []
        self._writing = 0  # lines the writer has taken and not yet written
        self._written = 0
        self._dropped = 0
        self._stalled = False  # a flush gave up: the next does not wait
        self._closed = False
        self._wake = threading.Lock()  # held but when released to wake the writer early
        self._wake.acquire()
        self._writer = threading.Thread(target=self._write_forever, name="log writer", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        with self._lock:
            waiting = len(self._lines)
            if self._closed or waiting + self._writing >= self._capacity:
                self._dropped += 1
                return
            if self._dropped:
                self._say_dropped()
            self._lines.append(line)
        if waiting + 1 == WAKE_AT:
            self._wake_writer()

    def put_line(self, text: str) -> None:
        """`text` as written, a line of its own after those logged before (not formatted)."""
        with self._lock:
            self._lines.append(text + "\n")

    def flush(self) -> None:
        """Wait until what was logged before is written: at most `exit_wait` seconds."""
        with self._lock:
            if self._dropped:
                self._say_dropped()
            target = self._written + self._writing + len(self._lines)
            if self._written >= target or self._stalled or self._closed:
                return
        self._wake_writer()
        with self._written_more:
            if not self._written_more.wait_for(lambda: self._written >= target, self._exit_wait):
                self._stalled = True

    def close(self) -> None:
        """Flush (for at most `exit_wait` seconds), then end the writer; later lines are
        dropped."""
        self.flush()
        with self._lock:
            self._closed = True
        self._wake_writer()
        super().close()

    def _say_dropped(self) -> None:
        """Queue the line that says how many lines were dropped (with `_lock` held)."""
        dropped, self._dropped = self._dropped, 0
        record = logging.makeLogRecord(
            {
                "name": __name__,
                "levelno": logging.WARNING,
                "levelname": "WARNING",
                "msg": "%d log lines dropped: stderr was not read",
                "args": (dropped,),
                "fields": {"dropped": dropped},
            }
        )
        self._lines.append(self.format(record) + "\n")

    def _wake_writer(self) -> None:
        with contextlib.suppress(RuntimeError):  # already released: the writer is waking
            self._wake.release()

    def _write_forever(self) -> None:
        while True:
            self._wake.acquire(timeout=self._period)
            if not (self._lines or self._closed):  # read without the lock: a hint, idle
                continue
            with self._lock:
                batch, self._lines = self._lines, []
                self._writing = len(batch)
                closed = self._closed
            if batch:
                self._write("".join(batch))
                with self._written_more:
                    self._written += self._writing
                    self._writing = 0
                    self._stalled = False
                    self._written_more.notify_all()
            if closed:
                return

    def _write(self, text: str) -> None:
        """Write `text` whole, however long the stream takes; a stream that is gone (EPIPE, a
        closed file) has nobody to tell: the text is dropped."""
        try:
            if self._fd is None:
                self.stream.write(text)
                self.stream.flush()
                return
            data = memoryview(text.encode(self._encoding, self._errors))
            while data:
                try:
                    data = data[os.write(self._fd, data) :]
                except BlockingIOError:  # a non-blocking descriptor: wait, as a blocking one
                    time.sleep(self._period)
        except (OSError, ValueError):
            pass


def _buffered_handlers() -> list[BufferedHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, BufferedHandler)]


def flush_logs() -> None:
    """Write what the log holds before the process ends (`os._exit` skips `logging.shutdown`),
    or before something else writes to stderr: at most EXIT_WAIT_S."""
    for handler in _buffered_handlers():
        handler.flush()


def write_line(text: str) -> None:
    """`text` on stderr, after the log lines before it and, like them, without waiting on a
    stderr nobody reads (a command's last words before it exits)."""
    handlers = _buffered_handlers()
    if not handlers:
        print(text, file=sys.stderr)
        return
    handlers[0].put_line(text)
    handlers[0].flush()


def configure_logging(
    level: str = "info", fmt: str = "json", stream: IO[str] | None = None
) -> None:
    """Send every log record to `stream` (stderr) in `fmt`, from `level` up, through a
    `BufferedHandler`; a handler this replaces is closed (flushed).

    Records skip what no line of ours shows (the caller's file and line, the
    thread, the multiprocessing name): the logging HOWTO's "Optimization" switches,
    a fifth of the instructions of each order's line.
    """
    logging._srcfile = None  # documented in the HOWTO, though private
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = BufferedHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    for replaced in _buffered_handlers():
        replaced.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Its warnings are about a caller's malformed `tracestate` (left out anyway): one line per
    # such request would let any client fill the log.
    logging.getLogger("opentelemetry.trace.span").setLevel(logging.ERROR)


def log_at_any_level(*loggers: logging.Logger) -> None:
    """Let `loggers` log their `ANY_LEVEL` lines below the level `configure_logging` set
    (down to info), and only those: their other lines still meet that level."""
    level = logging.getLogger().level
    for logger in loggers:
        logger.setLevel(min(logging.INFO, level))
        logger.addFilter(_marked_or_at_level)


def _marked_or_at_level(record: logging.LogRecord) -> bool:
    return getattr(record, "any_level", False) or record.levelno >= logging.getLogger().level


def log_stray_reports() -> None:
    """Warnings, exceptions Python can only report (`sys.unraisablehook`: "Exception ignored
    in"), those that end a thread and the one that ends the process go to the log, as lines
    of it: Python writes them straight to stderr, from the thread that met them, which a
    stderr nobody reads would then stop (the Trio thread, and with it the serving, the drain
    and the hard deadline; at a crash, the exit)."""
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").addFilter(_without_final_newline)
    sys.unraisablehook = _log_unraisable
    threading.excepthook = _log_thread_exception
    sys.excepthook = _log_uncaught


_stray = logging.getLogger(__name__)


def _without_final_newline(record: logging.LogRecord) -> bool:
    """A warning's text (`warnings.formatwarning`) ends with a newline: a blank line after it
    in the text format, and a stray "\\n" in the JSON one."""
    record.msg, record.args = record.getMessage().rstrip("\n"), None
    return True


def _log_closed() -> bool:
    """The log is closed (`logging.shutdown`, at exit), and would drop a report unsaid: one
    met in the interpreter's finalization (an object's `__del__`, a daemon thread) goes to
    Python's own hook, on stderr, unless the log found stderr unread (stalled)."""
    handlers = _buffered_handlers()
    return bool(handlers) and all(h._closed and not h._stalled for h in handlers)


def _log_unraisable(report: Any) -> None:  # sys.UnraisableHookArgs
    if _log_closed():
        sys.__unraisablehook__(report)
        return
    exc_info = (report.exc_type, report.exc_value, report.exc_traceback)
    where = f": {report.object!r}" if report.object is not None else ""
    _stray.error("%s%s", report.err_msg or "Exception ignored in", where, exc_info=exc_info)


def _log_thread_exception(report: threading.ExceptHookArgs) -> None:
    if report.exc_type is SystemExit:  # as threading's own hook: a thread's quiet end
        return
    if _log_closed():
        threading.__excepthook__(report)
        return
    name = report.thread.name if report.thread is not None else "a thread"
    exc_info = (report.exc_type, report.exc_value, report.exc_traceback)
    _stray.error("exception in thread %s", name, exc_info=exc_info)  # type: ignore[arg-type]


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, traceback: TracebackType | None
) -> None:
    if _log_closed():
        sys.__excepthook__(exc_type, exc, traceback)
        return
    _stray.critical("uncaught exception: the process ends", exc_info=(exc_type, exc, traceback))
