"""The log's writer thread: lines as they were, in order; a stalled stderr stops nothing."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from order_pipeline.logs import BufferedHandler, JsonFormatter, configure_logging, flush_logs
from order_pipeline.logs import request_id as request_id_var
from order_pipeline.seldom import SeldomWarning
from order_pipeline.settings import Settings

from .launch import RUNNING, serve_argv
from .server_process import START_TIMEOUT_S, WAIT_S

PIPE_BUFFER = 65536  # Linux's default pipe capacity


@pytest.fixture(name="root_restored")
def _root_restored() -> Iterator[logging.Logger]:
    """The root logger, put back as it was after the test (its writer threads ended)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    for handler in root.handlers:
        if isinstance(handler, BufferedHandler):
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


class Blocking(io.StringIO):
    """A stream whose write blocks until `flowing` is set, as a pipe nobody reads does."""

    def __init__(self) -> None:
        super().__init__()
        self.flowing = threading.Event()
        self.blocked = threading.Event()  # a write is waiting

    def write(self, text: str) -> int:
        if not self.flowing.is_set():
            self.blocked.set()
            self.flowing.wait()
        return super().write(text)


def log_many(logger: logging.Logger, count: int) -> None:
    for n in range(count):
        request_id_var.set(f"r-{n}" if n % 2 else None)
        fields = {"n": n, "text": "é ☃ \x1b", "none": None}
        if n % 500 == 7:
            try:
                raise ValueError(f"boom {n}")
            except ValueError:
                logger.exception("failed %d", n, extra={"fields": fields})
        else:
            logger.info("line %d: é", n, extra={"fields": fields})
    request_id_var.set(None)


class Heard(logging.Handler):
    """Each line logged, with the request ID it was logged under and its fields."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[str, str | None, dict[str, Any]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", {})
        self.lines.append((record.getMessage(), request_id_var.get(), fields))


@pytest.fixture(name="heard")
def _heard() -> Iterator[tuple[logging.Logger, Heard]]:
    logger, heard = logging.getLogger("tests.seldom"), Heard()
    logger.addHandler(heard)
    yield logger, heard
    logger.removeHandler(heard)


def test_a_repeated_warning_is_said_at_once_then_a_line_a_second_counting_the_rest(
    heard: tuple[logging.Logger, Heard],
) -> None:
    """The first at once; within the second after a line, none, but counted; the first one
    after it is said with that count; the end, once a line is due, says the one left unsaid
    (under its own request ID) and the end; the next one is then said at once."""
    logger, lines = heard
    now = [0.0]
    warning = SeldomWarning(logger, "%d held: %s", "stored, after %d", clock=lambda: now[0])
    for n in range(5):  # 0 s
        request_id_var.set(f"r-{n}")
        warning.warning(n, "locked")
    now[0] = 1.0
    warning.warning(5, "locked")
    now[0] = 1.5
    for n in range(6, 9):
        request_id_var.set(f"r-{n}")
        warning.warning(n, "gone")
    request_id_var.set("r-end")
    warning.ended()  # too soon after the line at 1 s: ending, said later
    assert warning.ending
    now[0] = 2.0
    warning.ended()
    warning.warning(9, "locked")  # another outage: at once
    request_id_var.set(None)

    more = "more like it since the last such line"
    assert lines.lines == [
        ("0 held: locked", "r-0", {}),
        (f"5 held: locked (and 4 {more})", "r-4", {"more_like_it": 4}),
        (f"8 held: gone (and 2 {more})", "r-8", {"more_like_it": 2}),
        ("stored, after 9", "r-end", {"count": 9}),
        ("9 held: locked", "r-end", {}),
    ]
    said = [fields.get("more_like_it", 0) for text, _, fields in lines.lines if "held" in text]
    assert len(said) + sum(said) == 10


def test_a_repeated_warning_left_unsaid_is_said_by_a_flush(
    heard: tuple[logging.Logger, Heard],
) -> None:
    """A store that closes says what it left unsaid (no later line would), not an end."""
    logger, lines = heard
    warning = SeldomWarning(logger, "%d held", "stored, after %d", clock=lambda: 0.0)
    for n in range(1, 4):
        warning.warning(n)
    warning.flush()
    warning.flush()  # nothing more to say

    assert [message for message, _, _ in lines.lines] == [
        "1 held",
        "3 held (and 1 more like it since the last such line)",
    ]


def test_a_repeated_warning_s_lines_count_each_one_once_across_flushes_and_outages(
    heard: tuple[logging.Logger, Heard],
) -> None:
    """A line said (at once, or by a flush) leaves nothing for a later flush to say again,
    and the next line counts only those after it; each outage's end counts its own."""
    logger, lines = heard
    now = [0.0]
    warning = SeldomWarning(logger, "%d held", "stored, after %d", clock=lambda: now[0])
    warning.warning(1)
    now[0] = 0.5
    warning.warning(2)  # unsaid
    now[0] = 1.0
    warning.warning(3)  # said, counting 2
    warning.flush()  # nothing left unsaid
    now[0] = 1.5
    warning.warning(4)
    warning.warning(5)
    warning.flush()  # says 5, counting 4
    now[0] = 2.0
    warning.warning(6)  # said, counting none: 4 and 5 were counted by the flush's line
    now[0] = 3.0
    warning.ended()
    warning.warning(7)  # another outage
    now[0] = 4.0
    warning.ended()

    more = "more like it since the last such line"
    assert [message for message, _, _ in lines.lines] == [
        "1 held",
        f"3 held (and 1 {more})",
        f"5 held (and 1 {more})",
        "6 held",
        "stored, after 6",
        "7 held",
        "stored, after 1",
    ]


