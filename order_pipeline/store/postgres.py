"""The order store in PostgreSQL, which processes on many hosts can share.

psycopg's async interface is asyncio's only (psycopg issue #29), so, as for SQLite, one writer
thread does the talking with psycopg's blocking interface (in a server, the store process's
main thread: `process.py`). Trio puts each operation, a function
of a connection, on a queue; the thread takes everything queued, runs it in one transaction on
a connection of a `psycopg_pool.ConnectionPool` (of one: one thread uses one connection at a
time, and the pool replaces a broken one in the background, with backoff), commits once, and
wakes every waiting task with a single `run_sync_soon`. Concurrent orders' records thus share
transactions (group commit). Reads go through the same queue and transaction, so they see
every write queued before them (`get` after `finish_soon`, as the contract says).

A batch runs in libpq's pipeline mode: its statements are sent without waiting for each
answer (S1 on PostgreSQL: 319 and 288 req/s against 288 and 250 without, in two pairs of
runs), and the operations on an order's path (a begin; a finish, whose reply the desk's
`finished_reply` then takes without a statement) read their answers only once every
statement is sent (`_Later`): one round trip brings them all, one more closes the pipeline
with the transaction's id, and one commits (an operation that reads at once, such as `get`,
a begin whose key was taken or a finished reply the store no longer holds, adds its own;
such a late read sees the whole batch, statements queued after it too, which concurrent
operations may). Every round trip costs the writer thread a wait for the GIL, which a Trio
thread in the same process holds while it is busy (`orders`; a server runs this store in
its store process, process.py, where nothing else holds it). A batch
runs without a savepoint per operation (each would cost a round trip): if one operation
fails by itself (a bug, bad data), the transaction is rolled back and the batch runs again
statement by statement (in the pipeline an error surfaces at a later read, so whose it was
is not known), where that operation gets its error and the others run again in a new
transaction. Whatever makes the whole batch fail is handled for the whole batch:

* a deadlock with another host's batch (or a serialization failure): rolled back and run
  again (PostgreSQL made us the victim, so the other batch goes on);
* the connection lost before COMMIT was sent: nothing was committed, so the batch runs again
  on a new connection;
* the connection lost while committing: the transaction's id, read before COMMIT, is looked
  up on a new connection (`pg_xact_status`): committed, the results stand; aborted, the batch
  runs again; unknown (no connection within `timeout`), StoreUnavailable that says it may
  have taken effect (so a payment whose charge it was is refunded);
* no connection within `timeout`, the database refusing to commit: every operation of the
  batch raises StoreUnavailable. A batch is run at most `_TRIES` times. Once a batch has
  found no connection (or the look-up of a lost commit's outcome, above, has), the next
  ones wait for one only briefly (`OUTAGE_WAIT_S`) until one is got again: else each
  waited its full `timeout` behind another that did (the lease's renewal and recovery's
  look queue one each second), and a call got its 503 only after up to two;
* no answer at all (a server or pooler that stalls, a path that stops forwarding while its
  kernel still acknowledges, so that tcp_user_timeout never fires): psycopg would wait on
  the socket without end, and every caller with it. A batch still running `STALL_TIMEOUTS`
  times `timeout` after it started has its connection broken off by a watchdog thread (its
  socket shut down), so it fails as a lost connection does, and is not run again; the
  outcome of a commit lost so is asked within two `timeout`s more (an operator's listing,
  `reader`, is not bounded: it may take long, and Ctrl+C ends it).

A row lock held by another transaction past `lock_timeout` (at most `LOCK_WAIT_S`), or a
table's (an operator's LOCK TABLE, a DDL: PostgreSQL says only that the wait timed out) fails
the operation that waited for it, alone (StoreUnavailable; a final record is held for the next
commit), as an operation's own error does: the batch runs again statement by statement, each
operation then waiting for a lock only briefly (`_RERUN_LOCK_WAIT_MS`: one that meets a lock
fails at once, alone), and the others of it, the lease's renewal among them, commit. A batch
carries the renewal, so it must not wait on locks as long as a lease lasts: a host frozen in
the middle of a transaction (its row locks held until it wakes) made every batch that touched
one of its orders fail, and the live host lose its lease. A batch that carries a record held
after it met such a lock runs statement by statement from the start, waiting for locks
briefly (the lock is likely held still): else every batch, and every order's commit in it,
waited the full lock_timeout.

Concurrency between hosts is the database's: a key's PRIMARY KEY decides who runs an order
(INSERT ... ON CONFLICT DO NOTHING, then read the winner); interrupted orders are claimed by
locking them with SELECT ... FOR UPDATE SKIP LOCKED and updating them with a statement of its
own that checks the owner's lease again (see `_claim`), so each has one claimer; leases are
measured on the database's clock: `now()` (the batch's start) for renewing and for claiming.
Order timestamps are the database's `now()` too, returned as unix seconds.

Opening (in the thread too) connects once outside the pool, so a wrong host, port, password or
database is a one-line StoreError naming the host; then creates or migrates the schema in the
first schema of the search_path (`?options=-csearch_path%3Dname` chooses it) under the
schema's own `pg_advisory_xact_lock` (and the database's one below version 2, which older
releases take: `_lock_migration`), so two hosts starting at once do not both migrate; a schema
version newer than this program's, or tables of the same names that are not ours, are refused.

Cancellation, as for SQLite: a coroutine is cancellable until its operation is queued and not
after: it waits (shielded) for its batch to commit, so a caller that gets Cancelled knows
nothing was written, and a caller that gets a result knows it is durable. The wait is bounded
by the batch ahead and its own, each at most `STALL_TIMEOUTS` `timeout`s (two more to look
up a lost commit), a reader's excepted; in an outage, once a batch has found no connection,
`OUTAGE_WAIT_S` each.
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from typing import Any, Final, Generic, TypeVar, cast

import orjson
import psycopg
import psycopg_pool
from psycopg import errors
from psycopg.conninfo import make_conninfo
from psycopg.sql import SQL, Identifier

from ..kinds import COMPENSATION_FAILED, INTERRUPTED
from ..model import new_id
from .base import (
    FAILED_COMPENSATIONS,
    FINISHED,
    LIST_PAGE,
    MAY_NEED_ATTENTION,
    NO_UNDO_TAKEN_BACK,
    RUNNING,
    Begun,
    ClockWatch,
    Existing,
    FinishedReply,
    StepRecord,
    StoredOrder,
    StoreError,
    StoreUnavailable,
    one_line,
    step_row,
    takes_undo_back,
)
from .urls import postgres_params, shown_url
from .writer import Op, RepliesWritten, RowsWrittenTogether, WriterThread

logger = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 3
VERSION_TABLE: Final = "order_pipeline_schema"
TABLES: Final = ("orders", "steps", "leases", "ledger")
# Taken around migrating a schema (`_lock_migration`): a schema's own lock, "ordp" and the
# schema's oid (never 1, a system object's), so that schemas of one database (staging beside
# production, say) migrate apart; and below OLDER_RELEASES_MIGRATE_TO the database's one
# lock too, "ordp" and 1, which older releases took alone.
SCHEMA_MIGRATION_LOCKS: Final = 0x6F726470_00000000
MIGRATION_LOCK: Final = 0x6F726470_00000001
# The newest version a release that took MIGRATION_LOCK alone migrates a schema to.
OLDER_RELEASES_MIGRATE_TO: Final = 2
MIGRATION_WAIT: Final = 60.0  # s, for the lock of another host's migration
# A migration locks its tables one after another (version 3: orders, steps, then orders alone
# to drop an index), so the batch of an older host still running that holds one and waits for
# another deadlocks with it; PostgreSQL then ends the one that waited first, the batch (run
# again, as after any deadlock) or the migration, tried again so many times.
_MIGRATION_TRIES: Final = 5
MIN_SERVER_VERSION: Final = 130000  # pg_xact_status, pg_current_xact_id_if_assigned
# Database encodings that hold any text the client sends as UTF-8 (SQL_ASCII as its bytes);
# another (LATIN1, say) refuses characters it lacks, so an order_id of them would fail.
_ENCODINGS: Final = ("UTF8", "SQL_ASCII")
_TRIES: Final = 5  # runs of one batch (deadlocks, lost connections) before StoreUnavailable
# Before a batch runs again, a pause of up to this many seconds times its tries: two hosts'
# batches that deadlocked would otherwise run again at once and meet the same way.
_BACKOFF_S: Final = 0.01
# Errors of the batch, not of the operation that met them: the database is down, read-only or
# out of space (a lock held past lock_timeout is the operation's: `_batch_error`).
_BATCH_ERRORS: Final = (psycopg.OperationalError, errors.ReadOnlySqlTransaction)
# The longest a batch waits for a row lock another transaction holds (`lock_timeout`): above
# PostgreSQL's default deadlock_timeout (1 s), so that a deadlock is found as one (its victim's
# batch runs again) rather than taken for a lock held too long.
LOCK_WAIT_S: Final = 2.0
# The same once a batch has met a lock held past it, as it runs again statement by statement:
# each operation that meets a lock fails at once, alone (a host frozen in a transaction may
# hold many), so the rest of the batch, the lease's renewal among them, commits in time.
_RERUN_LOCK_WAIT_MS: Final = 10
# The longest a batch waits for a connection once one before it found none within `timeout`,
# until one is got again (see the module docstring): a call then gets its StoreUnavailable
# within `timeout` and about two of these of being made, not two `timeout`s. The pool goes on
# reconnecting in the background meanwhile (1 to 4 s apart), and a connection it made is
# taken at once.
OUTAGE_WAIT_S: Final = 1.0
# A batch, all its tries, ends within this many `timeout`s (see the module docstring): a
# few, for a batch may wait `timeout` for a connection, a lock and a deadlock's detection.
STALL_TIMEOUTS: Final = 3
T = TypeVar("T")
_XID: Final = "SELECT pg_current_xact_id_if_assigned()::text"


class _Later(Generic[T]):
    """An operation's result, read once every statement of its batch has been sent."""

    __slots__ = ("read",)

    def __init__(self, read: Callable[[], T]) -> None:
        self.read = read


