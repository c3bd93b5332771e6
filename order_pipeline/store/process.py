"""A SQL store run in a process of its own (the store process), so its Python holds no GIL of
the server's.

In one process, the writer thread's every wake-up (an operation queued, the database's
answer) needs the GIL that the Trio thread holds while it serves: with a thread that only
does nothing, twice per order, S2's p50 rose by about what the SQLite store costs (see
docs/performance.md, "What the S2 gap is not"). Here the server's side of a call is a pickle,
a `send` and, when the answer arrives, a `recv` by one Trio task; the backend's own code
(sqlite.py, postgres.py, unchanged) runs in the store process.

The wire, a socket pair, carries frames (a 4-byte length, then a pickle):
- to the store process: the store's URL and log level first; then lists of calls
  `(call id or None, method name, args, kwargs)` in the order they were made (None as a call
  id: nobody waits for it, as `record_step`); `None` to close.
- from it: `("opened", None)` or `("failed", StoreError)`; then `("done", [(call id, ok,
  result or exception), ...])`; and `("log", record)`: its log records, which the server
  logs as its own.

The store process takes every call that has arrived, starts each method's coroutine, which
suspends at its `_call` (writer.py's `BatchRun`), runs all their operations as one batch
(group commit, as the writer thread does), resumes them and sends the results in one frame.

Semantics are the writer thread's: a call is cancellable until it is sent and not after; a
record nobody waits for rides on the next call that waits. If the store process dies (killed,
out of memory), every waiting call raises StoreUnavailable, so does every later one, and
`on_lost` is called: the server then exits, as if the database code had crashed it, and its
orders are recovered by lease. If the server dies, the store process reads the end of the
socket, runs what it has received and exits. It ignores SIGINT and SIGTERM: the server
closes it once its own drain is over.
"""

from __future__ import annotations

import logging
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import trio

from .base import (
    Begun,
    Existing,
    FinishedReply,
    StepRecord,
    StoredOrder,
    StoreError,
    StoreUnavailable,
)
from .writer import Op, WriterThread, log_lost

__all__ = ["StoreProcess", "serve_store"]

logger = logging.getLogger(__name__)

_LENGTH: Final = struct.Struct("!I")
# The store process imports this very package (the server's, wherever it was imported from).
_PACKAGES: Final = str(Path(__file__).resolve().parents[2])
_CHILD: Final = (
    "import sys; sys.path.insert(0, {packages!r});"
    " from order_pipeline.store.process import serve_store; serve_store({fd})"
)
Call = tuple[int | None, str, tuple[Any, ...], dict[str, Any]]


class _Waiting:
    __slots__ = ("error", "result", "task")

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.result: Any = None
        self.error: BaseException | None = None