def test_closing_a_repeated_warning_says_the_line_left_unsaid_and_an_end_only_if_ending(
    heard: tuple[logging.Logger, Heard],
) -> None:
    """`close` with nothing lasting says nothing; with a line left unsaid, says it; with the
    end held back (`ending`), says it, but not once a warning said the outage goes on."""
    logger, lines = heard
    now = [0.0]

    def warning_line() -> SeldomWarning:
        return SeldomWarning(logger, "%d held", "stored, after %d", clock=lambda: now[0])

    quiet = warning_line()
    quiet.ended()
    quiet.close()
    assert lines.lines == []

    going_on = warning_line()
    going_on.warning(1)
    now[0] = 0.5
    going_on.ended()  # too soon: ending
    assert going_on.ending
    going_on.warning(2)  # the outage goes on: no longer ending, so close says no end
    going_on.close()

    now[0] = 10.0
    ending = warning_line()
    ending.warning(3)
    ending.warning(4)
    ending.ended()
    ending.close()

    assert [message for message, _, _ in lines.lines] == [
        "1 held",
        "2 held",
        "3 held",
        "4 held",
        "stored, after 2",
    ]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_lines_are_in_order_and_as_a_stream_handler_writes_them(
    fmt: str, tmp_path: Path, root_restored: logging.Logger
) -> None:
    """Byte for byte what logging.StreamHandler writes of the same records, in their order,
    across batches (more lines than wake the writer early)."""
    with (tmp_path / "buffered").open("w") as buffered, (tmp_path / "direct").open("w") as direct:
        configure_logging("info", fmt, buffered)
        (handler,) = root_restored.handlers
        reference = logging.StreamHandler(direct)
        reference.setFormatter(handler.formatter)
        reference.filters = handler.filters
        root_restored.addHandler(reference)

        log_many(logging.getLogger("order_pipeline.test"), 2000)
        flush_logs()

    written = (tmp_path / "buffered").read_bytes()
    assert written == (tmp_path / "direct").read_bytes()
    assert written.count(b"\n") >= 2000


def test_a_character_the_stream_cannot_encode_loses_no_line(
    tmp_path: Path, root_restored: logging.Logger
) -> None:
    """On a stream of strict ASCII (PYTHONIOENCODING=ascii:strict) a line with "é" and "😀" is
    written with JSON's escapes, and the lines of its batch with it (before: the batch's
    encoding error lost every line of it)."""
    with (tmp_path / "log").open("w", encoding="ascii", errors="strict") as stream:
        configure_logging("info", "json", stream)
        logger = logging.getLogger("order_pipeline.test.ascii")
        logger.info("before")
        logger.info("caf\u00e9 \U0001f600")
        logger.info("after")
        flush_logs()

    lines = (tmp_path / "log").read_bytes().splitlines()
    assert [json.loads(line)["message"] for line in lines] == [
        "before",
        "caf\u00e9 \U0001f600",
        "after",
    ]


