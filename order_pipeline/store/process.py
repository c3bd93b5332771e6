"""A SQL store run in a process of its own (the store process), so that its Python never
waits for the server's GIL.

In one process, the writer thread's every wake-up (an operation queued, the database's
answer) needs the GIL that the Trio thread holds while it serves: handing work twice per
order to a thread that does nothing cost S2's p50 about what the SQLite store did (see
docs/performance.md, "What the S2 gap is not"). Here the server's side of a call is a pickle,
a `send` and, when the answer arrives, a `recv` by one Trio task; the backend's own code
(sqlite.py, postgres.py, unchanged) runs in the store process.

The wire, a socket pair, carries frames (a 4-byte length, then a pickle):
- to the store process: the store's URL and log level first; then lists of calls
  `(call id or None, method name, args, kwargs)` in the order they were made (None as a call
  id: nobody waits for it, as `record_step`); `None` to close.
- from it: `("opened", None)` or `("failed", the exception that opening raised)`; then
  `("done", [(call id, ok, result or exception), ...])`; and `("log", record)`: its log
  records, which the server logs as its own.

The store process takes every call that has arrived, starts each method's coroutine, which
suspends at its `_call` (writer.py's `BatchRun`), runs all their operations as one batch
(group commit, as the writer thread does), resumes them and sends the results in one frame.

Semantics are the writer thread's: a call is cancellable until it is sent and not after; a
record nobody waits for rides on the next call that waits. A call the other side cannot take
(arguments or a result that cannot be pickled, a method called wrongly) fails alone, as an
operation does in a batch. If the store process dies (killed, out of memory), every waiting
call raises StoreUnavailable, so does every later one, and `on_lost` is called: the server
then exits, as if the database code had crashed it, and its orders are recovered by lease.
A store process that answers nothing for `UNRESPONSIVE_AFTER` while a call waits (stopped,
or stuck where its store's own bounds do not reach) is killed, and so taken for dead the same
way: its callers would otherwise wait as long, their calls sent and no longer cancellable.
If the server dies, the store process reads the end of the socket, runs what it has received
and exits. It runs in a process group of its own and ignores SIGINT and SIGTERM: the server
closes it once its own drain is over.
"""

from __future__ import annotations

import logging
import math
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Coroutine
from contextlib import suppress
from types import TracebackType
from typing import Any, Final, Self

import trio

from .base import StoreError, StoreUnavailable
from .writer import Op, WriterThread, cannot_abort, log_lost, settle_unwaited

__all__ = ["StoreProcess", "serve_store"]

logger = logging.getLogger(__name__)

_LENGTH: Final = struct.Struct("!I")
# The store process imports what the server imports: its modules, from its sys.path.
_CHILD: Final = (
    "import sys; sys.path[:] = {path!r};"
    " from order_pipeline.store.process import serve_store; serve_store({fd})"
)
Call = tuple[int | None, str, tuple[Any, ...], dict[str, Any]]
# Seconds without an answer while a call waits before the store process is taken for dead:
# well past the longest a PostgreSQL batch takes (postgres.py: STALL_TIMEOUTS times its
# `timeout` for its tries, up to two more for a lost commit's outcome: about 25 s at 5 s),
# for a store process wrongly killed costs its server's orders in flight.
UNRESPONSIVE_AFTER: Final = 60.0


class _Waiting:
    __slots__ = ("error", "result", "sent_at", "task")

    def __init__(self, task: trio.lowlevel.Task, sent_at: float) -> None:
        self.task = task
        self.sent_at = sent_at
        self.result: Any = None
        self.error: BaseException | None = None