# The orders a purge may take (not those it keeps: running, compensation_failed), as its
# partial index has them and its query says.
_PURGEABLE: Final = f"finished_at IS NOT NULL AND kind IS DISTINCT FROM '{COMPENSATION_FAILED}'"
# The step records of failed undos, as their partial index has them and the listing repeats.
_UNDO_FAILED: Final = f"compensation IN ('{FAILED_COMPENSATIONS[0]}', '{FAILED_COMPENSATIONS[1]}')"
# _MIGRATIONS[v] takes a schema from version v to v + 1, statement by statement, in the
# transaction that holds the migration's locks (`_migrate`). Those from
# OLDER_RELEASES_MIGRATE_TO on make what is already there again without fail (IF NOT EXISTS):
# an older host may have set the version back below them (`_lock_migration`).
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        f"CREATE TABLE {VERSION_TABLE} (version integer NOT NULL)",
        f"INSERT INTO {VERSION_TABLE} (version) VALUES (0)",
        """CREATE TABLE orders (
            key text PRIMARY KEY,
            order_id text NOT NULL,
            request_hash text NOT NULL,
            body bytea NOT NULL,
            attempt integer NOT NULL,
            attempt_id text NOT NULL,
            owner text NOT NULL,
            state text NOT NULL,
            started_at timestamptz NOT NULL,
            finished_at timestamptz,
            http_status integer,
            reply bytea,
            kind text
        )""",
        "CREATE INDEX orders_state_owner ON orders (state, owner)",
        "CREATE INDEX orders_finished_at ON orders (finished_at)",
        """CREATE TABLE steps (
            seq bigint GENERATED ALWAYS AS IDENTITY,
            attempt_id text NOT NULL,
            step text NOT NULL,
            status text NOT NULL,
            detail text,
            duration_ms bigint NOT NULL,
            compensation text,
            compensation_ms bigint,
            PRIMARY KEY (attempt_id, step)
        )""",
        "CREATE TABLE leases (owner text PRIMARY KEY, expires_at timestamptz NOT NULL)",
        """CREATE TABLE ledger (
            charge_id text PRIMARY KEY,
            key text NOT NULL,
            amount bigint NOT NULL,
            refunded boolean NOT NULL DEFAULT false
        )""",
        "CREATE INDEX ledger_key ON ledger (key)",
    ),
    # 2: the listing's order, so that each of its pages is a range of this index (not a scan
    # and a sort of every order); keys by code point ("C"), as SQLite and Python order them,
    # whatever the database's collation. Built in the migration's transaction: writes to
    # orders wait for it (a few seconds for millions of orders).
    ('CREATE INDEX orders_started ON orders (started_at, key COLLATE "C")',),
    # 3: the orders that may need attention in the listing's order, so that a page of
    # --needs-attention reads them, not every order (base.MAY_NEED_ATTENTION), and the
    # failed undos' step records, which it looks up (without them PostgreSQL read every
    # step to hash those few); and the purge's range without the orders it keeps, so that
    # it no longer reads past every compensation_failed one at each batch.
    (
        'CREATE INDEX IF NOT EXISTS orders_attention ON orders (started_at, key COLLATE "C")'
        f" WHERE {MAY_NEED_ATTENTION}",
        f"CREATE INDEX IF NOT EXISTS steps_undo_failed ON steps (attempt_id) WHERE {_UNDO_FAILED}",
        f"CREATE INDEX IF NOT EXISTS orders_purgeable ON orders (finished_at) WHERE {_PURGEABLE}",
    ),
)
# Version 3 also drops orders_finished_at, which orders_purgeable replaces (`_drop_if_free`).
_REPLACED_BY_3: Final = "orders_finished_at"
assert len(_MIGRATIONS) == SCHEMA_VERSION

# In StoredOrder's field order, so StoredOrder(*row) builds one; times as unix seconds.
_ORDER = (
    "orders.key, order_id, request_hash, body, attempt, orders.attempt_id, owner, state,"
    " extract(epoch FROM started_at)::float8, extract(epoch FROM finished_at)::float8,"
    " http_status, reply, kind"
)
_ORDER_FIELDS: Final = 13
_new_order: Callable[..., StoredOrder] = StoredOrder  # from a row of _ORDER's columns
_STEP = "step, status, detail, duration_ms, compensation, compensation_ms"