def test_a_full_buffer_drops_lines_and_then_says_how_many(root_restored: logging.Logger) -> None:
    """Past its capacity (the lines being written included) a line is dropped and counted; the
    next line kept comes after one that says how many, in the log's format."""
    stream = Blocking()
    handler = BufferedHandler(stream, capacity=10, period=0.01)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("order_pipeline.test.drops")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("first")
        assert stream.blocked.wait(WAIT_S)  # the writer holds "first", blocked writing it
        for n in range(15):
            logger.warning("burst %d", n)  # 9 fit beside "first": 6 dropped
        stream.flowing.set()
        handler.flush()  # once the stream takes lines again, the count comes first
        logger.warning("after")
        handler.flush()
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        handler.close()

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["message"] for line in lines] == [
        "first",
        *(f"burst {n}" for n in range(9)),
        "6 log lines dropped: stderr was not read",
        "after",
    ]
    assert (lines[-2]["level"], lines[-2]["logger"], lines[-2]["dropped"]) == (
        "warning",
        "order_pipeline.logs",
        6,
    )


def test_the_exit_flush_gives_up_on_a_stream_that_takes_nothing() -> None:
    """A flush waits at most its `exit_wait` for a blocked stream, and then, while it stays
    blocked, not at all (logging.shutdown flushes and closes each handler)."""
    stream = Blocking()
    handler = BufferedHandler(stream, exit_wait=0.2)
    handler.setFormatter(JsonFormatter())
    try:
        handler.handle(logging.makeLogRecord({"msg": "never written"}))
        assert stream.blocked.wait(WAIT_S)

        began = time.monotonic()
        handler.flush()
        first = time.monotonic() - began
        handler.close()
        second = time.monotonic() - began - first
    finally:
        stream.flowing.set()

    assert 0.2 <= first < 2
    assert second < 0.2  # it did not wait its exit_wait again
    handler._writer.join(WAIT_S)  # once the stream takes its line, the closed writer ends
    assert not handler._writer.is_alive()


# Logs as a server does, fills stderr with more than a pipe holds, then meets a warning, an
# exception Python can only report, and one that ends a thread; says "alive" on stdout, and
# crashes.
STRAY_REPORTS = """
import logging, os, sys, threading, warnings
from order_pipeline.logs import configure_logging, flush_logs, log_stray_reports

configure_logging("info", "json")
if sys.argv[1] == "logged":
    log_stray_reports()
for n in range(int(sys.argv[2])):
    logging.getLogger("filler").info("%d %s", n, "x" * 100)
flush_logs()
warnings.simplefilter("always")
warnings.warn("stray warning", RuntimeWarning)

class Broken:
    def __del__(self):
        raise ValueError("stray unraisable")

Broken()
def fail():
    raise KeyError("stray thread")

thread = threading.Thread(target=fail, name="stray")
thread.start()
thread.join()
print("alive", flush=True)
raise RuntimeError("stray crash")
"""


def run_stray_reports(how: str, lines: int, stderr: int) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-c", STRAY_REPORTS, how, str(lines)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr)


def test_warnings_and_stray_exceptions_are_log_lines(tmp_path: Path) -> None:
    """A warning, an "Exception ignored in", a thread's exception and the process's own are
    JSON lines of the log, each with its traceback, not text on stderr beside them."""
    with (tmp_path / "stderr").open("wb") as stderr:
        process = run_stray_reports("logged", 0, stderr.fileno())
        out, _ = process.communicate(timeout=WAIT_S)
    assert (out, process.returncode) == (b"alive\n", 1)

    lines = [json.loads(line) for line in (tmp_path / "stderr").read_bytes().splitlines()]
    warning, unraisable, thread, crash = lines
    assert (warning["logger"], warning["level"]) == ("py.warnings", "warning")
    assert warning["message"].endswith("RuntimeWarning: stray warning")  # no blank line after
    assert unraisable["message"].startswith("Exception ignored in: <function Broken.__del__")
    assert "ValueError: stray unraisable" in unraisable["traceback"]
    assert thread["message"] == "exception in thread stray"
    assert "KeyError: 'stray thread'" in thread["traceback"]
    assert (crash["level"], crash["message"]) == (
        "critical",
        "uncaught exception: the process ends",
    )
    assert "RuntimeError: stray crash" in crash["traceback"]


