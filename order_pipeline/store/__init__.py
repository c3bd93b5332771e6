"""Where orders survive a crash and a retry: `open_store(url)` picks the backend from a URL.

`memory` keeps orders in dicts (nothing durable); `sqlite:///relative.db` or
`sqlite:////absolute.db` keeps them in one SQLite file that every worker process shares.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs

from .base import (
    FINISHED,
    RUNNING,
    Begun,
    Existing,
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


@attrs.frozen
class StoreURL:
    """A parsed store URL: the backend's name and, for SQLite, the file."""

    backend: str  # "memory" | "sqlite"
    path: Path | None = None


def parse_store_url(url: str) -> StoreURL:
    """Check a store URL without opening anything (so the CLI can refuse it early)."""
    if url == "memory":
        return StoreURL("memory")
    if url.startswith(_SQLITE) and url[len(_SQLITE) :] not in ("", "/", ":memory:"):
        return StoreURL("sqlite", Path(url[len(_SQLITE) :]))
    raise StoreError(f"{url!r}: unsupported store URL (use sqlite:///PATH or memory)")


@asynccontextmanager
async def open_store(url: str) -> AsyncIterator[OrderStore]:
    """Open the store the URL names for the duration of the block, then close it."""
    parsed = parse_store_url(url)
    if parsed.path is None:
        yield MemoryStore()
        return
    async with SqliteStore(parsed.path) as store:
        yield store