Conn = psycopg.Connection[tuple[Any, ...]]
Pool = psycopg_pool.ConnectionPool[Conn]


class _LockTimedOut(StoreUnavailable):
    """An operation waited past lock_timeout for another transaction's lock, a row's or a
    table's (see the module docstring)."""


class _Watchdog:
    """A thread that breaks off a connection still in use past its deadline.

    psycopg's blocking calls wait on the socket without a limit; shut down, the socket ends
    the wait at once, as a lost connection (a cancel request would go the same stalled way).
    It shuts down a duplicate of libpq's socket, made before the wait: a number libpq closed
    and the pool then reused for another connection is never touched. It looks `poll` apart,
    not at every batch: a thread woken per batch would wait for the GIL each time.
    """

    def __init__(self, where: str, *, poll: float) -> None:
        self._where = where
        self._poll = poll
        self._lock = threading.Lock()
        self._watched: tuple[socket.socket, float] | None = None  # (a dup, its deadline)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"store watchdog {where}", daemon=True
        )
        self._thread.start()

    @contextmanager
    def bounded(self, conn: Conn, deadline: float) -> Iterator[None]:
        try:
            fd = os.dup(conn.pgconn.socket)
        except (OSError, psycopg.Error):  # lost already: its first statement fails at once
            fd = -1
        if fd < 0:
            yield
            return
        breaker = socket.socket(fileno=fd)
        with self._lock:
            self._watched = (breaker, deadline)
        try:
            yield
        finally:
            with self._lock:
                self._watched = None
                breaker.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self._poll):
            with self._lock:
                if self._watched is None or time.monotonic() < self._watched[1]:
                    continue
                with suppress(OSError):
                    self._watched[0].shutdown(socket.SHUT_RDWR)
                self._watched = None
            logger.warning(
                "%s: no answer from the database in time: its connection is broken off",
                self._where,
            )


# The least time left for which a lost COMMIT's outcome is asked again on a new connection.
_LAST_LOOKUP_S: Final = 0.1