def test_a_warning_does_not_stop_a_process_whose_stderr_is_not_read() -> None:
    """With stderr a full pipe nobody reads, a warning and the rest go to the log, which
    drops them: the thread that met them goes on, and the crash ends the process (before:
    Python wrote its reports to the pipe itself, and the thread blocked there for good)."""
    read_end, write_end = os.pipe()
    try:
        with run_stray_reports("logged", 2000, write_end) as process:  # 200 KB: it fills
            os.close(write_end)
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], WAIT_S)
            said = process.stdout.readline() if ready else b"nothing"
            try:  # the crash's line is dropped too, and the exit waits 2 s for the log
                exit_status = process.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                exit_status = None
            process.kill()
    finally:
        os.close(read_end)
    assert (said, exit_status) == (b"alive\n", 1)


def unread_bytes(fd: int) -> int:
    """How many bytes wait in the pipe whose read end is `fd`."""
    (count,) = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))
    return int(count)


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_server_whose_stderr_is_not_read_serves_and_stops_in_time(
    workers: int, tmp_path: Path
) -> None:
    """stderr a pipe nobody reads once the server listens: it still answers every order after
    the pipe is full, and SIGTERM still ends it within its hard deadline (the supervisor too,
    with --workers 2)."""
    flags = ["--shutdown-grace", "1", "--compensation-timeout", "1", "--workers", str(workers)]
    flags += ["--no-access-log", "--store", f"sqlite:///{tmp_path / 'orders.db'}"]
    hard_deadline = Settings(shutdown_grace=1, compensation_timeout=1).hard_exit_delay
    read_end, write_end = os.pipe()
    try:
        process = await trio.lowlevel.open_process(
            serve_argv(sys.executable, *flags),
            stdout=write_end,
            stderr=write_end,
        )
    finally:
        os.close(write_end)
    try:
        output = trio.lowlevel.FdStream(os.dup(read_end))
        log = b""
        with trio.fail_after(START_TIMEOUT_S):
            while not (running := RUNNING.search(log.decode(errors="replace"))):
                data = await output.receive_some()
                assert data, f"exited before listening: {log.decode(errors='replace')}"
                log += data
        await output.aclose()  # from here on nobody reads the pipe

        body = {"order_id": "o", "amount": 1, "delay_ms": {"payment": 0, "vendor": 0, "courier": 0}}
        async with httpx.AsyncClient(base_url=running.group(1), timeout=WAIT_S) as client:
            for n in range(400):  # about 600 bytes of log each: 4 pipes' worth
                with trio.fail_after(WAIT_S):
                    reply = await client.post("/order", json=dict(body, order_id=f"o-{n}"))
                assert reply.status_code == 200
        # Full: 16 pages, some part-filled by the writes before; 400 orders logged 4 times that.
        assert unread_bytes(read_end) > PIPE_BUFFER // 2

        process.send_signal(signal.SIGTERM)
        with trio.fail_after(hard_deadline):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()  # its workers, if any, drain once it is gone
            with trio.CancelScope(shield=True):
                await process.wait()
        os.close(read_end)


def test_an_exception_ignored_at_exit_after_the_log_closed_is_not_lost(tmp_path: Path) -> None:
    """An object whose `__del__` raises as the interpreter finalizes, after `logging.shutdown`
    closed the log: its "Exception ignored in" is on stderr, as Python writes it (before: the
    closed log dropped it, and nothing said so)."""
    script = (
        "from order_pipeline.logs import configure_logging, log_stray_reports\n"
        "configure_logging('info', 'json')\n"
        "log_stray_reports()\n"
        "class Broken:\n"
        "    def __del__(self):\n"
        "        raise ValueError('raised at exit')\n"
        "kept = Broken()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=WAIT_S, check=False
    )
    assert b"ValueError: raised at exit" in done.stderr, done.stderr
