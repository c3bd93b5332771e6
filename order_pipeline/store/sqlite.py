"""The order store in one SQLite file, which every worker process of a host can share.

One writer thread owns the connection (`writer.py`; sqlite3 refuses a connection across
threads, and `trio.to_thread` may pick another thread per call). The thread runs each batch
of queued operations in one transaction
(BEGIN IMMEDIATE, so the write lock is taken at once and two processes never deadlock
upgrading a read lock), commits once, and then wakes every waiting task with a single
`run_sync_soon`. That group commit is what makes thousands of orders a second possible with
one fsync per batch instead of one per order. An operation that fails by itself (a bug, a
value SQLite cannot take, a disk full on its write: StoreUnavailable) is rolled back with its
batch and gets its error; the others run again in a new transaction (a savepoint per
operation would cost two statements each, on every order). If the batch fails as a whole
(locked past busy_timeout, a read-only file, SQLite rolling the transaction back), every
operation of the batch raises StoreUnavailable.

Reads go through the same thread and transaction: they see every write queued before them.

Durability: WAL with synchronous=FULL, so a commit survives a power loss, not just a crash of
the process. Measured here, one order at a time (two commits each): 0.7 ms per order with FULL,
0.33 ms with NORMAL; with concurrent orders one fsync covers a whole batch, so the difference
vanishes where it would matter, and NORMAL was not worth its risk.

Opening (in the thread too) reads the file's header, then its application_id and
user_version on a read-only connection, before writing anything, so a file that is not ours
is refused untouched (a WAL left beside it included); creating or migrating the
schema runs under BEGIN IMMEDIATE, so two processes opening one new file at once are safe.

Cancellation: as every backend's, `writer.py`: a call is cancellable until its operation is
queued, and then waits (shielded) for its batch to commit, bounded by the batch ahead and its
own, each at most busy_timeout plus one commit.
"""

from __future__ import annotations

import logging
import os
import resource
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import quote

import orjson

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
    step_row,
)
from .writer import Op, RepliesWritten, RowsWrittenTogether, WriterThread

logger = logging.getLogger(__name__)

_HEADER: Final = b"SQLite format 3\x00"
# Between two tries for the write lock another process holds: about one commit of theirs.
_BUSY_PAUSE_S: Final = 0.0005
# Room a server's store needs beside its file: the WAL grows to about 4 MB between
# checkpoints (1,000 pages of 4 KB, SQLite's default), and the -shm takes 32 KB.
WAL_ROOM: Final = 4 * 1024 * 1024
APPLICATION_ID: Final = 0x6F726470  # "ordp": tells our files from other SQLite databases
SCHEMA_VERSION: Final = 3
# The orders a purge may take (not those it keeps: running, compensation_failed), as its
# partial index has them and its query repeats: SQLite matches the terms as written.
_PURGEABLE: Final = f"finished_at IS NOT NULL AND kind IS NOT '{COMPENSATION_FAILED}'"
# _MIGRATIONS[v] takes a database from user_version v to v + 1, statement by statement
# (executescript would commit the surrounding transaction). A migration runs under the write
# lock, as the process that opens the file first finds it; every other waits for it.
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE orders (
            key TEXT PRIMARY KEY,
            order_id TEXT NOT NULL,
            request_hash TEXT NOT NULL,
            body BLOB NOT NULL,
            attempt INTEGER NOT NULL,
            attempt_id TEXT NOT NULL,
            owner TEXT NOT NULL,
            state TEXT NOT NULL,
            started_at REAL NOT NULL,
            finished_at REAL,
            http_status INTEGER,
            reply BLOB,
            kind TEXT
        )""",
        "CREATE INDEX orders_state_owner ON orders (state, owner)",
        "CREATE INDEX orders_finished_at ON orders (finished_at)",
        """CREATE TABLE steps (
            attempt_id TEXT NOT NULL,
            step TEXT NOT NULL,
            status TEXT NOT NULL,
            detail TEXT,
            duration_ms INTEGER NOT NULL,
            compensation TEXT,
            compensation_ms INTEGER,
            PRIMARY KEY (attempt_id, step)
        )""",
        "CREATE TABLE leases (owner TEXT PRIMARY KEY, expires_at REAL NOT NULL)",
        """CREATE TABLE ledger (
            charge_id TEXT PRIMARY KEY,
            key TEXT NOT NULL,
            amount INTEGER NOT NULL,
            refunded INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX ledger_key ON ledger (key)",
    ),
    # 2: the listing's order, so that each of its pages is a range of this index (not a scan
    # and a sort of every order); key's BINARY collation compares UTF-8 bytes: code points.
    ("CREATE INDEX orders_started ON orders (started_at, key)",),
    # 3: the orders that may need attention in the listing's order, so that a page of
    # --needs-attention reads them, not every order (base.MAY_NEED_ATTENTION); and the
    # purge's range without the orders it keeps, so that it no longer reads past every
    # compensation_failed one (nor the running, whose finished_at is NULL) at each batch.
    (
        f"CREATE INDEX orders_attention ON orders (started_at, key) WHERE {MAY_NEED_ATTENTION}",
        f"CREATE INDEX orders_purgeable ON orders (finished_at) WHERE {_PURGEABLE}",
        "DROP INDEX orders_finished_at",
    ),
)
assert len(_MIGRATIONS) == SCHEMA_VERSION