class PostgresStore(WriterThread[Conn]):
    """Orders in a PostgreSQL database; `async with PostgresStore(url) as store:` opens it.

    `timeout` bounds each wait of a batch: for a connection (at start too; OUTAGE_WAIT_S
    once a batch found none, until one is got again), for a row lock
    held by someone else (lock_timeout, at most LOCK_WAIT_S: past it only the operation
    that waited fails), for the outcome of a commit whose connection was lost; past it the
    batch raises StoreUnavailable. A batch gets STALL_TIMEOUTS times it in all. `commits`
    counts committed batches.
    """

    def __init__(self, url: str, *, timeout: float = 5.0, reader: bool = False) -> None:
        super().__init__()
        self.url = url
        self.reader = reader  # an operator's listing: checks the schema, never makes it
        self.timeout = timeout
        self.commits = 0
        self._lock_met = False  # the batch being run met a lock held past lock_timeout
        self._no_connection = False  # a batch found no connection in time, and none is got since
        self._deadline = math.inf  # the batch being run's, on time.monotonic()'s clock
        self._steps = RowsWrittenTogether(self, _record_steps)
        self._replies = RepliesWritten()  # what finish_soon wrote, for finished_reply
        # Leases are on the database's clock, whose steps the claims watch for (ClockWatch).
        self._clock = ClockWatch()
        params = postgres_params(url)
        self.where = _where(params, url)  # the URL without password or options, for messages
        params.setdefault("connect_timeout", max(2, round(timeout)))
        params.setdefault("application_name", "order-pipeline")
        # A peer that vanishes without a word (a network partition) is noticed in seconds:
        # while the connection is idle, by keepalives; while what we sent is unanswered, by
        # tcp_user_timeout (without it the kernel retransmits for about 15 minutes, and every
        # batch, with the orders waiting for it, would wait as long).
        params.setdefault("keepalives_idle", 10)
        params.setdefault("keepalives_interval", 5)
        params.setdefault("keepalives_count", 3)
        params.setdefault("tcp_user_timeout", max(1000, round(2 * timeout * 1000)))  # ms
        # Text as UTF-8, whatever the database's encoding (SQL_ASCII's, read back as bytes
        # otherwise), the URL's or PGCLIENTENCODING: every order_id goes in and comes back.
        params["client_encoding"] = "UTF8"
        self._conninfo = make_conninfo("", **params)
        self._pool: Pool  # the writer thread's, from _open
        self._watchdog: _Watchdog | None = None  # from _open, unless a reader

    # -- in the writer thread -------------------------------------------------------------

    def _open(self) -> None:
        self._pool = self._open_pool()
        if not self.reader:
            self._watchdog = _Watchdog(self.where, poll=min(1.0, self.timeout / 4))

    def _close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.close()
        self._pool.close()

    def _bounded(self, conn: Conn, deadline: float) -> AbstractContextManager[None]:
        """`conn` broken off if still in use at `deadline` (time.monotonic's), unless a reader."""
        if self._watchdog is None:
            return nullcontext()
        return self._watchdog.bounded(conn, deadline)

    def _open_pool(self) -> Pool:
        """Connect once (for a precise error), create or migrate the schema, open the pool."""
        try:
            with psycopg.connect(self._conninfo, autocommit=True) as conn:
                if conn.info.server_version < MIN_SERVER_VERSION:
                    raise StoreError(
                        f"{self.where}: cannot open the store: PostgreSQL"
                        f" {conn.info.server_version // 10000} is too old, 13 or newer needed"
                    )
                encoding = conn.info.parameter_status("server_encoding")
                if encoding not in _ENCODINGS:
                    raise StoreError(
                        f"{self.where}: cannot open the store: the database's encoding is"
                        f" {encoding}, which cannot hold every order_id:"
                        " create it with ENCODING 'UTF8'"
                    )
                # An operator's statement_timeout would cut the schema check, a migration's
                # wait for another host's or an index's build short, as `_configure` says.
                conn.execute("SELECT set_config('statement_timeout', '0', false)")
                if self.reader:
                    _check_readable(conn, self.where)
                else:
                    _migrate(conn, self.where)
        except psycopg.Error as exc:
            raise StoreError(f"{self.where}: cannot open the store: {one_line(exc)}") from None
        pool: Pool = psycopg_pool.ConnectionPool(
            self._conninfo,
            kwargs={"autocommit": True},  # transactions are the batches' own BEGIN and COMMIT
            min_size=1,
            max_size=1,
            open=False,
            configure=self._configure,
            name=f"order store {self.where}",
            timeout=self.timeout,
            # A lost connection is retried with doubling delays until this long, then afresh
            # at the next batch: recovery never waits long for a stretched delay.
            reconnect_timeout=max(10.0, 2 * self.timeout),
            reconnect_failed=lambda _: logger.warning("%s: cannot reconnect yet", self.where),
            num_workers=1,
        )
        try:
            pool.open(wait=True, timeout=self.timeout)
        except psycopg_pool.PoolTimeout as exc:
            pool.close()
            raise StoreError(f"{self.where}: cannot open the store: {exc}") from None
        return pool

    def _configure(self, conn: Conn) -> None:
        # Every statement planned for the table as it is now: psycopg prepares a statement
        # run five times, and PostgreSQL then keeps one plan for it, made while the table may
        # have been empty. Such a plan found a finished order by scanning the (state, owner)
        # index over every finished order, not by its key (S1: 0.68 ms of the database's CPU
        # per order, 0.23 ms planned each time); an ANALYZE would replace it, if autovacuum
        # runs, which a server may not.
        # No statement_timeout (an operator's, for the role or the database): the store bounds
        # its own waits (lock_timeout; the watchdog), and a statement timeout shorter than the
        # lock wait would cancel a wait for another transaction's row lock as a failure of the
        # whole batch (QueryCanceled), the lease's renewal with it, not of the one operation.
        # READ COMMITTED whatever the role's or database's default_transaction_isolation: a
        # claim's UPDATE must judge leases in a snapshot of its own (`_claim`); in a stricter
        # level it is the transaction's, and a lease renewed meanwhile goes unseen.
        # extra_float_digits 1 (the default; below it float8 is printed rounded): an order's
        # start read back as float8 seconds is a listing page's bound, which must be exact.
        lock_timeout = f"{max(1, round(min(self.timeout, LOCK_WAIT_S) * 1000))}ms"
        conn.execute(
            "SELECT set_config('lock_timeout', %s, false),"
            " set_config('statement_timeout', '0', false),"
            " set_config('default_transaction_isolation', 'read committed', false),"
            " set_config('extra_float_digits', '1', false),"
            " set_config('plan_cache_mode', 'force_custom_plan', false)",
            (lock_timeout,),
        )

    def _run_batch(self, ops: list[Op[Conn, Any]]) -> None:
        # A record held again after it met a row lock is likely to meet it again: then the
        # batch runs statement by statement at once (brief lock waits, no pipeline to abort).
        self._lock_met = any(isinstance(op.error, _LockTimedOut) for op in ops)
        todo, tries, pipelined = ops, 0, not self._lock_met
        limit = math.inf if self.reader else STALL_TIMEOUTS * self.timeout
        self._deadline = time.monotonic() + limit
        while todo:
            again, why = self._attempt(todo, pipelined)
            if why is None and again:  # an operation failed: which one, statement by statement
                pipelined = False
            if why is not None:  # the whole batch again
                tries += 1
                if time.monotonic() > self._deadline:  # the watchdog broke it off, or soon will
                    _fail(todo, self._unavailable(why, f"could not commit within {limit:g} s"))
                    break
                if tries == _TRIES:
                    _fail(todo, self._unavailable(why))
                    break
                logger.info("%s: running a batch again: %s", self.where, one_line(why))
                time.sleep(random.uniform(0, _BACKOFF_S * tries))  # the writer thread's own
            todo = again

    def _attempt(
        self, ops: list[Op[Conn, Any]], pipelined: bool
    ) -> tuple[list[Op[Conn, Any]], Exception | None]:
        """Run `ops` in one transaction; return those to run again, and why if it is all of
        them for the batch's sake (not for one operation's error); ([], None) when done.

        `pipelined`: in libpq's pipeline mode, where a statement is sent without waiting for
        the answer to the one before (the answers `_Later` reads come back together; an
        operation that reads at once costs a round trip of its own).
        An operation's own error then surfaces at a later read, so it makes the batch run
        again statement by statement, which tells whose it was. Past the batch's deadline the
        watchdog breaks the connection off."""
        self._replies.transaction_begins()
        wait = min(self.timeout, OUTAGE_WAIT_S) if self._no_connection else self.timeout
        try:
            conn = self._pool.getconn(wait)
        except psycopg_pool.PoolTimeout as exc:
            self._no_connection = True
            _fail(ops, self._unavailable(exc, "no connection to the database"))
            return [], None
        self._no_connection = False
        pid, committing, xid = conn.info.backend_pid, False, None
        failed: Op[Conn, Any] | None = None
        unknown_failure = False  # an operation failed in the pipeline: whose is not known
        error: Exception | None = None
        with self._bounded(conn, self._deadline):
            try:
                if pipelined:
                    own_error, xid = _run_pipelined(conn, ops)
                    unknown_failure = own_error is not None
                    self._lock_met |= isinstance(own_error, errors.LockNotAvailable)
                else:
                    conn.execute("BEGIN")
                    if self._lock_met:
                        # A lock held past lock_timeout is likely held still: each operation
                        # that meets it fails at once, alone, not after a full wait each.
                        conn.execute(f"SET LOCAL lock_timeout = '{_RERUN_LOCK_WAIT_MS}ms'")
                    failed = _run_each(conn, ops)
                    if failed is None:
                        xid = _xid(conn.execute(_XID))
                if not unknown_failure and failed is None:
                    committing = True
                    self._commit(conn)
            except Exception as exc:
                error = exc
                if not conn.closed:
                    with suppress(psycopg.Error):
                        conn.execute("ROLLBACK")
            finally:
                lost = conn.closed
                if unknown_failure or error is not None:
                    # Where a failed pipeline skipped the Parse of a statement psycopg was
                    # preparing, psycopg takes it as prepared, and each later run of it would
                    # fail (InvalidSqlStatementName: 500s until a restart). A new connection
                    # has none.
                    conn.close()
                self._pool.putconn(conn)  # a closed one is replaced (in the background)
        if unknown_failure:
            return ops, None
        if failed is not None:
            if isinstance(failed.error, errors.LockNotAvailable):
                self._lock_met = True
                locked = self._unavailable(failed.error, "a lock wait timed out", _LockTimedOut)
                failed.error = locked
            return [op for op in ops if op is not failed], None
        if error is None:
            self._did_commit()
            return [], None
        if not lost:
            if _rolled_back(error):
                # A deadlock's or a serialization failure's victim, found even at COMMIT (the
                # unique check waits there): rolled back, so the batch runs again.
                return ops, error
            _fail(ops, self._unavailable(error))
            return [], None
        if not committing:
            return ops, error  # the server rolled it back
        outcome = self._outcome(xid, pid)
        if outcome == "aborted":
            return ops, error
        if outcome == "committed":
            self._did_commit()
            return [], None
        unknown = self._unavailable(error, f"connection lost while committing ({outcome})")
        unknown.may_have_taken_effect = True  # a charge in it is refunded (base.StoreUnavailable)
        _fail(ops, unknown)
        return [], None

    def _commit(self, conn: Conn) -> None:
        conn.execute("COMMIT")

    def _did_commit(self) -> None:
        self.commits += 1
        self._replies.transaction_committed()

    def _outcome(self, xid: str | None, backend_pid: int) -> str:
        """Whether a transaction whose COMMIT's answer was lost committed, asked afresh."""
        if xid is None:
            return "aborted"  # it wrote nothing, so running it again is safe
        deadline = time.monotonic() + self.timeout
        while True:  # on a new connection each time one is lost (the database restarting)
            wait = max(0.0, deadline - time.monotonic())
            try:
                with (
                    self._pool.connection(timeout=wait) as conn,
                    self._bounded(conn, deadline + self.timeout),
                ):
                    self._no_connection = False
                    # Its backend may not know yet that we are gone: end it (and the
                    # transaction, if the COMMIT never arrived) rather than wait for it; the
                    # xid tells it from another backend that got its pid since.
                    conn.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE pid = %s AND backend_xid = xid(%s::xid8)",
                        (backend_pid, xid),
                    )
                    while True:
                        row = conn.execute("SELECT pg_xact_status(%s::xid8)", (xid,)).fetchone()
                        status = "unknown" if row is None or row[0] is None else str(row[0])
                        if status != "in progress" or time.monotonic() > deadline:
                            return status
                        time.sleep(0.01)
            except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                # No connection in time: the batches after wait briefly, as after a batch's
                # own (a lost connection's error says one was got).
                self._no_connection = isinstance(exc, psycopg_pool.PoolTimeout)
                # Not again with next to no time left: its error would be a pool's "after
                # 0.00 sec", not why the connections were lost.
                if time.monotonic() >= deadline - _LAST_LOOKUP_S:
                    return f"unknown: {one_line(exc)}"
                time.sleep(0.01)

    def _unavailable(
        self,
        exc: Exception,
        what: str = "could not commit",
        kind: type[StoreUnavailable] = StoreUnavailable,
    ) -> StoreUnavailable:
        error = kind(f"{self.where}: {what}: {one_line(exc)}")
        error.__cause__ = exc
        return error

    async def _call_later(self, fn: Callable[[Conn], _Later[T]]) -> T:
        """`_call` for an operation whose result is read after its batch is sent."""
        return cast(T, await self._call(fn))

    async def begin(
        self, key: str, order_id: str, request_hash: str, body: bytes, owner: str
    ) -> Begun | Existing:
        attempt_id = new_id()
        return await self._call_later(
            lambda conn: _begin(conn, key, order_id, request_hash, body, owner, attempt_id)
        )

    async def restart(self, key: str, owner: str, expected_attempt: int) -> StoredOrder | None:
        attempt_id = new_id()
        return await self._call(
            lambda conn: _restart(conn, key, owner, expected_attempt, attempt_id)
        )

    def record_step(
        self, key: str, attempt_id: str, record: StepRecord, *, owner: str | None = None
    ) -> None:
        self._steps.add(step_row(key, attempt_id, record, owner))

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
        args = (http_status, reply, kind, key, attempt_id, owner)
        await self._call(lambda conn: _execute(conn, _FINISH, args))

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
        args = (http_status, reply, kind, key, attempt_id, owner)
        written = FinishedReply(http_status, reply, kind)

        def finish(conn: Conn) -> _Later[None]:
            cursor = conn.execute(_FINISH_SOON, args)

            def read() -> None:
                if cursor.fetchone() is not None:
                    self._replies.wrote(key, attempt_id, written)

            return _Later(read)

        self._put(finish, None, kept=True)  # see writer.py

    async def get(self, key: str) -> StoredOrder | None:
        return await self._call(lambda conn: _get(conn, key))

    async def finished_reply(self, key: str, attempt_id: str) -> FinishedReply | None:
        """Without a statement if finish_soon wrote it in this transaction or a committed one
        (read once the batch is sent, after the finish's own answer); else a SELECT then, a
        round trip of its own."""

        def read(conn: Conn) -> _Later[FinishedReply | None]:
            def written() -> FinishedReply | None:
                return self._replies.take(key, attempt_id) or _finished_reply(conn, key, attempt_id)

            return _Later(written)

        return await self._call_later(read)

    async def list_orders(
        self,
        *,
        needs_attention: bool = False,
        after: tuple[float, str] | None = None,
        limit: int = LIST_PAGE,
    ) -> list[tuple[StoredOrder, int]]:
        return await self._call(lambda conn: _list_orders(conn, needs_attention, after, limit))

    async def renew_lease(self, owner: str, timeout: float) -> None:  # noqa: ASYNC109  # a lease's length
        self._clock.renewed(timeout)
        await self._call(lambda conn: _execute(conn, _RENEW, (owner, timeout)))

    async def release_lease(self, owner: str) -> None:
        await self._call(
            lambda conn: _execute(conn, "DELETE FROM leases WHERE owner = %s", (owner,))
        )

    async def claim_interrupted(
        self, owner: str, limit: int, *, busy: Collection[str] = ()
    ) -> list[StoredOrder]:
        busy = list(busy)  # read in the writer thread: a copy, not the caller's live keys

        def claim(conn: Conn) -> list[StoredOrder]:
            # The database's clock against ours: clock_timestamp(), the time it answers at
            # (now(), the transaction's start, may be long before in a slow batch), against
            # the middle of the round trip, give or take half of it: a slow round trip (a
            # stall of ours, a database just resumed) widens what passes for a step, and never
            # skips the look (the claim would then judge leases by a clock just stepped).
            before = time.monotonic()
            row = conn.execute(_CLOCK).fetchone()
            after = time.monotonic()
            assert row is not None
            self._clock.observe(row[0], (before + after) / 2, error=(after - before) / 2)
            stale = self._clock.owners_to_take(lambda: _leases(conn))
            if stale is None:  # the database's clock stepped: the owners renew on it first
                return []
            return _claim(conn, owner, limit, stale, busy)

        return await self._call(claim)

    async def running_of(self, owner: str, older_than: float) -> list[StoredOrder]:
        return await self._call(lambda conn: _running_of(conn, owner, older_than))

    async def charge(self, charge_id: str, key: str, amount: int) -> None:
        await self._call(lambda conn: _execute(conn, _CHARGE, (charge_id, key, amount)))

    async def refund(self, charge_id: str, key: str) -> None:
        await self._call(lambda conn: _execute(conn, _REFUND, (charge_id, key)))

    async def net_charge(self, key: str) -> int:
        return await self._call(lambda conn: _net_charge(conn, key))

    async def purge(self, older_than: float, limit: int) -> int:
        return await self._call(lambda conn: _purge(conn, older_than, limit))


