"""Where orders survive a crash and a retry: `open_store(url)` picks the backend from a URL.

`memory` keeps orders in dicts (nothing durable); `sqlite:///relative.db` or
`sqlite:////absolute.db` keeps them in one SQLite file that every worker process shares;
`postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME` (or `postgres://`, any libpq URL, e.g.
`?options=-csearch_path%3DSCHEMA` for a schema of its own) keeps them in PostgreSQL, which
processes on many hosts share. psycopg is imported only for such a URL (the `postgres` extra).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import attrs

from .base import (
    FINISHED,
    RUNNING,
    Begun,
    Existing,
    FinishedReply,
    OrderStore,
    StepRecord,
    StoredOrder,
    StoreError,
    StoreUnavailable,
)
from .memory import MemoryStore
from .sqlite import SqliteStore

__all__ = [
    "FINISHED",
    "RUNNING",
    "Begun",
    "Existing",
    "FinishedReply",
    "MemoryStore",
    "OrderStore",
    "SqliteStore",
    "StepRecord",
    "StoreError",
    "StoreURL",
    "StoreUnavailable",
    "StoredOrder",
    "open_store",
    "parse_store_url",
]

_SQLITE = "sqlite:///"
_POSTGRES = ("postgresql://", "postgres://")
_INSTALL = "pip install 'order-pipeline[postgres]'"


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
        return StoreURL("sqlite", Path(url[len(_SQLITE) :]))
    if url.startswith(_POSTGRES):
        _check_postgres_url(url)
        return StoreURL("postgresql", url=url)
    raise StoreError(
        f"{url!r}: unsupported store URL (use sqlite:///PATH or memory,"
        " or postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME)"
    )


def _check_postgres_url(url: str) -> None:
    """libpq's own parsing of the URL, so a bad one is refused at start, password unshown."""
    try:
        host = urlsplit(url).netloc.rpartition("@")[2]
    except ValueError:  # say, an unclosed [ of an IPv6 address
        host = "?"
    shown = f"{url.partition('://')[0]}://{host}"
    try:
        from psycopg import Error
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise StoreError(f"{shown}: a PostgreSQL store needs psycopg: {_INSTALL}") from None
    try:
        conninfo_to_dict(url)
    except Error as exc:
        cause = " ".join(str(exc).split()).replace(url, shown)  # libpq may quote it whole
        raise StoreError(f"{shown}: not a valid PostgreSQL URL: {cause}") from None


@asynccontextmanager
async def open_store(url: str) -> AsyncIterator[OrderStore]:
    """Open the store the URL names for the duration of the block, then close it."""
    parsed = parse_store_url(url)
    if parsed.backend == "postgresql":
        from .postgres import PostgresStore  # psycopg is there: parse_store_url checked

        async with PostgresStore(url) as postgres:
            yield postgres
        return
    if parsed.path is None:
        yield MemoryStore()
        return
    async with SqliteStore(parsed.path) as store:
        yield store