_ORDER = (
    "key, order_id, request_hash, body, attempt, attempt_id, owner, state, started_at,"
    " finished_at, http_status, reply, kind"
)  # in StoredOrder's field order, so StoredOrder(*row) builds one
_new_order: Callable[..., StoredOrder] = StoredOrder  # from a row of _ORDER's columns
_STEP = "step, status, detail, duration_ms, compensation, compensation_ms"
# An order's net charge, the one rule for `net_charge` and the listing (as postgres.py's _NET).
_NET = "SELECT coalesce(sum(amount), 0) FROM ledger WHERE key = {} AND refunded = 0"

T = TypeVar("T")
Conn = sqlite3.Connection


class SqliteStore(WriterThread[Conn]):
    """Orders in one SQLite file; `async with SqliteStore(path) as store:` opens and closes it.

    `busy_timeout` is how long a commit waits for another process's write lock before the
    batch raises StoreUnavailable. `commits` counts committed batches (for tests, benchmarks).
    A `reader` (an operator's listing) may open a file it cannot write; a server may not.
    """

    def __init__(
        self, path: Path | str, *, busy_timeout: float = 5.0, reader: bool = False
    ) -> None:
        super().__init__()
        self.reader = reader
        self.path = Path(path)
        self.where = str(self.path)
        self.busy_timeout = busy_timeout
        self.commits = 0
        self._conn: Conn  # the writer thread's own, from _connect
        self._file: tuple[int, int] | None  # the file it opened (`_identity`), checked each batch
        self._replies = RepliesWritten()  # what finish_soon wrote, for finished_reply
        self._steps = RowsWrittenTogether(self, _record_steps)
        # Leases are on the host's wall clock, which every process of the file shares; the
        # watch finds its steps (base.ClockWatch).
        self._clock = ClockWatch()

    # -- in the writer thread -------------------------------------------------------------

    def _open(self) -> None:
        self._conn = _connect(self.path, self.busy_timeout, reader=self.reader)
        self._file = _identity(self.path)
        self._now()  # the clock as it was at the start, to find a step before the first claim

    def _now(self) -> float:
        """The wall clock leases are measured on, watched for steps (in the writer thread)."""
        now = time.time()
        self._clock.observe(now, time.monotonic())
        return now

    def _close(self) -> None:
        self._conn.close()

    def _run_batch(self, ops: list[Op[Conn, Any]]) -> None:
        deadline = time.monotonic() + self.busy_timeout
        todo = ops
        while todo:
            todo = self._attempt(todo, deadline)

    def _attempt(self, ops: list[Op[Conn, Any]], deadline: float) -> list[Op[Conn, Any]]:
        """Run `ops` in one transaction; return those to run again: the others after one failed
        alone, or all of them while another process holds the write lock (until `deadline`)."""
        conn = self._conn
        try:
            if _identity(self.path) != self._file:
                raise _FileGone()
            self._replies.transaction_begins()
            # A reader's listing must not take the write lock: held for the whole listing, it
            # stalled every commit of the servers on the file (and their lease renewals).
            conn.execute("BEGIN" if self.reader else "BEGIN IMMEDIATE")
            for op in ops:
                op.error = None
                try:
                    op.result = op.fn(conn)
                except Exception as exc:
                    if _is_busy(exc) or not conn.in_transaction:
                        raise  # the batch's trouble (SQLite rolled it back), not this operation's
                    conn.execute("ROLLBACK")
                    op.error = _unavailable(self.path, exc) if _is_outage(exc) else exc
                    return [other for other in ops if other is not op]
            conn.execute("COMMIT")
            self.commits += 1
            self._replies.transaction_committed()
        except Exception as exc:
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            if _is_busy(exc) and time.monotonic() < deadline:
                time.sleep(_BUSY_PAUSE_S)  # the writer thread's own
                return ops
            for op in ops:
                op.error = _unavailable(self.path, exc)
        return []

    # -- the operations ------------------------------------------------------------------

    async def begin(
        self, key: str, order_id: str, request_hash: str, body: bytes, owner: str
    ) -> Begun | Existing:
        order = StoredOrder(
            key, order_id, request_hash, body, 1, new_id(), owner, RUNNING, time.time()
        )
        return await self._call(lambda conn: _begin(conn, order))

    async def restart(self, key: str, owner: str, expected_attempt: int) -> StoredOrder | None:
        attempt_id, now = new_id(), time.time()
        return await self._call(
            lambda conn: _restart(conn, key, owner, expected_attempt, attempt_id, now)
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
        args = (FINISHED, time.time(), http_status, reply, kind, key, attempt_id, RUNNING, owner)
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
        args = (FINISHED, time.time(), http_status, reply, kind, key, attempt_id, RUNNING, owner)
        written = FinishedReply(http_status, reply, kind)

        def finish(conn: Conn) -> None:
            if conn.execute(_FINISH, args).rowcount:
                self._replies.wrote(key, attempt_id, written)

        self._put(finish, None, kept=True)  # see writer.py

    async def get(self, key: str) -> StoredOrder | None:
        return await self._call(lambda conn: _get(conn, key))

    async def finished_reply(self, key: str, attempt_id: str) -> FinishedReply | None:
        """Without a read if finish_soon wrote it in this transaction or a committed one."""

        def read(conn: Conn) -> FinishedReply | None:
            return self._replies.take(key, attempt_id) or _finished_reply(conn, key, attempt_id)

        return await self._call(read)

    async def list_orders(
        self,
        *,
        needs_attention: bool = False,
        after: tuple[float, str] | None = None,
        limit: int = LIST_PAGE,
    ) -> list[tuple[StoredOrder, int]]:
        now = time.time()
        return await self._call(lambda conn: _list_orders(conn, needs_attention, after, limit, now))

    async def renew_lease(self, owner: str, timeout: float) -> None:  # noqa: ASYNC109 (a lease's length)
        self._clock.renewed(timeout)
        await self._call(lambda conn: _execute(conn, _RENEW, (owner, self._now() + timeout)))

    async def release_lease(self, owner: str) -> None:
        await self._call(
            lambda conn: _execute(conn, "DELETE FROM leases WHERE owner = ?", (owner,))
        )

    async def claim_interrupted(
        self, owner: str, limit: int, *, busy: Collection[str] = ()
    ) -> list[StoredOrder]:
        busy = list(busy)  # read in the writer thread: a copy, not the caller's live keys

        def claim(conn: Conn) -> list[StoredOrder]:
            now = self._now()
            stale = self._clock.owners_to_take(
                lambda: (dict(conn.execute("SELECT owner, expires_at FROM leases")), now)
            )
            if stale is None:  # the wall clock stepped: the owners renew on it first
                return []
            return _claim(conn, owner, limit, now, stale, busy)

        return await self._call(claim)

    async def running_of(self, owner: str, older_than: float) -> list[StoredOrder]:
        started_before = time.time() - older_than
        return await self._call(lambda conn: _running_of(conn, owner, started_before))

    async def charge(self, charge_id: str, key: str, amount: int) -> None:
        await self._call(lambda conn: _execute(conn, _CHARGE, (charge_id, key, amount)))

    async def refund(self, charge_id: str, key: str) -> None:
        await self._call(lambda conn: _execute(conn, _REFUND, (charge_id, key)))

    async def net_charge(self, key: str) -> int:
        return await self._call(
            lambda conn: int(conn.execute(_NET.format("?"), (key,)).fetchone()[0])
        )

    async def purge(self, older_than: float, limit: int) -> int:
        finished_before = time.time() - older_than
        return await self._call(lambda conn: _purge(conn, finished_before, limit))


# -- opening ------------------------------------------------------------------------------


def _connect(path: Path, busy_timeout: float, *, reader: bool = False) -> Conn:
    """Open and check the file, then create or migrate the schema; StoreError if we can't.

    Nothing is written before the checks pass, so a file that is not ours stays untouched. A
    `reader` (an operator's listing) neither makes a store where there is none nor needs to
    write the file.
    """
    # Where SQLite makes the file: a dangling symbolic link's target (whose missing directory
    # read as an open-files limit too low, SQLite's CANTOPEN beside a writable directory).
    parent = Path(os.path.realpath(path)).parent if os.path.islink(path) else path.parent
    if not parent.is_dir():
        if parent.exists():  # a file taken for a directory: `orders.db/x`
            raise StoreError(f"{path}: cannot open the store: {parent} is not a directory")
        raise StoreError(f"{path}: cannot open the store: directory {parent} does not exist")
    try:
        if path.exists() and not path.is_file():  # a FIFO would block the read below for good
            raise StoreError(f"{path}: cannot open the store: not a regular file")
        with path.open("rb") as file:
            head = file.read(len(_HEADER))
    except FileNotFoundError:
        head = b""
    except OSError as exc:
        raise StoreError(f"{path}: cannot open the store: {exc.strerror}") from exc
    if head and head != _HEADER:  # SQLite would take a short file for an empty database
        raise StoreError(f"{path}: cannot open the store: file is not a database")
    version = _check_read_only(path, reader=reader) if head else 0
    if version == 0 and reader:  # no file, an empty one, or a database with no store in it
        raise StoreError(f"{path}: no order store there (check --store and the directory)")
    if reader and version < SCHEMA_VERSION:
        # Not upgraded by a reader: a migration holds the write lock while it builds an index
        # (a server's commits would wait for a listing), and servers of the older version
        # would then refuse the file. As on PostgreSQL.
        raise StoreError(
            f"{path}: the order store's schema is version {version}, older than this"
            f" program's {SCHEMA_VERSION}: a server of this version upgrades it"
        )
    if reader:
        # Nothing to create or migrate: no write lock (a listing does not wait for a server's
        # commits, nor they for it), and, where the file cannot be written (another user's),
        # a read-only connection.
        try:
            return _connect_reader(path, busy_timeout)
        except sqlite3.Error as exc:
            raise _cannot_open(path, exc, reader=True) from exc
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    except sqlite3.Error as exc:
        raise _cannot_open(path, exc, reader=False) from exc
    try:
        _retry_busy(conn, "PRAGMA journal_mode = WAL", time.monotonic() + busy_timeout)
        conn.execute("PRAGMA synchronous = FULL")
        with _transaction(conn, "BEGIN IMMEDIATE"):  # another process may be migrating it
            version = _schema_version(conn, path)
            for migration in _MIGRATIONS[version:]:
                for statement in migration:
                    conn.execute(statement)
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            # Written at every open of a server's, so that a file it may not write (read-only,
            # on a read-only mount) is refused here, not at its first commit.
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        # From here the writer waits for the write lock itself (`_attempt`), in short pauses:
        # SQLite's own busy handler sleeps 1, 2, 5, 10 ms and more between tries, which made
        # two workers on one file slower than one.
        conn.execute("PRAGMA busy_timeout = 0")
    except sqlite3.Error as exc:
        conn.close()
        raise _cannot_open(path, exc, reader=False) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def _connect_reader(path: Path, busy_timeout: float) -> Conn:
    """A connection that only reads: read-write where it can be (closing it as the last one
    then tidies the WAL away, as a server's does), else read-only (a file it may not write).

    Never `immutable`, which would read without locks: a server may write the file through
    another mount. So a store whose directory cannot be written is refused (`_cannot_open`).
    """
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master")  # SQLite opens the -shm file here
        return conn
    except sqlite3.OperationalError:
        conn.close()
    conn = _connect_read_only(path)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master")
    except BaseException:
        conn.close()
        raise
    return conn


def _connect_read_only(path: Path, *, immutable: bool = False) -> Conn:
    # file:// and the path's own bytes: a path may begin with // or not be UTF-8.
    uri = f"file://{quote(os.fsencode(path.absolute()))}?mode=ro"
    return sqlite3.connect(
        uri + ("&immutable=1" if immutable else ""), uri=True, isolation_level=None
    )


def _cannot_open(path: Path, exc: sqlite3.Error, *, reader: bool) -> StoreError:
    """Why the file cannot be opened, in one line. SQLite reads or writes a WAL database only
    where it may create its -wal and -shm files beside it: in a directory it may not write
    (a read-only mount), a server is refused, and so is a reader, who can list a copy."""
    hint = ""
    cantopen = exc.sqlite_errorcode in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY_DIRECTORY)
    unusable = [
        name
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm"))
        if name.exists() and not (name.is_file() and os.access(name, os.R_OK | os.W_OK))
    ]
    if cantopen and unusable:
        # Not the limit: a -wal or -shm left by another user (or not a file) cannot be opened.
        hint = f" ({unusable[0]} cannot be opened for reading and writing: check its owner)"
    elif cantopen and os.access(path.parent, os.W_OK):
        # Not the directory: under a low `ulimit -n` SQLite cannot open its -wal (EMFILE).
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        hint = f" (its directory is writable: is the open-files limit, ulimit -n {limit}, too low?)"
    elif cantopen:
        copy = "; or list a copy of the file, with its -wal, in a writable directory"
        hint = f" (SQLite must be able to write its -wal and -shm files in {path.parent}"
        hint += f"{copy if reader else ''})"
    elif exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL):
        # A -shm that cannot grow is `disk I/O error` to SQLite: not a failing disk.
        free = _free_bytes(path.parent)
        if free is not None and free < WAL_ROOM:
            hint = f" (no space left: {free // 1024} KB free in {path.parent}, and the store"
            hint += " needs room beside the file for its -wal and -shm: a server about 4 MB)"
    return StoreError(f"{path}: cannot open the store: {exc}{hint}")