# -- opening ------------------------------------------------------------------------------


def _migrate(conn: Conn, where: str) -> None:
    """Create or upgrade the schema in the first schema of the search_path, once."""
    # Another host's migration (or an operator's lock) is waited for, but not forever (the
    # opening has turned statement_timeout off); and a stricter default isolation would
    # have the version read again after the lock (below) in the first read's snapshot,
    # from before that host's migration.
    conn.execute(
        "SELECT set_config('lock_timeout', %s, false),"
        " set_config('default_transaction_isolation', 'read committed', false)",
        (f"{MIGRATION_WAIT:g}s",),
    )
    for tries_left in reversed(range(_MIGRATION_TRIES)):
        try:
            _migrate_once(conn, where)
            return
        except errors.DeadlockDetected:
            if not tries_left:
                raise
            logger.warning("%s: the schema's migration deadlocked: trying it again", where)


def _migrate_once(conn: Conn, where: str) -> None:
    """One try of `_migrate`, in one transaction: all of it or nothing."""
    with conn.transaction():
        # A database it may not write (a hot standby; default_transaction_read_only on the
        # role or the database) is refused now, as SQLite refuses a file it may not write:
        # with the schema made already, opening it writes nothing that would tell.
        if conn.execute("SHOW transaction_read_only").fetchone() == ("on",):
            raise StoreError(
                f"{where}: cannot open the store: the database is read-only (a standby, or"
                " default_transaction_read_only set for the role or the database)"
            )
        version = _schema_version(conn, where)
        if version == SCHEMA_VERSION:
            return  # the usual case: no lock taken
        version = _lock_migration(conn, where)
        for migration in _MIGRATIONS[version:]:
            for statement in migration:
                conn.execute(statement)
        if version < 3 <= SCHEMA_VERSION:  # migration 3 ran
            _drop_if_free(conn, where, _REPLACED_BY_3)
        conn.execute(f"UPDATE {VERSION_TABLE} SET version = %s", (SCHEMA_VERSION,))


