"""The one thread a store's database calls run in, and how Trio hands them over: both backends'.

Trio puts each operation, a function of the backend's connection, on a queue; the thread
takes everything queued at once and gives it to the backend's `_run_batch` as one batch
(one transaction: group commit), then wakes every waiting task with a single
`run_sync_soon`. Opening and closing the connection happen in the thread too, so no
blocking call runs on the Trio thread.

An operation nobody waits for (a step record, `finish_soon`) is held on the Trio side until
the next call that waits is queued, or the store closes, and goes to the thread in one piece
with it: it rides on that call's commit instead of waking the thread for a transaction (and
an fsync) of its own. A serving process renews its lease about every second (a third of the
lease, if that is shorter) and the order desk reads back every reply it sends
(`finished_reply`), so in a server a record waits about a second at most; until committed it
was never durable, and recovery treats a step without a record as one that may have run.
An order's final record (`finish_soon`) whose commit fails for an outage is held again and
rides on the next call: lost, it would leave its order running under a live lease, which no
process recovers while its owner lives. Step records are held again too, an attempt's in
the order recorded (`RowsWrittenTogether`). The thread holds them itself, in front of what
is handed over next: held by Trio, they came after a batch handed over while theirs ran,
such as a claim that took their order back from a process that claimed it and died (its
owner then theirs again: a final `ok` landed over that process's refund).

Cancellation: a call is cancellable until its operation is queued and not after: it then
waits, shielded, for its batch, so a caller that gets Cancelled knows nothing was written,
and a caller that gets a result knows it is committed (Trio delivers the cancellation at
its next checkpoint). The wait is Trio's lowest-level one (`wait_task_rescheduled`, refusing
to abort), not an Event inside a shielded cancel scope: the same rule at a fraction of the
cost, paid two or three times per order.

On Linux the thread runs under SCHED_BATCH (as do the threads it starts, such as
psycopg_pool's worker): it wakes often (an operation queued, the database's answer, the
GIL), and a normal thread that wakes may preempt the Trio thread, which holds the GIL the
woken one then waits for; under SCHED_BATCH it no longer preempts the running thread when
it wakes (S2: the Trio thread preempted 0.5 to 0.8 times per request, not 1.4 to 1.8).

A server's PostgreSQL store does not use the thread: it runs in a store process
(process.py), whose loop runs the batches itself (`_open_driven`, `_run_handed`,
`BatchRun`), so psycopg's Python never waits for the GIL of the Trio thread.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from contextlib import suppress
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import trio

from ..seldom import SeldomWarning
from .base import FinishedReply, StoreUnavailable

__all__ = [
    "BatchRun",
    "Op",
    "RepliesWritten",
    "RowsWrittenTogether",
    "WriterThread",
    "cannot_abort",
    "log_lost",
    "settle_unwaited",
]

logger = logging.getLogger("order_pipeline.store")

C = TypeVar("C")  # the backend's connection
T = TypeVar("T")


class Op(Generic[C, T]):
    """One queued operation; `waiter` (the task to wake once it is committed) is None for
    fire-and-forget (record_step, finish_soon). `taken`, if given, is called by the writer
    thread as it takes the operation into a batch, to take what it writes. `what` and
    `records` say what it writes and how many records that is, for the log (one unless its
    owner says; none, and its batch failing holds and loses nothing). `kept`: an operation
    nobody waits for that is held again if its batch fails for an outage, until it is
    committed or the store closes (an order's final record). `settled`, if given, is called
    where the batches run once an operation nobody waits for has run, before the next batch
    is taken: with True if it is to be held again. `held`: it has been held again."""

    __slots__ = (
        "error", "fn", "held", "kept", "records", "result", "settled", "taken", "waiter", "what"
    )  # fmt: skip
    result: T

    def __init__(
        self,
        fn: Callable[[C], T],
        waiter: trio.lowlevel.Task | None,
        taken: Callable[[], None] | None = None,
        *,
        kept: bool = False,
        settled: Callable[[bool], None] | None = None,
    ) -> None:
        self.fn = fn
        self.waiter = waiter
        self.taken = taken
        self.kept = kept
        self.settled = settled
        self.held = False
        self.what = "a queued record"  # for the log line if it is lost
        self.records = 1
        self.error: BaseException | None = None

    @property
    def to_try_again(self) -> bool:
        """Kept, with records to write, and not committed for an outage (not for an error of
        its own)."""
        return self.kept and self.records > 0 and isinstance(self.error, StoreUnavailable)


class WriterThread(Generic[C]):
    """A store whose calls run in one thread of its own; `async with` opens and closes it.

    A backend gives `_open` (connect, check, migrate; raise StoreError), `_run_batch` (run
    the operations in one transaction, setting each one's `result` or `error`) and `_close`,
    and names itself in `where` (for messages: never a password).
    """

    where: str

    def __init__(self) -> None:
        # What Trio hands over: operations to run, in order (None: close).
        self._queue: queue.SimpleQueue[list[Op[C, Any]] | None] = queue.SimpleQueue()
        self._closed = True
        # Operations nobody waits for, held until a call that waits (see the module docstring).
        self._riding: list[Op[C, Any]] = []
        # Held records' line: a batch's during an outage, about once a second (seldom.py); on
        # Trio's clock once Trio wakes the batches (`__aenter__`).
        self._held_line = _held_line(time.monotonic)
        self._open_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        # In a store process (process.py) its loop runs the batches, not a thread: a call's
        # coroutine then suspends until its batch has run, and no Trio runs there.
        self._driven = False

    def _open(self) -> None:
        raise NotImplementedError

    def _run_batch(self, ops: list[Op[C, Any]]) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._token = trio.lowlevel.current_trio_token()
        self._held_line = _held_line(trio.current_time)
        opened = trio.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(opened,), name=f"store writer {self.where}", daemon=True
        )
        self._thread.start()
        with trio.CancelScope(shield=True):  # the thread opens the store whatever happens
            await opened.wait()
            if self._open_error is not None:
                await trio.to_thread.run_sync(self._thread.join)
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
        """Commit what is queued, close the connection and join the thread."""
        if self._closed or self._thread is None:
            return
        self._closed = True
        self._held_line.flush()  # what it left unsaid, before what the close loses
        self._send_riding()
        self._queue.put(None)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self._thread.join)
        self._held_line.close()  # the end, if the close's batch (or one just before) stored them

    def _open_driven(self) -> None:
        """Open the store for a store process's loop (process.py), in the calling thread."""
        self._open()
        self._driven = True
        self._closed = False

    # -- the writer thread ----------------------------------------------------------------

    def _serve(self, opened: trio.Event) -> None:
        try:
            _not_preempting_trio()
            self._open()
        except BaseException as exc:
            self._open_error = exc
            return
        finally:
            self._token.run_sync_soon(opened.set)
        try:
            get, get_nowait = self._queue.get, self._queue.get_nowait
            # Kept operations whose batch failed for an outage, ahead of what comes next (see
            # the module docstring).
            held: list[Op[C, Any]] = []
            while True:
                handed = [get()]
                with suppress(queue.Empty):
                    while True:
                        handed.append(get_nowait())
                stop = handed[-1] is None
                ops = held + [op for item in handed if item is not None for op in item]
                held = []
                if ops:
                    self._run_handed(ops)
                    held = self._wake(ops, closing=stop)
                if stop:
                    return
        finally:
            self._close()

    def _run_handed(self, ops: list[Op[C, Any]]) -> None:
        """Run what was handed over as one batch, each operation taking what it writes first."""
        for op in ops:
            if op.taken is not None:
                op.taken()
        try:
            self._run_batch(ops)
        except Exception as exc:  # a backend's bug: none of its callers may hang
            logger.exception("%s: a batch failed unexpectedly", self.where)
            for op in ops:
                op.error = StoreUnavailable(f"{self.where}: {exc!r}")
                op.kept = False  # held again, it could fail every batch it rides on

    def _wake(self, ops: list[Op[C, Any]], *, closing: bool) -> list[Op[C, Any]]:
        """Hand every waiting caller its result and the Trio side the held line; log what
        nobody waits for and was lost; return what is to be held again, in the writer thread
        (`_serve`). Held once the close has begun too: the close's own batch, always the
        last, tries them again (`closing`: this is it)."""
        waiters: list[trio.lowlevel.Task] = []
        again: list[Op[C, Any]] = []
        stored = False
        for op in ops:
            if op.waiter is not None:
                waiters.append(op.waiter)
            else:
                stored |= settle_unwaited(op, again, closing=closing)
        for op in again:
            op.held = True
        if waiters or again or stored:
            # The line's arguments taken here: the thread runs `again` next, changing them.
            records, error = sum(op.records for op in again), again[0].error if again else None
            with suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._woken, waiters, records, error, stored)
        return again

    def _woken(
        self,
        waiters: list[trio.lowlevel.Task],
        records: int,
        error: BaseException | None,
        stored: bool,
    ) -> None:
        for task in waiters:
            trio.lowlevel.reschedule(task)
        self._say_held(records, error, stored)

    def _hold_again(self, ops: list[Op[C, Any]], stored: bool = False) -> None:
        """Hold `ops` (kept, their batch failed for an outage) again, ahead of what was held
        since: they ride on the next call that waits (the lease renewal, at the latest a
        second later), so an order's final record is not lost to a moment's outage. (A
        store process's loop, process.py; the writer thread holds them itself, `_serve`.)
        `stored`: the batch stored records held before."""
        for op in ops:
            op.held = True
        self._say_held(sum(op.records for op in ops), ops[0].error if ops else None, stored)
        self._riding[:0] = ops

    def _say_held(self, records: int, error: BaseException | None, stored: bool) -> None:
        """The held line, in one thread only (`SeldomWarning` is not thread-safe): Trio's, or
        a store process's loop. `records` held again for `error`; with none, and records
        held before `stored`, the outage has ended, which the log says (once a line is due)."""
        if records:
            self._held_line.warning(records, error)
        elif stored or self._held_line.ending:
            self._held_line.ended()

    # -- the Trio side --------------------------------------------------------------------

    async def _call(self, fn: Callable[[C], T]) -> T:
        if self._driven:
            op = self._put(fn, None)
            await BatchRun(op)
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
            op = self._put(fn, trio.lowlevel.current_task())
            await trio.lowlevel.wait_task_rescheduled(cannot_abort)  # see the module docstring
        if op.error is not None:
            raise op.error
        return op.result

    def _put(
        self,
        fn: Callable[[C], T],
        waiter: trio.lowlevel.Task | None,
        taken: Callable[[], None] | None = None,
        *,
        kept: bool = False,
        settled: Callable[[bool], None] | None = None,
    ) -> Op[C, T]:
        if self._closed:
            raise StoreUnavailable(f"{self.where}: the store is closed")
        op: Op[C, T] = Op(fn, waiter, taken, kept=kept, settled=settled)
        self._riding.append(op)
        if waiter is not None:
            self._send_riding()
        return op

    def _send_riding(self) -> None:
        """Hand the held operations to the thread, in their order, as one piece."""
        if self._riding:
            self._queue.put(self._riding)
            self._riding = []


def _held_line(clock: Callable[[], float]) -> SeldomWarning:
    """The line of records held for the next commit, and of their end, on `clock`."""
    return SeldomWarning(
        logger,
        "%d record(s) not stored yet, held for the next commit: %s",
        "held records stored, after %d batch(es) that could not store them",
        clock=clock,
    )


class BatchRun:
    """What a call's coroutine awaits in a store process: it yields its operation to the
    process's loop, which resumes it once the operation's batch has run."""

    __slots__ = ("op",)

    def __init__(self, op: Op[Any, Any]) -> None:
        self.op = op

    def __await__(self) -> Generator[Op[Any, Any], None, None]:
        yield self.op


def settle_unwaited(op: Op[Any, Any], again: list[Op[Any, Any]], *, closing: bool) -> bool:
    """An operation nobody waits for, its batch run: put in `again` to be held again if it is
    kept and an outage stopped it (unless the store is closing); else, if it failed with
    records to write, logged. True if it was held before and is now stored."""
    held = op.to_try_again and not closing
    if op.settled is not None:
        op.settled(held)
    if held:
        again.append(op)
    elif op.error is not None and op.records:
        log_lost(op)
    return op.held and op.error is None


def log_lost(op: Op[Any, Any]) -> None:
    """The one line for an operation nobody waits for that was not stored."""
    logger.error("%s not stored: %s", op.what, op.error)


def _not_preempting_trio() -> None:
    """Put the calling thread under SCHED_BATCH where there is one (see the module docstring).
    It still gets its fair share of a busy CPU; it only no longer preempts when it wakes."""
    if hasattr(os, "SCHED_BATCH"):
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError as exc:  # a sandbox may refuse it: the store works the same
            logger.debug("the store's writer thread keeps its scheduling policy: %s", exc)


def cannot_abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
    """For `wait_task_rescheduled`: a call whose operation is handed over waits for it."""
    return trio.lowlevel.Abort.FAILED


class RowsWrittenTogether(Generic[C]):
    """Rows (a store's step records) queued by the Trio thread and written by one operation.

    `add` queues a row, and an operation if none is queued (held or handed over) that the
    writer thread has not taken yet; as the thread takes it into a batch, it takes every row
    queued by then, and the operation hands them to `write` at once: one statement for a
    batch's records where each was one (each statement costs its Python, and the writer
    thread a wait for the GIL when the database gives it back). Rows are taken with their
    operation, so a batch run again (after an operation failed alone, or the lock was busy)
    writes them again. An operation whose batch fails for an outage is held again with its
    rows, as a final record is (`kept`). The rows queued since go with an operation of their
    own, so they commit even while the held ones cannot (a row lock a frozen host's
    transaction holds), but for those of an attempt (a row's first field) that a held or
    running operation has rows of: they are added to that operation's, after them, for
    `write` writes a later record of a step in the earlier one's place, and the later must
    win whichever batch commits last (a held operation that fails alone again, say). A
    batch that fails for an error of its own loses them with one line in the log, as it
    would each on its own.
    """

    def __init__(
        self, store: WriterThread[C], write: Callable[[C, list[tuple[Any, ...]]], None]
    ) -> None:
        self._store = store
        self._write = write
        self._rows: deque[tuple[Any, ...]] = deque()  # each append and popleft is atomic
        self._queued = False  # an operation is queued to take them and has not yet
        # The operations with rows not yet committed: running or held (used where the batches
        # run only).
        self._unwritten: set[_Taking[C]] = set()

    def add(self, row: tuple[Any, ...]) -> None:
        """Queue `row` (in the Trio thread); StoreUnavailable if the store is closed."""
        self._rows.append(row)  # first: an operation taken from now on takes it
        if not self._queued:
            self._queued = True
            taking = _Taking(self)
            try:
                taking.op = self._store._put(
                    taking.write, None, taking.take, kept=True, settled=taking.settled
                )
            except StoreUnavailable:
                self._queued = False  # the row stays, never written: the store is closed
                raise

    def _take(self, taking: _Taking[C]) -> list[tuple[Any, ...]]:
        self._queued = False  # first: a row added from now on queues an operation of its own
        rows = []
        with suppress(IndexError):
            while True:
                rows.append(self._rows.popleft())
        if rows and self._unwritten:  # rare: held again after an outage, or a race
            holding = {row[0]: other for other in self._unwritten for row in other.rows}
            own = []
            for row in rows:
                if (other := holding.get(row[0])) is not None:
                    other.rows.append(row)
                    other.counted()
                else:
                    own.append(row)
            rows = own
        if rows:
            self._unwritten.add(taking)
        return rows


class _Taking(Generic[C]):
    """One queued operation of `RowsWrittenTogether`, and the rows it took."""

    op: Op[C, None]  # the operation queued, once it is

    def __init__(self, together: RowsWrittenTogether[C]) -> None:
        self.together = together
        self.rows: list[tuple[Any, ...]] = []

    def take(self) -> None:
        if not self.rows:  # held again with rows: it writes those (see RowsWrittenTogether)
            self.rows = self.together._take(self)
        self.counted()

    def counted(self) -> None:
        """Tell the operation's log lines how many rows it writes: none when those queued went
        to a held operation's (or one taken before took them), more when others join them."""
        self.op.records = len(self.rows)
        self.op.what = f"{len(self.rows)} step record(s) written together"

    def settled(self, held: bool) -> None:
        if not held:  # written, or lost with a line in the log
            self.together._unwritten.discard(self)

    def write(self, conn: C) -> None:
        if self.rows:
            self.together._write(conn, self.rows)


class RepliesWritten:
    """Replies a store's writer thread wrote (its finish_soon), for the desk's finished_reply
    to take without a statement: this transaction's until it commits, then up to `kept` of
    committed ones until taken (the oldest dropped: a read then finds it in the database).
    Used in the writer thread only. `len` is how many committed ones are kept."""

    def __init__(self, kept: int = 1000) -> None:
        self._kept = kept
        self._written: dict[tuple[str, str], FinishedReply] = {}
        self._committed: dict[tuple[str, str], FinishedReply] = {}

    def __len__(self) -> int:
        return len(self._committed)

    def transaction_begins(self) -> None:
        """Forget what a transaction that did not commit wrote."""
        self._written.clear()

    def wrote(self, key: str, attempt_id: str, reply: FinishedReply) -> None:
        self._written[key, attempt_id] = reply

    def transaction_committed(self) -> None:
        self._committed.update(self._written)
        while len(self._committed) > self._kept:
            del self._committed[next(iter(self._committed))]

    def take(self, key: str, attempt_id: str) -> FinishedReply | None:
        """The reply written for the attempt, once; None if not (or no longer) kept."""
        return self._written.pop((key, attempt_id), None) or self._committed.pop(
            (key, attempt_id), None
        )