def _free_bytes(directory: Path) -> int | None:
    """Bytes this process may still write in `directory`'s file system; None if unknown."""
    try:
        found = os.statvfs(directory)
    except OSError:
        return None
    return found.f_bavail * found.f_frsize


def _check_read_only(path: Path, *, reader: bool) -> int:
    """The file's schema version (0: no store yet), or StoreError if the file is not ours to
    use, read on a read-only connection: refusing it must not write it (closing a read-write
    one would checkpoint a WAL left beside it), nor leave files beside it.

    With no -wal beside the file, every commit is in the file (SQLite keeps its log there
    only while the file is open, or after a crash), which is read as immutable: a read-only
    connection to a WAL-mode file makes a -wal and a -shm that it cannot remove, and another
    user's left beside a file it refused kept the file's owner from writing it. A process
    opening the file meanwhile writes to its own -wal, not the file, until a checkpoint; a
    read torn by one would be a failed check, and a server checks again under the write lock.
    """
    try:
        conn = _connect_read_only(path, immutable=not Path(f"{path}-wal").exists())
        with closing(conn), _transaction(conn, "BEGIN"):  # one snapshot for the reads
            return _schema_version(conn, path)
    except sqlite3.Error as exc:
        raise _cannot_open(path, exc, reader=reader) from exc


