"""A real PostgreSQL server for the tests: where it is, and a schema of each test's own.

The server is ORDER_PIPELINE_TEST_POSTGRES (default postgresql://postgres@127.0.0.1:5432/test).
Without one, the tests that need it skip, saying how to point them at one, unless
ORDER_PIPELINE_REQUIRE_POSTGRES=1 (CI, `nox -s postgres`) makes them fail. The fixtures
`postgres` and `schema` (tests/conftest.py) use this module; schemas it makes are dropped
after each test.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import pytest
import trio

if TYPE_CHECKING:
    import psycopg

POSTGRES_URL = os.environ.get(
    "ORDER_PIPELINE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
REQUIRE_POSTGRES = os.environ.get("ORDER_PIPELINE_REQUIRE_POSTGRES") == "1"
schemas: list[str] = []  # made by new_schema, dropped after the test (tests/conftest.py)
databases: list[str] = []  # made by new_database, dropped after the test too


@functools.cache
def _postgres_missing() -> str | None:
    """Why the tests cannot use a PostgreSQL server, or None if they can (asked once)."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed (pip install -e '.[test,postgres]')"
    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=3):
            pass
    except psycopg.Error as exc:
        return f"no PostgreSQL server answers at {POSTGRES_URL}: {' '.join(str(exc).split())}"
    return None


def need_postgres() -> None:
    """Skip the test without a server, or fail it if ORDER_PIPELINE_REQUIRE_POSTGRES=1."""
    why = _postgres_missing()
    if why is None:
        return
    if REQUIRE_POSTGRES:
        pytest.fail(f"{why} (and ORDER_PIPELINE_REQUIRE_POSTGRES=1)", pytrace=False)
    pytest.skip(f"{why}: set ORDER_PIPELINE_TEST_POSTGRES=postgresql://USER@HOST:PORT/DBNAME")


def admin() -> psycopg.Connection[tuple[Any, ...]]:
    """A connection of the test's own (autocommit) to the test server."""
    import psycopg

    return psycopg.connect(POSTGRES_URL, autocommit=True)


def with_params(url: str, **params: str) -> str:
    """`url` with libpq query parameters added (`options` appended to any already there)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    if "options" in params and "options" in query:
        params["options"] = f"{query['options']} {params['options']}"
    return parts._replace(query=urlencode({**query, **params}, quote_via=quote)).geturl()


def new_schema() -> str:
    """A new, empty schema on the test server, dropped after the test (tests/conftest.py)."""
    need_postgres()
    schema = f"order_store_test_{uuid.uuid4().hex[:16]}"
    with admin() as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    schemas.append(schema)
    return schema


def new_database(encoding: str) -> str:
    """A URL of a new, empty database of `encoding` on the test server (an operator's, made
    without ENCODING 'UTF8'), dropped after the test (tests/conftest.py)."""
    need_postgres()
    name = f"order_store_test_{uuid.uuid4().hex[:16]}"
    with admin() as conn:
        conn.execute(
            f"CREATE DATABASE {name} ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C'"
            " TEMPLATE template0"
        )
    databases.append(name)
    return urlsplit(POSTGRES_URL)._replace(path=f"/{name}").geturl()


def postgres_url(_: Path | None = None, *, schema: str | None = None) -> str:
    """A URL of the test server on `schema`, by default a new one of the test's own.

    The schema is the first of the search_path (libpq's ?options=-csearch_path%3D...), which
    is where the store creates its tables: each test has its own, dropped after it.
    """
    return with_params(POSTGRES_URL, options=f"-csearch_path={schema or new_schema()}")


@asynccontextmanager
async def table_locked(schema: str, table: str, mode: str) -> AsyncIterator[None]:
    """Hold `table` locked in `mode` (LOCK TABLE, in a transaction of the test's own),
    as an operator's LOCK TABLE or a VACUUM FULL would."""
    locker = await trio.to_thread.run_sync(admin)
    try:
        await trio.to_thread.run_sync(locker.execute, f"SET search_path TO {schema}")
        await trio.to_thread.run_sync(locker.execute, "BEGIN")
        await trio.to_thread.run_sync(locker.execute, f"LOCK TABLE {table} IN {mode} MODE")
        yield
        await trio.to_thread.run_sync(locker.execute, "ROLLBACK")
    finally:
        await trio.to_thread.run_sync(locker.close)
