"""What the orders that need an operator's attention cost on a big store.

Usage: python benchmarks/attention.py build listing|purge STORE_URL [--orders N] [--failed P]
       python benchmarks/attention.py measure listing|purge STORE_URL

`build` writes a store of schema version 2 (the tables and indexes as that version made
them) straight into the SQLite file or the PostgreSQL schema (which must be empty), with
executemany: three steps and a charge an order.

- `listing`: N orders started a millisecond apart, one in N/1,000 needing attention (spread
  evenly: compensation_failed, a few failed with an undo timed out, a few running of a dead
  owner), P% (2) failed and fully undone, the rest ok.
- `purge`: N orders: 20,000 that ended compensation_failed two days ago (kept: the front of
  the purge's range), then the rest finished ok a day and a half ago (expired under a day's
  retention).

`measure` opens the store with whatever order_pipeline is imported (so the same store can be
measured by two versions, the older first), first as a server does (timed: a newer version
upgrades it), then `listing` times the first page of `order-pipeline orders
--needs-attention` three times (a reader's store, a page of 1,000), and `purge` a server's
purge calls of 100, with nothing expired but the kept orders (all ahead) and then through a
backlog (medians of five). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import orjson
import trio

from order_pipeline.store import LIST_PAGE, open_store, parse_store_url

DAY = 86_400.0
KEPT = 20_000  # compensation_failed orders of the purge's store
STEPS = ("payment", "vendor", "courier")
BODY = b'{"amount":1299,"order_id":"o-%d","items":["a","b"]}'
ORDER_COLUMNS = (
    "key, order_id, request_hash, body, attempt, attempt_id, owner, state, started_at,"
    " finished_at, http_status, reply, kind"
)


def _reply(kind: str | None, undo: str | None) -> bytes:
    steps = [
        {"name": step, "status": "ok", "duration_ms": 40}
        | ({"compensation": {"status": undo, "duration_ms": 5}} if undo else {})
        for step in STEPS
    ]
    return orjson.dumps({"status": "error" if kind else "ok", "kind": kind, "steps": steps})


def listing_orders(n: int, failed: int, now: float) -> Iterator[tuple[Any, ...]]:
    """(order row, its steps' compensation) of the listing's store."""
    every = n // 1000
    t0 = now - DAY / 2
    for i in range(n):
        started = t0 + i * 0.001
        kind: str | None = None
        undo: str | None = None
        finished: float | None = started + 0.2
        state = "finished"
        if i % every == every // 2:  # needs attention
            match (i // every) % 50:
                case 0:  # a dead owner's, never recovered
                    state, finished = "running", None
                case 1:  # failed, its undo timed out (a record the final one does not say)
                    kind, undo = "no_courier", "timeout"
                case _:
                    kind, undo = "compensation_failed", "error"
        elif i % 100 < failed:  # failed, undone
            kind, undo = "no_courier", "ok"
        yield _order(i, started, finished, state, "w-gone", kind), undo


def purge_orders(n: int, now: float) -> Iterator[tuple[Any, ...]]:
    """(order row, its steps' compensation) of the purge's store."""
    for i in range(KEPT):
        started = now - 2 * DAY + i * 0.001
        kept = _order(i, started, started + 0.2, "finished", "w-gone", "compensation_failed")
        yield kept, "error"
    for i in range(KEPT, n):
        started = now - 1.5 * DAY + i * 0.001
        yield _order(i, started, started + 0.2, "finished", "w-gone", None), None


def _order(
    i: int, started: float, finished: float | None, state: str, owner: str, kind: str | None
) -> tuple[Any, ...]:
    undo = "error" if kind == "compensation_failed" else None
    reply = None if finished is None else _reply(kind, undo)
    status = None if finished is None else (500 if kind else 200)
    return (
        f"k-{i:08d}-{(i * 2654435761) % 2**32:08x}", f"o-{i}", f"h-{i}", BODY % i, 1,
        f"a-{i:08d}", owner, state, started, finished, status, reply, kind,
    )  # fmt: skip # the orders table's columns in order


def rows(
    shape: str, n: int, failed: int, now: float
) -> Iterator[tuple[tuple[Any, ...], list[Any], Any]]:
    """Each order's row, step rows and ledger row."""
    made = listing_orders(n, failed, now) if shape == "listing" else purge_orders(n, now)
    for order, undo in made:
        attempt = order[5]
        steps = [(attempt, step, "ok", None, 40, undo, 5 if undo else None) for step in STEPS]
        refunded = undo is not None
        yield order, steps, (attempt, order[0], 1299, refunded)


def chunks(
    shape: str, n: int, failed: int, now: float, size: int = 10_000
) -> Iterator[tuple[list[Any], ...]]:
    orders: list[Any] = []
    steps: list[Any] = []
    ledger: list[Any] = []
    for order, its_steps, charge in rows(shape, n, failed, now):
        orders.append(order)
        steps.extend(its_steps)
        ledger.append(charge)
        if len(orders) == size:
            yield orders, steps, ledger
            orders, steps, ledger = [], [], []
    if orders:
        yield orders, steps, ledger


def build_sqlite(path: str, shape: str, n: int, failed: int) -> None:
    from order_pipeline.store import sqlite

    now = time.time()
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN")
        for migration in sqlite._MIGRATIONS[:2]:
            for statement in migration:
                conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {sqlite.APPLICATION_ID}")
        conn.execute("PRAGMA user_version = 2")
        for orders, steps, ledger in chunks(shape, n, failed, now):
            conn.executemany(f"INSERT INTO orders ({ORDER_COLUMNS}) VALUES ({'?, ' * 12}?)", orders)
            conn.executemany("INSERT INTO steps VALUES (?, ?, ?, ?, ?, ?, ?)", steps)
            conn.executemany("INSERT INTO ledger VALUES (?, ?, ?, ?)", ledger)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def build_postgres(url: str, shape: str, n: int, failed: int) -> None:
    import psycopg

    from order_pipeline.store import postgres

    now = time.time()
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        for migration in postgres._MIGRATIONS[:2]:
            for statement in migration:
                conn.execute(statement)
        conn.execute(f"UPDATE {postgres.VERSION_TABLE} SET version = 2")
        with conn.cursor() as cursor:
            for orders, steps, ledger in chunks(shape, n, failed, now):
                cursor.executemany(
                    f"INSERT INTO orders ({ORDER_COLUMNS}) VALUES ({'%s, ' * 8}to_timestamp(%s),"
                    " to_timestamp(%s), %s, %s, %s)",
                    orders,
                )
                cursor.executemany(
                    "INSERT INTO steps (attempt_id, step, status, detail, duration_ms,"
                    " compensation, compensation_ms) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    steps,
                )
                cursor.executemany("INSERT INTO ledger VALUES (%s, %s, %s, %s)", ledger)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


async def measure_listing(url: str) -> dict[str, Any]:
    opened = await opening(url)
    async with open_store(url, reader=True) as store:
        times, found = [], 0
        for _ in range(3):
            started = time.perf_counter()
            found = len(await store.list_orders(needs_attention=True, limit=LIST_PAGE))
            times.append(time.perf_counter() - started)
    return {
        "open_s": round(opened, 3),
        "first_page_s": [round(t, 3) for t in times],
        "orders_on_it": found,
    }


async def opening(url: str) -> float:
    """How long a server's opening took (a newer version upgrades the store), closed again:
    so what is measured next does not checkpoint the upgrade's pages (SQLite)."""
    started = time.perf_counter()
    async with open_store(url):
        return time.perf_counter() - started


async def measure_purge(url: str) -> dict[str, Any]:
    opened = await opening(url)
    async with open_store(url) as store:
        steady, backlog = [], []
        for _ in range(5):  # nothing expired but the kept orders, all ahead
            started = time.perf_counter()
            assert await store.purge(1.75 * DAY, 100) == 0
            steady.append(time.perf_counter() - started)
        for _ in range(5):  # a day's retention: a backlog behind them
            started = time.perf_counter()
            assert await store.purge(DAY, 100) == 100
            backlog.append(time.perf_counter() - started)
    return {
        "open_s": round(opened, 3),
        "purge_nothing_expired_ms": round(statistics.median(steady) * 1000, 2),
        "purge_batch_of_100_ms": round(statistics.median(backlog) * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["build", "measure"])
    parser.add_argument("shape", choices=["listing", "purge"])
    parser.add_argument("store")
    parser.add_argument("--orders", type=int, default=200_000)
    parser.add_argument("--failed", type=int, default=2, help="percent failed and undone")
    args = parser.parse_args()
    parsed = parse_store_url(args.store)
    if args.what == "build":
        started = time.monotonic()
        if parsed.backend == "sqlite":
            build_sqlite(str(parsed.path), args.shape, args.orders, args.failed)
        else:
            build_postgres(args.store, args.shape, args.orders, args.failed)
        print(json.dumps({"built_s": round(time.monotonic() - started, 1)}))
        return
    measure = measure_listing if args.shape == "listing" else measure_purge
    result = trio.run(measure, args.store)
    print(json.dumps({"code": sys.modules["order_pipeline"].__file__} | result))


if __name__ == "__main__":
    main()