@contextmanager
def _transaction(conn: Conn, begin: str) -> Iterator[None]:
    conn.execute(begin)
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _retry_busy(conn: Conn, sql: str, deadline: float) -> None:
    """Run `sql`, retrying while locked: switching to WAL fails at once, not after busy_timeout,
    while another process opening the same file holds a lock."""
    while True:
        try:
            conn.execute(sql)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)
        else:
            return


def _schema_version(conn: Conn, path: Path) -> int:
    """The file's schema version, 0 for a new file; StoreError if it is not ours to use."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if app_id == 0:
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            raise StoreError(f"{path}: not an order store: a SQLite database of something else")
        return 0
    if app_id != APPLICATION_ID:
        raise StoreError(f"{path}: not an order store: SQLite application_id {app_id:#x}")
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path}: the store's schema version {version} is newer than this program's"
            f" {SCHEMA_VERSION}: upgrade order-pipeline"
        )
    return version


class _FileGone(Exception):
    """The path no longer names the file the store opened (deleted, or replaced): what is
    committed to the file still open would be lost, so nothing is."""

    def __str__(self) -> str:
        return "the file was deleted or replaced since the store opened it (restart to use it)"


def _identity(path: Path) -> tuple[int, int] | None:
    """The file at `path` (its device and inode), None if there is none: one `stat` a batch."""
    try:
        found = path.stat()
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino


def _is_busy(exc: Exception) -> bool:
    """Another process holds the file's write lock: SQLITE_BUSY, or one of its extended codes
    (`sqlite_errorcode` is the extended one: SQLITE_BUSY_RECOVERY while another process
    recovers the WAL after a crash, for one)."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)  # absent where SQLite did not raise it
    return code is not None and code & 0xFF == sqlite3.SQLITE_BUSY


