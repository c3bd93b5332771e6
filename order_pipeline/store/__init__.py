"""Where orders survive a crash and a retry: `open_store(url)` picks the backend from a URL.

`memory` keeps orders in dicts (nothing durable); `sqlite:///relative.db` or
`sqlite:////absolute.db` keeps them in one SQLite file that every worker process shares;
`postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME` (or `postgres://`, any libpq URL, e.g.
`?options=-csearch_path%3DSCHEMA` for a schema of its own) keeps them in PostgreSQL, which
processes on many hosts share. psycopg is imported only for such a URL (the `postgres` extra).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from .base import (
    FINISHED,
    LIST_PAGE,
    RUNNING,
    UNKNOWN_OUTCOME,
    Begun,
    Existing,
    FinishedReply,
    OrderStore,
    StepRecord,
    StoredOrder,
    StoreError,
    StoreUnavailable,
    every_order,
)
from .memory import MemoryStore
from .process import StoreProcess
from .sqlite import SqliteStore
from .urls import postgres_params, shown_url

if TYPE_CHECKING:
    from .postgres import PostgresStore

__all__ = [
    "FINISHED",
    "LIST_PAGE",
    "RUNNING",
    "UNKNOWN_OUTCOME",
    "Begun",
    "Existing",
    "FinishedReply",
    "MemoryStore",
    "OrderStore",
    "SqliteStore",
    "StepRecord",
    "StoreError",
    "StoreProcess",
    "StoreURL",
    "StoreUnavailable",
    "StoredOrder",
    "every_order",
    "open_store",
    "parse_store_url",
    "shown_url",
    "sql_backend",
]

_SQLITE = "sqlite:///"
_POSTGRES = ("postgresql://", "postgres://")


@attrs.frozen
class StoreURL:
    """A parsed store URL: the backend's name and, for SQLite, the file; for PostgreSQL the
    URL itself (kept out of the repr: it may hold a password)."""

    backend: str  # "memory" | "sqlite" | "postgresql"
    path: Path | None = None
    url: str | None = attrs.field(default=None, repr=False)


def parse_store_url(url: str) -> StoreURL:
    """Check a store URL without opening anything (so the CLI can refuse it early)."""
    if url == "memory":
        return StoreURL("memory")
    if url.startswith(_SQLITE) and url[len(_SQLITE) :] not in ("", "/", ":memory:"):
        path = url[len(_SQLITE) :]
        # os.fsdecode's escapes of bytes that are not UTF-8 (a Latin-1 name): not printable,
        # so they were refused as control characters; refused for what they are (the logs,
        # JSON, could not hold the name).
        escaped = [c for c in path if "\udc80" <= c <= "\udcff"]
        if escaped:
            raise StoreError(
                f"{url!r}: the path is not UTF-8 (byte {ord(escaped[0]) - 0xDC00:#04x}), as a"
                " sqlite:/// URL's must be: rename the file, or link to it under a UTF-8 name"
            )
        if path != path.strip() or any(c in "?#" or not c.isprintable() for c in path):
            # Taken as part of the file's name, `?mode=ro` would make a new store elsewhere;
            # so would a space an env file kept at the end (`orders.db `).
            raise StoreError(
                f"{url!r}: a sqlite:/// URL names a file alone: no ?, # or control characters,"
                " no space at either end"
            )
        if path.rpartition("/")[2] in ("", ".", ".."):
            # pathlib drops a trailing `/` and `.`: `sqlite:///orders/` made a file `orders`.
            raise StoreError(
                f"{url!r}: a sqlite:/// URL names a file, not a directory: end it with the"
                " file's name (sqlite:///PATH/order-pipeline.db)"
            )
        return StoreURL("sqlite", Path(path))
    if url.startswith(_POSTGRES):
        if not url.isprintable():
            # libpq takes a YAML block's newline into the database's name (or the host's):
            # a failure to connect later, its message split over two lines.
            raise StoreError(f"{shown_url(url)!r}: a store URL holds no control characters")
        postgres_params(url)  # refused here if libpq would refuse it
        return StoreURL("postgresql", url=url)
    raise StoreError(
        f"{shown_url(url)!r}: unsupported store URL (use sqlite:///PATH or memory,"
        " or postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME)"
    )


@asynccontextmanager
async def open_store(
    url: str, *, on_store_process_lost: Callable[[str], None] | None = None, reader: bool = False
) -> AsyncIterator[OrderStore]:
    """Open the store the URL names for the duration of the block, then close it.

    `reader` (an operator's listing): a SQLite file need not be writable, as a server's
    must; a PostgreSQL schema is checked, never created or upgraded.

    With `on_store_process_lost` (a server's), a PostgreSQL store runs in a store process of
    its own (process.py), and that is called if the process ends before the store is closed.
    Otherwise, and for SQLite, the store runs in this process's writer thread: psycopg's
    Python held the Trio thread's GIL for about 180 µs an order, SQLite's calls take it
    briefly, and a process costs every call a pickle and a socket both ways (with two
    workers, S5 fell to 0.8 of the writer thread's: docs/performance.md).
    """
    parsed = parse_store_url(url)
    if parsed.backend == "memory":
        yield MemoryStore()
    elif parsed.backend == "postgresql" and on_store_process_lost is not None:
        async with StoreProcess(url, on_store_process_lost) as in_its_process:
            yield in_its_process
    else:
        async with sql_backend(parsed, reader=reader) as store:
            yield store


def sql_backend(parsed: StoreURL, *, reader: bool = False) -> SqliteStore | PostgresStore:
    """The SQL backend a parsed URL names, not yet opened."""
    if parsed.backend == "postgresql":
        from .postgres import PostgresStore  # psycopg is there: parse_store_url checked

        assert parsed.url is not None
        return PostgresStore(parsed.url, reader=reader)
    assert parsed.path is not None
    return SqliteStore(parsed.path, reader=reader)