def _lock_migration(conn: Conn, where: str) -> int:
    """Take the locks that keep other hosts from migrating the schema at the same time, and
    return its version read again under them (another host may have migrated it meanwhile).

    The schema's own lock, so that a migration in another schema of the database does not
    hold this one up (a first start waited for another schema's upgrade, up to the lock
    wait). Hosts of older releases, still running in a rolling upgrade, take the database's
    MIGRATION_LOCK alone, and migrate a schema below OLDER_RELEASES_MIGRATE_TO (up to it):
    below that this takes MIGRATION_LOCK too, always after the schema's own, so that no two
    hosts wait for each other (and a host that waits for this schema's migration holds up no
    other schema's). From that version on no older host migrates the schema, but one that
    read the version below it may still write its own (its UPDATE, unconditional) over this
    migration's: the next start then makes the newer migrations again (IF NOT EXISTS)."""
    conn.execute(
        "SELECT pg_advisory_xact_lock(%s + oid::bigint) FROM pg_namespace"
        " WHERE nspname = current_schema()",
        (SCHEMA_MIGRATION_LOCKS,),
    )
    version = _schema_version(conn, where)
    if version < OLDER_RELEASES_MIGRATE_TO:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        version = _schema_version(conn, where)
    return version


def _drop_if_free(conn: Conn, where: str, index: str) -> None:
    """Drop an index of orders in the migration's transaction, unless its lock is busy.

    DROP INDEX takes the table's exclusive lock, which waits for every transaction that has
    read orders (a pg_dump's, for as long as it runs) while every statement on orders waits
    behind it: every host's orders failed with 503 for the migration's lock wait (60 s), and
    then the host failed to start. So it waits LOCK_WAIT_S at most (above deadlock_timeout,
    so that a batch that read orders and waits for the migration is found and ended), and
    past that leaves the index, which costs writes what it did before, for an operator.
    Named with its schema: one gone already (an older host set the version back) is not
    looked for in the next schema of the search_path, another store's."""
    row = conn.execute("SELECT current_schema()").fetchone()
    assert row is not None
    try:
        with conn.transaction():  # a savepoint
            conn.execute(f"SET LOCAL lock_timeout = '{LOCK_WAIT_S:g}s'")
            conn.execute(SQL("DROP INDEX IF EXISTS {}").format(Identifier(row[0], index)))
    except errors.LockNotAvailable:
        logger.warning(
            "%s: index %s was left in place, another transaction holding orders (a backup?):"
            " drop it at a quiet time (DROP INDEX CONCURRENTLY %s)",
            where,
            index,
            index,
        )


def _check_readable(conn: Conn, where: str) -> None:
    """A reader's check: StoreError unless the schema holds this program's store as it is."""
    version = _schema_version(conn, where)
    if version == 0:
        raise StoreError(f"{where}: no order store there (check the URL and its search_path)")
    if version < SCHEMA_VERSION:
        raise StoreError(
            f"{where}: the order store's schema is version {version}, older than this"
            f" program's {SCHEMA_VERSION}: a server of this version upgrades it"
        )


def _schema_version(conn: Conn, where: str) -> int:
    """The schema's version, 0 for an empty one; StoreError if it is not ours to use."""
    row = conn.execute(
        "SELECT current_schema(), array(SELECT table_name::text FROM information_schema.tables"
        " WHERE table_schema = current_schema() AND table_name = ANY(%s))",
        ([VERSION_TABLE, *TABLES],),
    ).fetchone()
    assert row is not None
    schema, present = row
    if schema is None:
        raise StoreError(
            f"{where}: cannot open the store: no schema of the search_path exists"
            " (create it, or name another with ?options=-csearch_path%3DSCHEMA)"
        )
    if VERSION_TABLE not in present:
        if present:
            raise StoreError(
                f"{where}: not an order store: schema {schema} has table(s)"
                f" {', '.join(sorted(present))} of something else (choose another schema"
                " with ?options=-csearch_path%3DSCHEMA)"
            )
        return 0
    versions = conn.execute(f"SELECT version FROM {VERSION_TABLE}").fetchall()
    if len(versions) != 1:
        raise StoreError(f"{where}: not an order store: {schema}.{VERSION_TABLE} is damaged")
    version: int = versions[0][0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{where}: the store's schema version {version} is newer than this program's"
            f" {SCHEMA_VERSION}: upgrade order-pipeline"
        )
    return version


def _where(params: dict[str, Any], url: str) -> str:
    """postgresql://USER@HOST:PORT/DBNAME of the URL's parameters, without the password; or
    as `shown_url` shows it, if libpq read the URL in a way that may hold the password (an
    unescaped `/` in it makes a "port" of the password and a "dbname" of the rest)."""
    if not str(params.get("port") or "0").isdigit() or "@" in str(params.get("dbname") or ""):
        return shown_url(url)
    user = f"{params['user']}@" if params.get("user") else ""
    # No host given: none shown, for libpq's default is PGHOST's or a Unix socket, not localhost.
    host = params.get("host") or params.get("hostaddr") or ""
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{host}{port}/{params.get('dbname') or ''}"


def _rolled_back(exc: Exception) -> bool:
    """A deadlock's victim or a serialization failure (SQLSTATE class 40): worth a rerun."""
    return isinstance(exc, psycopg.Error) and (exc.sqlstate or "").startswith("40")


def _batch_error(exc: Exception) -> bool:
    return isinstance(exc, _BATCH_ERRORS) and not isinstance(exc, errors.LockNotAvailable)


def _run_pipelined(conn: Conn, ops: list[Op[Conn, Any]]) -> tuple[Exception | None, str | None]:
    """Run `ops` in pipeline mode: (the error, None) if one of them failed by itself (then
    rolled back), else (None, the transaction's id if it wrote anything)."""
    try:
        with conn.pipeline():
            conn.execute("BEGIN")
            for op in ops:
                op.error = None
                op.result = op.fn(conn)
            for op in ops:  # the first read brings every answer sent so far: one round trip
                if isinstance(op.result, _Later):
                    op.result = op.result.read()
            xid = conn.execute(_XID)  # after every write; answered as the pipeline closes
    except Exception as exc:
        aborted = isinstance(exc, errors.PipelineAborted)  # after an operation's own error
        if conn.closed or (_batch_error(exc) and not aborted):
            raise  # the batch's trouble, not an operation's
        conn.execute("ROLLBACK")
        return exc, None
    return None, _xid(xid)


def _xid(cursor: psycopg.Cursor[tuple[Any, ...]]) -> str | None:
    row = cursor.fetchone()
    return None if row is None else cast(str | None, row[0])