def _is_outage(exc: Exception) -> bool:
    """An error of the database or the disk, not of our SQL."""
    return isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError


def _unavailable(path: Path, exc: Exception) -> StoreUnavailable:
    error = StoreUnavailable(f"{path}: could not commit: {exc}")
    error.__cause__ = exc
    return error


# -- operations, run by the writer thread -------------------------------------------------

_FINISH = (
    "UPDATE orders SET state = ?, finished_at = ?, http_status = ?, reply = ?, kind = ?"
    " WHERE key = ? AND attempt_id = ? AND state = ? AND owner = coalesce(?, owner)"
)
_FINISHED_REPLY = (
    "SELECT http_status, reply, kind FROM orders WHERE key = ? AND attempt_id = ? AND state = ?"
)
_RENEW = (
    "INSERT INTO leases (owner, expires_at) VALUES (?, ?)"
    " ON CONFLICT (owner) DO UPDATE SET expires_at = excluded.expires_at"
)
_CHARGE = "INSERT INTO ledger (charge_id, key, amount) VALUES (?, ?, ?) ON CONFLICT DO NOTHING"
# A refund of a charge not (yet) made leaves a refunded row of 0: the charge, if it comes
# late (its process had lost the order to recovery), is then void instead of taken.
_REFUND = (
    "INSERT INTO ledger (charge_id, key, amount, refunded) VALUES (?, ?, 0, 1)"
    " ON CONFLICT (charge_id) DO UPDATE SET refunded = 1"
)
# Step records as one JSON array (text, which every SQLite since 3.9 reads) of `step_row`s, in
# order (json_extract, not ->>, which needs 3.38). WHERE EXISTS: a record whose attempt is no
# longer the order's, or whose order another process claimed, is dropped (and it parses the
# upsert right); a later record of a step updates the earlier one, unless it would take its
# undo back (base.takes_undo_back: a record from before the order was claimed back).
_RECORD_STEPS = f"""
    INSERT INTO steps (attempt_id, {_STEP})
    SELECT json_extract(r.value, '$[0]'), json_extract(r.value, '$[1]'),
        json_extract(r.value, '$[2]'), json_extract(r.value, '$[3]'),
        json_extract(r.value, '$[4]'), json_extract(r.value, '$[5]'),
        json_extract(r.value, '$[6]')
    FROM json_each(?) AS r
    WHERE EXISTS (
        SELECT 1 FROM orders
        WHERE key = json_extract(r.value, '$[7]') AND attempt_id = json_extract(r.value, '$[0]')
            AND owner = coalesce(json_extract(r.value, '$[8]'), owner)
    )
    ORDER BY r.key
    ON CONFLICT (attempt_id, step) DO UPDATE SET
        status = excluded.status, detail = excluded.detail, duration_ms = excluded.duration_ms,
        compensation = excluded.compensation, compensation_ms = excluded.compensation_ms
    WHERE {NO_UNDO_TAKEN_BACK}
"""
_INTERRUPTED = "WHERE key = ? AND state = ? AND kind = ? AND attempt = ?"