class StoreProcess:
    """An `OrderStore` whose backend runs in a store process; `async with` starts and stops it.

    `url` names a SQL backend (`parse_store_url`); `on_lost(message)` is called in the Trio
    thread if the store process ends before it is closed.
    """

    def __init__(self, url: str, on_lost: Callable[[str], None]) -> None:
        self._url = url
        self._on_lost = on_lost
        self._sock, self._child_sock = socket.socketpair()
        self._sock.setblocking(False)
        self._process: trio.Process | None = None
        self._out = bytearray()  # frames the socket has not taken yet
        self._flushing = trio.Event()  # set: the pump waits until it may send the rest
        self._riding: list[Call] = []
        self._waiting: dict[int, _Waiting] = {}
        self._next_id = 0
        self._closed = True
        self._lost: str | None = None
        self._opened = trio.Event()
        self._open_error: BaseException | None = None
        self._ended = trio.Event()  # the pump read the socket's end

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        level = logging.getLogger().getEffectiveLevel()
        with self._child_sock:
            self._process = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-P",  # not the working directory's modules: the path's first entry is ours
                    "-c",
                    _CHILD.format(packages=_PACKAGES, fd=self._child_sock.fileno()),
                ],
                pass_fds=(self._child_sock.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        self._send(_frame((self._url, level)))
        trio.lowlevel.spawn_system_task(self._pump, name="store process pump")
        with trio.CancelScope(shield=True):  # the store process opens the store whatever happens
            await self._opened.wait()
            if self._open_error is not None:
                await self._ended.wait()
                await self._process.wait()
                raise self._open_error
        self._closed = False
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
        if self._closed or self._process is None:
            return
        self._closed = True
        self._send_riding()
        self._send(_frame(None))
        with trio.CancelScope(shield=True):
            await self._ended.wait()
            await self._process.wait()
        self._sock.close()

    # -- the Trio side --------------------------------------------------------------------

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        await trio.lowlevel.checkpoint_if_cancelled()
        self._check_open()
        self._next_id += 1
        waiting = self._waiting[self._next_id] = _Waiting(trio.lowlevel.current_task())
        self._riding.append((self._next_id, name, args, kwargs))
        self._send_riding()
        await trio.lowlevel.wait_task_rescheduled(_cannot_abort)  # as writer.py's, once sent
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
        if self._closed:
            raise StoreUnavailable("the store is closed")

    def _send_riding(self) -> None:
        if self._riding:
            self._send(_frame(self._riding))
            self._riding = []

    def _send(self, frame: bytes) -> None:
        if self._out:  # the pump is sending what the socket did not take: after it
            self._out += frame
            return
        try:
            sent = self._sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:  # the store process is gone: the pump says so
            return
        if sent < len(frame):
            self._out += frame[sent:]
            self._flushing.set()

    async def _pump(self) -> None:
        """Read the store process's frames until the socket ends; send what `_send` left."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._flush_forever)
                await self._read_until_end()
                nursery.cancel_scope.cancel()
        except Exception:  # a bug of ours: the server must not hang on it
            logger.exception("the store process's frames could not be read")
        finally:  # (Cancelled too: the run ends without a close)
            self._sock.close()  # the store process reads the end, if it has not yet
        await self._ended_now()

    async def _flush_forever(self) -> None:
        while True:
            await self._flushing.wait()
            while self._out:
                await trio.lowlevel.wait_writable(self._sock)
                try:
                    del self._out[: self._sock.send(self._out)]
                except BlockingIOError:
                    pass
                except OSError:
                    self._out.clear()
            self._flushing = trio.Event()

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
            start = 0
            while len(buffer) - start >= 4:
                (length,) = _LENGTH.unpack_from(buffer, start)
                if len(buffer) - start - 4 < length:
                    break
                self._received(pickle.loads(buffer[start + 4 : start + 4 + length]))
                start += 4 + length
            del buffer[:start]

    def _received(self, message: tuple[str, Any]) -> None:
        what, value = message
        if what == "done":
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
        if not self._opened.is_set():
            self._open_error = StoreError("the store process ended before it opened the store")
            self._opened.set()
        elif not self._closed or self._waiting:
            assert self._process is not None
            with trio.CancelScope(shield=True):
                status = await self._process.wait()
            self._lost = f"the store process ended unexpectedly (exit status {status})"
            for waiting in self._waiting.values():
                waiting.error = StoreUnavailable(self._lost)
                trio.lowlevel.reschedule(waiting.task)
            self._waiting.clear()
            if self._closed:  # while closing: nobody else says so
                logger.error("%s", self._lost)
            else:
                self._closed = True
                self._on_lost(self._lost)
        self._ended.set()

    # -- the store's calls (base.OrderStore) ----------------------------------------------

    async def begin(
        self, key: str, order_id: str, request_hash: str, body: bytes, owner: str
    ) -> Begun | Existing:
        result: Begun | Existing = await self._call(
            "begin", key, order_id, request_hash, body, owner
        )
        return result

    async def restart(self, key: str, owner: str, expected_attempt: int) -> StoredOrder | None:
        result: StoredOrder | None = await self._call("restart", key, owner, expected_attempt)
        return result

    def record_step(self, key: str, attempt_id: str, record: StepRecord) -> None:
        self._hold("record_step", key, attempt_id, record)

    async def finish(
        self,
        key: str,
        attempt_id: str,
        http_status: int,
        reply: bytes,
        kind: str | None,
        *,
        owner: str | None = None,
    ) -> None:
        await self._call("finish", key, attempt_id, http_status, reply, kind, owner=owner)

    def finish_soon(
        self,
        key: str,
        attempt_id: str,
        http_status: int,
        reply: bytes,
        kind: str | None,
        *,
        owner: str | None = None,
    ) -> None:
        self._hold("finish_soon", key, attempt_id, http_status, reply, kind, owner=owner)

    async def get(self, key: str) -> StoredOrder | None:
        result: StoredOrder | None = await self._call("get", key)
        return result

    async def finished_reply(self, key: str, attempt_id: str) -> FinishedReply | None:
        result: FinishedReply | None = await self._call("finished_reply", key, attempt_id)
        return result

    async def list_orders(self, *, needs_attention: bool = False) -> list[tuple[StoredOrder, int]]:
        result: list[tuple[StoredOrder, int]] = await self._call(
            "list_orders", needs_attention=needs_attention
        )
        return result

    async def renew_lease(self, owner: str, timeout: float) -> None:  # noqa: ASYNC109 (a lease's length)
        await self._call("renew_lease", owner, timeout)

    async def release_lease(self, owner: str) -> None:
        await self._call("release_lease", owner)

    async def claim_interrupted(self, owner: str, limit: int) -> list[StoredOrder]:
        result: list[StoredOrder] = await self._call("claim_interrupted", owner, limit)
        return result

    async def charge(self, charge_id: str, key: str, amount: int) -> None:
        await self._call("charge", charge_id, key, amount)

    async def refund(self, charge_id: str, key: str) -> None:
        await self._call("refund", charge_id, key)

    async def net_charge(self, key: str) -> int:
        result: int = await self._call("net_charge", key)
        return result

    async def purge(self, finished_before: float) -> int:
        result: int = await self._call("purge", finished_before)
        return result


def _cannot_abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


def _frame(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


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
            data = self._sock.recv(1 << 20)
            if not data:
                return []
            self._buffer += data
            start = 0
            while len(self._buffer) - start >= 4:
                (length,) = _LENGTH.unpack_from(self._buffer, start)
                if len(self._buffer) - start - 4 < length:
                    break
                messages.append(pickle.loads(self._buffer[start + 4 : start + 4 + length]))
                start += 4 + length
            del self._buffer[:start]
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
            self._wire.send(("log", fields))
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
        wire.send(("failed", _picklable(exc)))
        return
    wire.send(("opened", None))
    try:
        _serve_calls(store, wire, first[1:])
    finally:
        store._close()


def _serve_calls(store: WriterThread[Any], wire: _Wire, messages: list[Any]) -> None:
    suspended: dict[Op[Any, Any], tuple[int, Coroutine[Any, Any, Any]]] = {}
    closing = False
    while True:
        replies: list[tuple[int, bool, Any]] = []
        if not store._riding:  # nothing to run: wait for calls
            if closing:
                return
            messages = messages or wire.receive()
            if not messages:  # the server is gone: nothing more will come
                return
            for message in messages:
                if message is None:
                    closing = True
                    continue
                for call_id, name, args, kwargs in message:
                    _start(store, call_id, name, args, kwargs, suspended, replies)
            messages = []
        ops, store._riding = store._riding, []
        if ops:
            store._run_handed(ops)
        for op in ops:
            if op in suspended:
                call_id, coroutine = suspended.pop(op)
                _advance(call_id, coroutine, suspended, replies)
            elif op.error is not None:
                log_lost(op)
        if replies:
            wire.send(("done", replies))


def _start(
    store: WriterThread[Any],
    call_id: int | None,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    suspended: dict[Op[Any, Any], tuple[int, Coroutine[Any, Any, Any]]],
    replies: list[tuple[int, bool, Any]],
) -> None:
    method = getattr(store, name)
    if call_id is None:
        try:
            method(*args, **kwargs)
        except Exception as exc:
            logger.error("%s not stored: %s", name, exc)
        return
    _advance(call_id, method(*args, **kwargs), suspended, replies)


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
    try:
        pickle.dumps(exc)
    except Exception:
        return StoreUnavailable(repr(exc))
    return exc
