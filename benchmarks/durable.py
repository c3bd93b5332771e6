"""What the durable store costs, and how fast interrupted orders are recovered, in process.

Usage: python benchmarks/durable.py inflight [--store sqlite|memory] [--orders 20000]
       python benchmarks/durable.py recovery [--orders 10000]

`inflight` sends N orders at once through the order desk (key, store, pipeline,
ledger), real clock, payment and vendor 20 s (so all have started before one ends), courier 0:
every one must end 200 and the ledger must hold every amount once. Prints CPU
per order over the whole run (the store's writer thread included) and resident
memory per order while all of them wait in their steps.

`recovery` leaves N orders running in a SQLite file as a process that died after
their payments would (no lease, a charge each), then starts one desk's
maintenance and times until every one is recorded `interrupted` with its charge
refunded, polling the file from a connection of its own (as an operator's query would: the
desk's own store is not asked, so the count does not slow what it measures). Prints one JSON
object either way.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import trio

from order_pipeline.desk import canonical
from order_pipeline.main import tune_garbage_collector
from order_pipeline.model import STEP_NAMES, OrderRequest
from order_pipeline.serialization import converter
from order_pipeline.server import assemble
from order_pipeline.settings import Settings
from order_pipeline.store import (
    RUNNING,
    Begun,
    MemoryStore,
    OrderStore,
    SqliteStore,
    StepRecord,
    every_order,
)

# Long enough that every order has started before the first ends, on a slow machine too
# (the peak it waits for is every order in its steps at once).
SLOW_MS = 20_000


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


async def inflight(store: OrderStore, orders: int) -> dict[str, Any]:
    assembly = assemble(
        Settings(courier_pool_size=128, courier_queue_limit=orders, request_timeout=60),
        store=store,
    )
    delays = {"payment": SLOW_MS, "vendor": SLOW_MS, "courier": 0}
    statuses: list[int] = []
    tune_garbage_collector()
    before_kb, started = rss_kb(), time.process_time()

    async def send(n: int) -> None:
        order = converter.structure(
            {"order_id": f"o{n}", "amount": 1, "delay_ms": delays}, OrderRequest
        )
        answer = await assembly.desk.submit(order, f"k{n}")
        statuses.append(answer.status)

    async with trio.open_nursery() as nursery:
        for n in range(orders):
            nursery.start_soon(send, n)
        await assembly.tracker.wait_for(lambda running: running == 2 * orders)
        peak_kb = rss_kb()
    cpu = time.process_time() - started
    net = sum([net async for _, net in every_order(store)])
    assert statuses == [200] * orders, set(statuses)
    assert net == orders, net
    return {
        "orders": orders,
        "cpu_us_per_order": round(cpu / orders * 1e6, 1),
        "kb_per_in_flight_order": round((peak_kb - before_kb) / orders, 2),
    }


async def leave_orphans(store: SqliteStore, orders: int) -> None:
    """N running orders of a dead process, each paid: what a SIGKILL after the payments leaves."""

    async def orphan(n: int) -> None:
        order = converter.structure({"order_id": f"o{n}", "amount": 1}, OrderRequest)
        body = canonical(order)
        begun = await store.begin(
            f"k{n}", order.order_id, hashlib.sha256(body).hexdigest(), body, "dead"
        )
        assert isinstance(begun, Begun)
        await store.charge(begun.order.attempt_id, f"k{n}", 1)
        store.record_step(f"k{n}", begun.order.attempt_id, StepRecord("payment", "ok", None, 150))

    async with trio.open_nursery() as nursery:
        for n in range(orders):
            nursery.start_soon(orphan, n)


def still_running(path: Path) -> int:
    """Orders not yet finished, read from a read-only connection of its own (in a thread)."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return int(
            conn.execute("SELECT count(*) FROM orders WHERE state = ?", (RUNNING,)).fetchone()[0]
        )


async def recovery(orders: int) -> dict[str, Any]:
    path = Path(tempfile.mkdtemp(prefix="recovery-")) / "orders.db"
    async with SqliteStore(path) as store:
        await leave_orphans(store, orders)
        assembly = assemble(Settings(), store=store)
        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            await nursery.start(assembly.desk.maintain)
            # The file is polled, as an operator would poll it: there is no event to wait on.
            while await trio.to_thread.run_sync(still_running, path):  # noqa: ASYNC110
                await trio.sleep(0.5)
            elapsed = time.monotonic() - started
            nursery.cancel_scope.cancel()
        listed = [order async for order in every_order(store)]
    assert {o.kind for o, _ in listed} == {"interrupted"}, {o.kind for o, _ in listed}
    assert sum(net for _, net in listed) == 0
    assert all({s.step for s in o.steps} == set(STEP_NAMES) for o, _ in listed)
    return {"orders": orders, "recovered_in_s": round(elapsed, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["inflight", "recovery"])
    parser.add_argument("--store", choices=["sqlite", "memory"], default="sqlite")
    parser.add_argument("--orders", type=int)
    args = parser.parse_args()
    if args.what == "recovery":
        print(json.dumps(trio.run(recovery, args.orders or 10_000)))
        return

    async def run() -> dict[str, Any]:
        if args.store == "memory":
            return {"store": "memory", **await inflight(MemoryStore(), args.orders or 20_000)}
        path = Path(tempfile.mkdtemp(prefix="inflight-")) / "orders.db"
        async with SqliteStore(path) as store:
            return {"store": "sqlite", **await inflight(store, args.orders or 20_000)}

    print(json.dumps(trio.run(run)))


if __name__ == "__main__":
    main()