def _execute(conn: Conn, sql: str, args: tuple[Any, ...]) -> None:
    conn.execute(sql, args)


def _steps_of(conn: Conn, attempt_ids: list[str]) -> dict[str, tuple[StepRecord, ...]]:
    """The step records of these attempts, each in the order recorded, in one statement (not
    one per order)."""
    steps: dict[str, list[StepRecord]] = {}
    if attempt_ids:
        for attempt_id, *step in conn.execute(
            f"SELECT attempt_id, {_STEP} FROM steps"
            " WHERE attempt_id IN (SELECT value FROM json_each(?)) ORDER BY rowid",
            (orjson.dumps(attempt_ids).decode(),),
        ):
            steps.setdefault(attempt_id, []).append(StepRecord(*step))
    return {attempt_id: tuple(records) for attempt_id, records in steps.items()}


def _orders(conn: Conn, rows: list[tuple[Any, ...]]) -> list[StoredOrder]:
    """Orders from rows of _ORDER's columns, with their steps."""
    steps = _steps_of(conn, [row[5] for row in rows])
    return [_new_order(*row, steps=steps.get(row[5], ())) for row in rows]


def _get(conn: Conn, key: str) -> StoredOrder | None:
    row = conn.execute(f"SELECT {_ORDER} FROM orders WHERE key = ?", (key,)).fetchone()
    return None if row is None else _orders(conn, [row])[0]