def _run_each(conn: Conn, ops: list[Op[Conn, Any]]) -> Op[Conn, Any] | None:
    """Run `ops` one by one; the one that failed by itself (then rolled back), or None."""
    for op in ops:
        op.error = None
        try:
            op.result = op.fn(conn)
            if isinstance(op.result, _Later):
                op.result = op.result.read()
        except Exception as exc:
            if conn.closed or _batch_error(exc):
                raise  # the batch's trouble, not this operation's
            conn.execute("ROLLBACK")
            op.error = exc
            return op
    return None


def _fail(ops: Iterable[Op[Conn, Any]], error: StoreUnavailable) -> None:
    for op in ops:
        op.error = error


# -- operations, run by the writer thread -------------------------------------------------

_FINISH = (
    f"UPDATE orders SET state = '{FINISHED}', finished_at = now(), http_status = %s, reply = %s,"
    f" kind = %s WHERE key = %s AND attempt_id = %s AND state = '{RUNNING}'"
    " AND owner = coalesce(%s::text, owner)"
)
_FINISH_SOON = _FINISH + " RETURNING true"  # a row if it was written
_RENEW = (
    "INSERT INTO leases (owner, expires_at) VALUES (%s, now() + %s * interval '1 second')"
    " ON CONFLICT (owner) DO UPDATE SET expires_at = excluded.expires_at"
)
_CHARGE = "INSERT INTO ledger (charge_id, key, amount) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING"
# A refund of a charge not (yet) made leaves a refunded row of 0: the charge, if it comes
# late (its process had lost the order to recovery), is then void instead of taken.
_REFUND = (
    "INSERT INTO ledger (charge_id, key, amount, refunded) VALUES (%s, %s, 0, true)"
    " ON CONFLICT (charge_id) DO UPDATE SET refunded = true"
)
_NET = "SELECT coalesce(sum(amount), 0)::bigint FROM ledger WHERE key = {} AND NOT refunded"
# Step records as one JSON array of `step_row`s, in order: a record whose attempt is no longer
# the order's, or whose order another process claimed, is dropped, and so is one that would
# take its step's undo back (base.takes_undo_back: one from before the order was claimed
# back); one row per step (an upsert may not touch a row twice: `_record_steps`). The attempt
# is checked by a scalar subquery, a lookup of the key's index per record: the planner made
# an EXISTS a hash join that read every order, once per batch.
_RECORD_STEPS = f"""
    INSERT INTO steps (attempt_id, {_STEP})
    SELECT r ->> 0, r ->> 1, r ->> 2, r ->> 3, (r ->> 4)::bigint, r ->> 5, (r ->> 6)::bigint
    FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS rows (r, n)
    WHERE (SELECT attempt_id FROM orders WHERE key = r ->> 7 AND owner = coalesce(r ->> 8, owner))
        = r ->> 0
    ORDER BY n
    ON CONFLICT (attempt_id, step) DO UPDATE SET
        status = excluded.status, detail = excluded.detail, duration_ms = excluded.duration_ms,
        compensation = excluded.compensation, compensation_ms = excluded.compensation_ms
    WHERE {NO_UNDO_TAKEN_BACK}
"""
# Orders with their current attempt's steps (NULLs for an order without any), in order.
_WITH_STEPS = (
    f"SELECT {_ORDER}, {_STEP} FROM orders LEFT JOIN steps ON steps.attempt_id = orders.attempt_id"
)
_LIVE_LEASES = "SELECT owner FROM leases WHERE expires_at > now()"
# Running orders of another owner without a live lease, or whose lease nobody renewed since
# the database's clock stepped back (`stale`: ClockWatch).
_DEAD_OR_STALE_OWNER = (
    f"state = '{RUNNING}' AND owner <> %(me)s"
    f" AND (owner NOT IN ({_LIVE_LEASES}) OR owner = ANY(%(stale)s::text[]))"
)
_CLOCK = "SELECT extract(epoch FROM clock_timestamp())::float8"
_LEASES = (
    "SELECT owner, extract(epoch FROM expires_at)::float8, extract(epoch FROM now())::float8"
    " FROM leases"
)


def _leases(conn: Conn) -> tuple[dict[str, float], float]:
    """Every owner's lease expiry, and the database's `now()` (minus infinity if none)."""
    rows = conn.execute(_LEASES).fetchall()
    return {owner: expires for owner, expires, _ in rows}, rows[0][2] if rows else -math.inf


def _execute(conn: Conn, sql: str, args: tuple[Any, ...]) -> None:
    conn.execute(sql, args)


def _orders(rows: Iterable[tuple[Any, ...]]) -> list[StoredOrder]:
    """Orders from rows of _WITH_STEPS, one per order, steps grouped."""
    found: dict[str, tuple[tuple[Any, ...], list[StepRecord]]] = {}
    for row in rows:
        head, step = row[:_ORDER_FIELDS], row[_ORDER_FIELDS:]
        steps = found.setdefault(head[0], (head, []))[1]
        if step[0] is not None:
            steps.append(StepRecord(*step))
    return [_new_order(*head, steps=tuple(steps)) for head, steps in found.values()]


def _get(conn: Conn, key: str) -> StoredOrder | None:
    rows = conn.execute(
        _WITH_STEPS + " WHERE orders.key = %s ORDER BY steps.seq",
        (key,),
    ).fetchall()
    return _orders(rows)[0] if rows else None


_FINISHED_REPLY = (
    f"SELECT http_status, reply, kind FROM orders WHERE key = %s AND attempt_id = %s"
    f" AND state = '{FINISHED}'"
)


def _finished_reply(conn: Conn, key: str, attempt_id: str) -> FinishedReply | None:
    row = conn.execute(_FINISHED_REPLY, (key, attempt_id)).fetchone()
    return None if row is None else FinishedReply(*row)


_BEGIN = (
    f"INSERT INTO orders (key, order_id, request_hash, body, attempt, attempt_id, owner, state,"
    f" started_at) VALUES (%s, %s, %s, %s, 1, %s, %s, '{RUNNING}', now())"
    f" ON CONFLICT (key) DO NOTHING RETURNING {_ORDER}"
)


def _begin(
    conn: Conn, key: str, order_id: str, request_hash: str, body: bytes, owner: str, attempt: str
) -> _Later[Begun | Existing]:
    args = (key, order_id, request_hash, body, attempt, owner)
    inserted = conn.execute(_BEGIN, args)

    def read() -> Begun | Existing:
        row = inserted.fetchone()
        for tries in range(3):  # a purge by another host may free the key between the two
            if row is not None:
                return Begun(_new_order(*row))
            # The winner, committed, or one earlier or (read after the batch is sent) later
            # in this batch: a concurrent begin of the key, which the order sees either way.
            existing = _get(conn, key)
            if existing is not None:
                return Existing(existing)
            if tries < 2:
                row = conn.execute(_BEGIN, args).fetchone()
        raise StoreUnavailable(f"key {key!r} was taken and freed three times in a row")

    return _Later(read)