def _awaited(name: str) -> Any:
    """A store method that waits for its answer from the store process."""

    async def call(self: StoreProcess, *args: Any, **kwargs: Any) -> Any:
        return await self._call(name, *args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


def _held(name: str) -> Any:
    """A store method nobody waits for: held until the next call that waits."""

    def call(self: StoreProcess, *args: Any, **kwargs: Any) -> None:
        self._hold(name, *args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


class StoreProcess:
    """An `OrderStore` whose backend runs in a store process; `async with` starts and stops it.

    `url` names a SQL backend (`parse_store_url`); `on_lost(message)` is called in the Trio
    thread if the store process ends before it is closed (it must not raise), or is killed
    for answering nothing for `unresponsive_after` seconds while a call waited.
    """

    def __init__(
        self,
        url: str,
        on_lost: Callable[[str], None],
        *,
        unresponsive_after: float = UNRESPONSIVE_AFTER,
    ) -> None:
        self._url = url
        self._on_lost = on_lost
        self._unresponsive_after = unresponsive_after
        self._answered_at = -math.inf  # when the last answer came (trio.current_time())
        self._killed: str | None = None  # why _kill_if_unresponsive killed it
        self._sock: socket.socket  # the server's end of the socket pair, from __aenter__
        self._process: trio.Process | None = None
        self._out = bytearray()  # frames the socket has not taken yet
        self._to_flush = trio.Event()  # set: `_out` holds what the pump sends when it can
        self._riding: list[Call] = []
        self._waiting: dict[int, _Waiting] = {}
        self._next_id = 0
        self._serving = False  # opened, not yet closing, not lost
        self._closing = False
        self._lost: str | None = None
        self._opened = trio.Event()
        self._open_error: BaseException | None = None
        self._ended = trio.Event()  # the pump read the socket's end

    @property
    def pid(self) -> int | None:
        """The store process's, while it runs (for its metrics)."""
        if self._process is None or self._process.returncode is not None:
            return None
        return self._process.pid

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        level = logging.getLogger().getEffectiveLevel()
        self._sock, child_sock = socket.socketpair()
        self._sock.setblocking(False)
        with child_sock:
            try:
                self._process = await trio.lowlevel.open_process(
                    [
                        sys.executable,
                        "-P",  # sys.path is the server's, set by _CHILD
                        "-c",
                        _CHILD.format(path=sys.path, fd=child_sock.fileno()),
                    ],
                    pass_fds=(child_sock.fileno(),),
                    stdin=subprocess.DEVNULL,
                    process_group=0,  # a terminal's Ctrl+C is the server's to handle
                )
            except BaseException:
                self._sock.close()
                raise
        self._send(_frame((self._url, level)))
        trio.lowlevel.spawn_system_task(self._pump, name="store process pump")
        with trio.CancelScope(shield=True):  # the store process opens the store whatever happens
            await self._opened.wait()
            if self._open_error is not None:
                await self._ended.wait()
                await self._process.wait()
                raise self._open_error
        self._serving = self._lost is None
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Send what is held, let the store process commit it and close, and wait for it."""
        if not self._serving or self._process is None:
            return
        self._serving = False
        self._closing = True
        # One piece, read at once: a close's held records read apart from its end would be
        # run as a batch of their own, then tried again at the end (see `_serve_calls`).
        self._send(self._frame_held() + _frame(None))
        with trio.CancelScope(shield=True):
            await self._ended.wait()
            status = await self._process.wait()
        if status:
            logger.error(
                "the store process ended with exit status %d while closing: what it held may"
                " not be stored",
                status,
            )

    # -- the Trio side --------------------------------------------------------------------

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        self._next_id += 1
        frame = self._frame_held((self._next_id, name, args, kwargs))
        waiting = _Waiting(trio.lowlevel.current_task(), trio.current_time())
        self._waiting[self._next_id] = waiting
        self._send(frame)
        await trio.lowlevel.wait_task_rescheduled(cannot_abort)  # as writer.py's, once sent
        if waiting.error is not None:
            raise waiting.error
        return waiting.result

    def _hold(self, name: str, *args: Any, **kwargs: Any) -> None:
        """A call nobody waits for: it goes with the next call that waits (or the close)."""
        self._check_open()
        self._riding.append((None, name, args, kwargs))

    def _check_open(self) -> None:
        if self._lost is not None:
            raise StoreUnavailable(self._lost)
        if not self._serving:
            raise StoreUnavailable("the store is closed")

    def _frame_held(self, call: Call | None = None) -> bytes:
        """One frame of the held calls and `call`, which are then no longer held.

        A held call that cannot be pickled is dropped with a line in the log, as a record
        the store could not take; StoreUnavailable if `call` cannot be (the rest stay held).
        """
        calls = self._riding if call is None else [*self._riding, call]
        try:
            frame = _frame(calls)
        except Exception:  # rare: find which
            kept = []
            for held in self._riding:
                if _pickles(held):
                    kept.append(held)
                else:
                    logger.error("%s not stored: its arguments cannot be pickled", held[1])
            self._riding = kept
            if call is not None and not _pickles(call):
                raise StoreUnavailable(f"{call[1]}: its arguments cannot be pickled") from None
            return self._frame_held(call)
        self._riding = []
        return frame

    def _send(self, frame: bytes) -> None:
        if self._out:  # the pump is sending what the socket did not take: after it
            self._out += frame
            return
        try:
            sent = self._sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._broken()
            return
        if sent < len(frame):
            self._out += frame[sent:]
            self._to_flush.set()

    def _broken(self) -> None:
        """The socket failed: end it both ways, so the pump reads its end (and the store
        process too) instead of calls waiting for frames that were lost."""
        with suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    async def _pump(self) -> None:
        """Read the store process's frames until the socket ends; send what `_send` left."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._flush_forever)
                nursery.start_soon(self._kill_if_unresponsive)
                await self._read_until_end()
                nursery.cancel_scope.cancel()
        except Exception:  # a bug of ours: the server must not hang on it
            logger.exception("the store process's frames could not be read")
            assert self._process is not None
            self._process.kill()
        finally:  # (Cancelled too: the run ends without a close)
            self._sock.close()  # the store process reads the end, if it has not yet
        await self._ended_now()

    async def _flush_forever(self) -> None:
        while True:
            await self._to_flush.wait()
            while self._out:
                await trio.lowlevel.wait_writable(self._sock)
                try:
                    del self._out[: self._sock.send(self._out)]
                except BlockingIOError:
                    pass
                except OSError:
                    self._out.clear()
                    self._broken()
            self._to_flush = trio.Event()

    async def _kill_if_unresponsive(self) -> None:
        """Kill the store process once it has answered nothing for `unresponsive_after` while
        a call waited: its end then fails every call and calls `on_lost`, as a death does."""
        # Two looks in a row, with no answer read between them, not one: this process may
        # have been paused itself, the answer waiting in the socket for the reader's turn.
        looks, answered = 0, self._answered_at
        while looks < 2:
            await trio.sleep(min(1.0, self._unresponsive_after / 4))
            if not self._waiting or self._answered_at != answered:
                looks, answered = 0, self._answered_at
                continue
            oldest = next(iter(self._waiting.values()))  # a dict keeps the order of sending
            silent = trio.current_time() - max(self._answered_at, oldest.sent_at)
            looks = looks + 1 if silent > self._unresponsive_after else 0
        self._killed = (
            f"the store process answered nothing for {self._unresponsive_after:g} s: killed"
        )
        assert self._process is not None
        self._process.kill()

    async def _read_until_end(self) -> None:
        buffer = bytearray()
        while True:
            await trio.lowlevel.wait_readable(self._sock)
            try:
                data = self._sock.recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                return
            buffer += data
            for message in _take_frames(buffer):
                self._received(message)

    def _received(self, message: tuple[str, Any]) -> None:
        what, value = message
        if what == "done":
            self._answered_at = trio.current_time()
            for call_id, ok, result in value:
                waiting = self._waiting.pop(call_id)
                if ok:
                    waiting.result = result
                else:
                    waiting.error = result
                trio.lowlevel.reschedule(waiting.task)
        elif what == "log":
            record = logging.makeLogRecord(value)
            logging.getLogger(record.name).handle(record)
        else:  # "opened" or "failed"
            self._open_error = value
            self._opened.set()

    async def _ended_now(self) -> None:
        """The store process's socket ended: expected after the close, else it died."""
        assert self._process is not None
        if not self._opened.is_set():
            with trio.CancelScope(shield=True):
                status = await self._process.wait()
            self._open_error = StoreError(
                f"the store process ended before it opened the store (exit status {status})"
            )
            self._opened.set()
        elif self._open_error is None and (not self._closing or self._waiting):
            with trio.CancelScope(shield=True):
                status = await self._process.wait()
            ended = self._killed or "the store process ended unexpectedly"
            self._lost = f"{ended} (exit status {status})"
            for waiting in self._waiting.values():
                waiting.error = StoreUnavailable(self._lost)
                trio.lowlevel.reschedule(waiting.task)
            self._waiting.clear()
            if self._closing:  # nobody else says so
                logger.error("%s", self._lost)
            else:
                self._serving = False
                try:
                    self._on_lost(self._lost)
                except Exception:
                    logger.exception("on_store_process_lost failed")
        self._ended.set()

    # -- the store's calls: base.OrderStore's, each sent as it is -------------------------

    begin = _awaited("begin")
    restart = _awaited("restart")
    record_step = _held("record_step")
    finish = _awaited("finish")
    finish_soon = _held("finish_soon")
    get = _awaited("get")
    finished_reply = _awaited("finished_reply")
    list_orders = _awaited("list_orders")
    renew_lease = _awaited("renew_lease")
    release_lease = _awaited("release_lease")
    claim_interrupted = _awaited("claim_interrupted")
    running_of = _awaited("running_of")
    charge = _awaited("charge")
    refund = _awaited("refund")
    net_charge = _awaited("net_charge")
    purge = _awaited("purge")


def _frame(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def _take_frames(buffer: bytearray) -> list[Any]:
    """The messages of the whole frames at the start of `buffer`, taken out of it."""
    messages = []
    start = 0
    while len(buffer) - start >= _LENGTH.size:
        (length,) = _LENGTH.unpack_from(buffer, start)
        end = start + _LENGTH.size + length
        if len(buffer) < end:
            break
        messages.append(pickle.loads(buffer[start + _LENGTH.size : end]))
        start = end
    del buffer[:start]
    return messages


# -- the store process ----------------------------------------------------------------------


class _Wire:
    """The store process's end of the socket pair: frames in, frames out (from any thread:
    a backend's threads, such as psycopg_pool's, may log)."""

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)
        self._buffer = bytearray()
        self._sending = threading.Lock()

    def send(self, message: Any) -> None:
        frame = _frame(message)
        with self._sending:
            self._sock.sendall(frame)

    def receive(self) -> list[Any]:
        """Every whole frame that has arrived, waiting for one if none has; [] at the end."""
        messages: list[Any] = []
        while not messages:
            try:
                data = self._sock.recv(1 << 20)
            except OSError:  # ECONNRESET: the server died with frames of ours unread
                return []
            if not data:
                return []
            self._buffer += data
            messages = _take_frames(self._buffer)
        return messages


class _ToServer(logging.Handler):
    """Sends each log record to the server, which logs it as its own."""

    def __init__(self, wire: _Wire) -> None:
        super().__init__()
        self._wire = wire

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            if record.exc_info:
                message += "\n" + logging.Formatter().formatException(record.exc_info)
            fields = dict(record.__dict__, msg=message, args=None, exc_info=None, exc_text=None)
            if not _pickles(fields):  # an `extra` value that cannot be: the rest
                fields = {k: v for k, v in fields.items() if _pickles(v)}
            self._wire.send(("log", fields))
        except OSError:
            pass  # the server is gone: nobody to log to
        except Exception:
            self.handleError(record)


def serve_store(fd: int) -> None:
    """The store process: open the store the server names, then serve its calls until it
    closes the socket pair (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    wire = _Wire(fd)
    first = wire.receive()
    if not first:
        return
    url, level = first[0]
    root = logging.getLogger()
    root.handlers[:] = [_ToServer(wire)]
    root.setLevel(level)

    from . import parse_store_url, sql_backend  # the package imports this module

    try:
        store = sql_backend(parse_store_url(url))
        store._open_driven()
    except Exception as exc:
        with suppress(OSError):
            wire.send(("failed", _picklable(exc)))
        return
    try:
        wire.send(("opened", None))
        _serve_calls(store, wire, first[1:])
    except OSError:  # EPIPE: the server died before it read our answers
        pass
    finally:
        store._close()


def _serve_calls(store: WriterThread[Any], wire: _Wire, messages: list[Any]) -> None:
    suspended: dict[Op[Any, Any], tuple[int, Coroutine[Any, Any, Any]]] = {}
    closing = False
    again: list[Op[Any, Any]] = []  # kept records to hold again (writer.py `_hold_again`)
    stored = False  # records held before were stored (writer.py `_hold_again`)
    while True:
        replies: list[tuple[int, bool, Any]] = []
        if not store._riding:  # nothing to run: wait for calls
            if closing:
                store._hold_again([], stored)
                store._held_line.close()  # the end, if the close's batch stored them
                return
            messages = messages or wire.receive()
            if not messages:  # the server is gone: nothing more will come
                store._held_line.flush()
                for op in again:
                    log_lost(op)
                return
            called = False
            for message in messages:
                if message is None:
                    closing = True
                    continue
                for call_id, name, args, kwargs in message:
                    called = True
                    _start(store, call_id, name, args, kwargs, suspended, replies)
            messages = []
            if not (called or closing):  # the close's held frame, read apart from its end:
                continue  # no call for them to ride on, and trying them now adds a batch
            store._hold_again(again, stored)  # they ride on what has come
            again, stored = [], False
            if closing:
                store._held_line.flush()  # what it left unsaid, before what the close loses
        ops, store._riding = store._riding, []
        if ops:
            store._run_handed(ops)
        for op in ops:
            if op in suspended:
                call_id, coroutine = suspended.pop(op)
                _advance(call_id, coroutine, suspended, replies)
            else:
                stored |= settle_unwaited(op, again, closing=closing)
        if replies:
            try:
                wire.send(("done", replies))
            except OSError:
                raise
            except Exception:  # a result that cannot be pickled: its caller gets why
                wire.send(("done", [_picklable_reply(reply) for reply in replies]))


def _start(
    store: WriterThread[Any],
    call_id: int | None,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    suspended: dict[Op[Any, Any], tuple[int, Coroutine[Any, Any, Any]]],
    replies: list[tuple[int, bool, Any]],
) -> None:
    try:
        called = getattr(store, name)(*args, **kwargs)
    except Exception as exc:  # a bug of the server's: its caller (or the log) gets it
        if call_id is None:
            logger.error("%s not stored: %s", name, exc)
        else:
            replies.append((call_id, False, _picklable(exc)))
        return
    if call_id is not None:
        _advance(call_id, called, suspended, replies)


def _advance(
    call_id: int,
    coroutine: Coroutine[Any, Any, Any],
    suspended: dict[Op[Any, Any], tuple[int, Coroutine[Any, Any, Any]]],
    replies: list[tuple[int, bool, Any]],
) -> None:
    """Run a call's coroutine to its next operation (its batch not yet run) or its end."""
    try:
        op = coroutine.send(None)
    except StopIteration as done:
        replies.append((call_id, True, done.value))
    except Exception as exc:
        replies.append((call_id, False, _picklable(exc)))
    else:
        if isinstance(op, Op):
            suspended[op] = (call_id, coroutine)
        else:  # a backend's bug: its call awaited something only Trio could give it
            coroutine.close()
            replies.append((call_id, False, StoreUnavailable(f"awaited {op!r} outside Trio")))


def _picklable(exc: Exception) -> Exception:
    """`exc`, if the server can unpickle it (an exception whose __init__ takes other
    arguments than its args cannot be); else a StoreUnavailable that names it.

    A traceback does not cross, so an unexpected error (a bug, not one of the store's
    errors) carries where it was raised here as a note, which the server's log shows."""
    if not isinstance(exc, StoreError | StoreUnavailable) and exc.__traceback__ is not None:
        where = "".join(traceback.format_tb(exc.__traceback__)).rstrip()
        exc.add_note(f"raised in the store process at:\n{where}")
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return StoreUnavailable(repr(exc))
    return exc


def _picklable_reply(reply: tuple[int, bool, Any]) -> tuple[int, bool, Any]:
    call_id, _, result = reply
    if _pickles(result):
        return reply
    return (call_id, False, StoreUnavailable(f"a result that cannot be pickled: {result!r}"))


def _pickles(value: Any) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True