def _finished_reply(conn: Conn, key: str, attempt_id: str) -> FinishedReply | None:
    row = conn.execute(_FINISHED_REPLY, (key, attempt_id, FINISHED)).fetchone()
    return None if row is None else FinishedReply(*row)


def _begin(conn: Conn, o: StoredOrder) -> Begun | Existing:
    inserted = conn.execute(
        f"INSERT INTO orders ({_ORDER}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, NULL)"
        " ON CONFLICT (key) DO NOTHING",
        (
            o.key,
            o.order_id,
            o.request_hash,
            o.body,
            o.attempt,
            o.attempt_id,
            o.owner,
            o.state,
            o.started_at,
        ),
    ).rowcount
    if inserted:
        return Begun(o)
    existing = _get(conn, o.key)
    assert existing is not None  # the row that won the key; nothing deletes it in between
    return Existing(existing)


def _restart(
    conn: Conn, key: str, owner: str, expected_attempt: int, attempt_id: str, now: float
) -> StoredOrder | None:
    where = (key, FINISHED, INTERRUPTED, expected_attempt)
    conn.execute(
        f"DELETE FROM steps WHERE attempt_id = (SELECT attempt_id FROM orders {_INTERRUPTED})",
        where,
    )
    rows = conn.execute(
        "UPDATE orders SET attempt = attempt + 1, attempt_id = ?, owner = ?, state = ?,"
        " started_at = ?, finished_at = NULL, http_status = NULL, reply = NULL, kind = NULL"
        f" {_INTERRUPTED} RETURNING {_ORDER}",
        (attempt_id, owner, RUNNING, now, *where),
    ).fetchall()
    return _new_order(*rows[0]) if rows else None


def _record_steps(conn: Conn, rows: list[tuple[Any, ...]]) -> None:
    conn.execute(_RECORD_STEPS, (orjson.dumps(rows).decode(),))