def _restart(
    conn: Conn, key: str, owner: str, expected_attempt: int, attempt_id: str
) -> StoredOrder | None:
    old = conn.execute(
        f"SELECT attempt_id FROM orders WHERE key = %s AND state = '{FINISHED}'"
        f" AND kind = '{INTERRUPTED}' AND attempt = %s FOR UPDATE",
        (key, expected_attempt),
    ).fetchone()
    if old is None:  # not interrupted, or another caller restarted it first (we waited)
        return None
    conn.execute("DELETE FROM steps WHERE attempt_id = %s", (old[0],))
    row = conn.execute(
        f"UPDATE orders SET attempt = attempt + 1, attempt_id = %s, owner = %s,"
        f" state = '{RUNNING}', started_at = now(), finished_at = NULL, http_status = NULL,"
        f" reply = NULL, kind = NULL WHERE key = %s RETURNING {_ORDER}",
        (attempt_id, owner, key),
    ).fetchone()
    assert row is not None  # locked above
    return _new_order(*row)


def _record_steps(conn: Conn, rows: list[tuple[Any, ...]]) -> None:
    # A later record of a step replaces an earlier one, in the earlier one's place, unless it
    # would take its undo back: as SQLite's upsert of each in turn.
    latest: dict[tuple[Any, Any], tuple[Any, ...]] = {}
    for row in rows:
        earlier = latest.get(row[:2])
        if earlier is None or not takes_undo_back(earlier[5], row[5]):
            latest[row[:2]] = row
    conn.execute(_RECORD_STEPS, (orjson.dumps(list(latest.values())).decode(),))


def _net_charge(conn: Conn, key: str) -> int:
    row = conn.execute(_NET.format("%s"), (key,)).fetchone()
    assert row is not None
    return int(row[0])


def _list_orders(
    conn: Conn, needs_attention: bool, after: tuple[float, str] | None, limit: int
) -> list[tuple[StoredOrder, int]]:
    abandoned = f"(orders.state = '{RUNNING}' AND orders.owner NOT IN ({_LIVE_LEASES}))"
    conditions = []
    args: dict[str, Any] = {"limit": limit}
    if after is not None:
        # A range of orders_started. started_at came as float8 seconds, exact to a quarter of
        # a microsecond until 2106: to_timestamp rounds them back to the very timestamp.
        conditions.append('(started_at, key COLLATE "C") > (to_timestamp(%(at)s), %(key)s)')
        args |= {"at": after[0], "key": after[1]}
    if needs_attention:
        # Through orders_attention: the running and failed orders, not every order (a page
        # read a million to find a thousand: 0.85 s, in one read transaction).
        conditions.append(MAY_NEED_ATTENTION)
        conditions.append(
            f"({abandoned} OR kind = %(failed)s OR EXISTS (SELECT 1 FROM steps"
            f" WHERE steps.attempt_id = orders.attempt_id AND {_UNDO_FAILED}))"
        )
        args |= {"failed": COMPENSATION_FAILED}
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    rows = conn.execute(
        f"SELECT {_ORDER}, ({_NET.format('orders.key')}), {abandoned} FROM orders {where}"
        ' ORDER BY started_at, key COLLATE "C" LIMIT %(limit)s',
        args,
    ).fetchall()
    steps = _steps_of(conn, [row[5] for row in rows])
    return [
        (
            _new_order(
                *row[:_ORDER_FIELDS],
                steps=steps.get(row[5], ()),
                abandoned=bool(row[_ORDER_FIELDS + 1]),
            ),
            int(row[_ORDER_FIELDS]),
        )
        for row in rows
    ]


def _claim(
    conn: Conn, owner: str, limit: int, stale: set[str], busy: Collection[str]
) -> list[StoredOrder]:
    """Take up to `limit` orders of dead owners, each for one claimer only; not those under
    the keys `busy` (the claimer's own runs).

    First lock candidates, skipping rows another claimer holds. Then take those still
    claimable, judged by a statement of its own: its snapshot, newer than every lock we got,
    sees the lease of a claimer that took one of them and committed while we were locking (the
    first statement's snapshot can predate that lease, and would let us take the order too).

    Before both, the lock a renewal takes on the leases table (ROW EXCLUSIVE, which neither
    renewals nor claims conflict with): a lock that stops renewals but not reads (an
    operator's LOCK TABLE, a DDL) stops claims too, rather than let them judge owners dead by
    leases nobody could renew; the claim then fails alone at lock_timeout.
    """
    conn.execute("LOCK TABLE leases IN ROW EXCLUSIVE MODE")
    args = {"me": owner, "limit": limit, "stale": sorted(stale)}
    locked = conn.execute(
        f"SELECT key FROM orders WHERE {_DEAD_OR_STALE_OWNER}"
        " AND key <> ALL(%(busy)s::text[]) LIMIT %(limit)s FOR UPDATE SKIP LOCKED",
        {**args, "busy": list(busy)},
    ).fetchall()
    if not locked:
        return []
    rows = conn.execute(
        f"UPDATE orders SET owner = %(me)s WHERE key = ANY(%(keys)s) AND {_DEAD_OR_STALE_OWNER}"
        f" RETURNING {_ORDER}",
        {**args, "keys": [row[0] for row in locked]},
    ).fetchall()
    steps = _steps_of(conn, [row[5] for row in rows])
    return [_new_order(*row, steps=steps.get(row[5], ())) for row in rows]


def _steps_of(conn: Conn, attempt_ids: list[str]) -> dict[str, tuple[StepRecord, ...]]:
    """The step records of these attempts, in one statement (not one per order)."""
    steps: dict[str, list[StepRecord]] = {}
    if attempt_ids:
        for attempt_id, *step in conn.execute(
            f"SELECT attempt_id, {_STEP} FROM steps WHERE attempt_id = ANY(%s) ORDER BY seq",
            (attempt_ids,),
        ):
            steps.setdefault(attempt_id, []).append(StepRecord(*step))
    return {attempt_id: tuple(records) for attempt_id, records in steps.items()}


def _running_of(conn: Conn, owner: str, older_than: float) -> list[StoredOrder]:
    rows = conn.execute(
        _WITH_STEPS + f" WHERE orders.state = '{RUNNING}' AND orders.owner = %s"
        " AND orders.started_at < now() - make_interval(secs => %s)"
        " ORDER BY orders.key, steps.seq",
        (owner, older_than),
    ).fetchall()
    return _orders(rows)


def _purge(conn: Conn, older_than: float, limit: int) -> int:
    # A range of orders_purgeable, the expired orders alone: not the compensation_failed ones,
    # kept for good, which orders_finished_at held (20,000 of them: about 6 ms a batch).
    # SKIP LOCKED: another host's purge takes other rows instead of waiting for these.
    row = conn.execute(
        "WITH gone AS (DELETE FROM orders WHERE key IN (SELECT key FROM orders"
        f" WHERE state = '{FINISHED}' AND finished_at < now() - make_interval(secs => %s)"
        f" AND {_PURGEABLE} LIMIT %s FOR UPDATE SKIP LOCKED)"
        " RETURNING key, attempt_id),"
        " s AS (DELETE FROM steps WHERE attempt_id IN (SELECT attempt_id FROM gone)),"
        " l AS (DELETE FROM ledger WHERE key IN (SELECT key FROM gone)),"
        " d AS (DELETE FROM leases WHERE owner IN (SELECT owner FROM leases"
        " WHERE expires_at < now() - make_interval(secs => greatest(%s, 0))"
        " FOR UPDATE SKIP LOCKED))"
        " SELECT count(*) FROM gone",
        (older_than, limit, older_than),
    ).fetchone()
    assert row is not None
    return int(row[0])