def _list_orders(
    conn: Conn, needs_attention: bool, after: tuple[float, str] | None, limit: int, now: float
) -> list[tuple[StoredOrder, int]]:
    abandoned = (
        f"(state = '{RUNNING}' AND owner NOT IN (SELECT owner FROM leases WHERE expires_at > :now))"
    )
    conditions = []
    if after is not None:  # a range of orders_started (or of orders_attention)
        conditions.append("(started_at, key) > (:after_at, :after_key)")
    if needs_attention:
        # Through orders_attention: the running and failed orders, not every order (a page
        # read a million to find a thousand: 4.7 s, in one read transaction).
        conditions.append(MAY_NEED_ATTENTION)
        conditions.append(
            f"({abandoned} OR kind = :failed OR EXISTS (SELECT 1 FROM steps"
            " WHERE steps.attempt_id = orders.attempt_id AND compensation IN (:undo1, :undo2)))"
        )
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    args = {
        "now": now,
        "after_at": after[0] if after else None,
        "after_key": after[1] if after else None,
        "failed": COMPENSATION_FAILED,
        "undo1": FAILED_COMPENSATIONS[0],
        "undo2": FAILED_COMPENSATIONS[1],
        "limit": limit,
    }
    rows = conn.execute(
        f"SELECT {_ORDER}, {abandoned}, ({_NET.format('orders.key')}) FROM orders {where}"
        " ORDER BY started_at, key LIMIT :limit",
        args,
    ).fetchall()
    steps = _steps_of(conn, [row[5] for row in rows])
    return [
        (
            _new_order(*row[:-2], steps=steps.get(row[5], ()), abandoned=bool(row[-2])),
            row[-1],
        )
        for row in rows
    ]


def _claim(
    conn: Conn, owner: str, limit: int, now: float, stale: set[str], busy: Collection[str]
) -> list[StoredOrder]:
    """Orders of owners without a live lease, or whose lease nobody renewed since the clock
    stepped back (`stale`: ClockWatch); not those under the keys `busy` (the claimer's own
    runs)."""
    rows = conn.execute(
        f"UPDATE orders SET owner = ?1 WHERE key IN (SELECT key FROM orders WHERE state = ?2"
        " AND owner != ?1 AND owner NOT IN (SELECT owner FROM leases WHERE expires_at > ?3"
        " AND owner NOT IN (SELECT value FROM json_each(?5)))"
        " AND key NOT IN (SELECT value FROM json_each(?6))"
        f" LIMIT ?4) RETURNING {_ORDER}",
        (
            owner,
            RUNNING,
            now,
            limit,
            orjson.dumps(sorted(stale)).decode(),
            orjson.dumps(list(busy)).decode(),
        ),
    ).fetchall()
    return _orders(conn, rows)


def _running_of(conn: Conn, owner: str, started_before: float) -> list[StoredOrder]:
    rows = conn.execute(
        f"SELECT {_ORDER} FROM orders WHERE state = ? AND owner = ? AND started_at < ?",
        (RUNNING, owner, started_before),
    ).fetchall()
    return _orders(conn, rows)


def _purge(conn: Conn, finished_before: float, limit: int) -> int:
    # A range of orders_purgeable, the expired orders alone: not the compensation_failed ones,
    # kept for good (20,000 of them cost each batch about 5 ms through orders_finished_at,
    # which held them). `+state`: left to itself SQLite read every finished order through
    # orders_state_owner (state =) for each batch, expired or not: 500,000 within the
    # retention made each batch of a backlog hold the write lock, and every order's commit
    # behind it, for about 100 ms.
    gone = conn.execute(
        "DELETE FROM orders WHERE key IN (SELECT key FROM orders"
        f" WHERE +state = ? AND finished_at < ? AND {_PURGEABLE} LIMIT ?)"
        " RETURNING key, attempt_id",
        (FINISHED, finished_before, limit),
    ).fetchall()
    conn.executemany("DELETE FROM steps WHERE attempt_id = ?", [(a,) for _, a in gone])
    conn.executemany("DELETE FROM ledger WHERE key = ?", [(k,) for k, _ in gone])
    # Never a live lease, though `finished_before` may be to come (the tests purge all so).
    lapsed_before = min(finished_before, time.time())
    conn.execute("DELETE FROM leases WHERE expires_at < ?", (lapsed_before,))
    return len(gone)
