"""An order cancelled at any point Trio schedules while it runs is left correct.

A client that leaves, or the drain's grace ending, cancels the scope around `desk.submit`
wherever the order then is: before its begin commits, in a step, between a charge and its
record, while its compensations run (shielded), while its reply is read back. Each test runs
one order in process, under the autojump clock, with the desk's maintenance running, to count
those points: the steps Trio runs of any task while the order's submit lives (its own, its
steps' and compensations', the maintenance's, the store's wake-ups). Then it runs the order
afresh once per point, cancelled there (as that step is about to run, or as it has yielded),
lets the maintenance run past a lease, and checks what README's Durability section promises.

The store's clock (`time.time`, which leases and recovery are measured on) follows Trio's, so
that "past a lease" is the virtual time the maintenance ran.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from order_pipeline.store import MemoryStore, OrderStore

from .points import VARIANTS, Stores, VirtualSqlite, Wall, check, run_once


@pytest.fixture(name="stores", params=["memory", "sqlite"])
def _stores(
    request: pytest.FixtureRequest, tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> Stores:
    """A new store for each run: in memory, or a SQLite file in tmp_path."""

    @asynccontextmanager
    async def memory(_: int) -> AsyncIterator[OrderStore]:
        yield MemoryStore()

    @asynccontextmanager
    async def sqlite(run: int) -> AsyncIterator[OrderStore]:
        async with VirtualSqlite(tmp_path / f"{run}.db", autojump_clock) as store:
            yield store

    return Stores(memory, exact=True) if request.param == "memory" else Stores(sqlite, exact=False)


@pytest.mark.parametrize("before", [True, False], ids=["before a step", "after a step"])
@pytest.mark.parametrize("variant", list(VARIANTS))
async def test_an_order_cancelled_at_any_point_ends_one_way_its_money_and_retry_agreeing(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    stores: Stores,
    variant: str,
    before: bool,
) -> None:
    """Cancelled at each of the N points of its uncancelled run, the order's key holds one
    final result, the ledger the amount if that is ok (or its refund failed) and nothing
    otherwise, and a retry is its replay (or a new run if it never began), the ledger
    agreeing with that answer too."""
    monkeypatch.setattr(time, "time", Wall(autojump_clock))
    whole = await run_once(stores, 0, VARIANTS[variant], None, before)
    check(whole, VARIANTS[variant])
    assert whole.answer is not None, str(whole)
    assert whole.answer.status == whole.retry[0] == VARIANTS[variant].status, str(whole)
    assert whole.submit_points >= 4, str(whole)  # so that every run below is cancelled
    if stores.exact:  # each run below goes as this one did, up to its cancel
        again = await run_once(stores, 0, VARIANTS[variant], None, before)
        assert again.points == whole.points, "Trio's scheduler, seeded, no longer runs alike"
    for at in range(whole.points):
        run = await run_once(stores, at + 1, VARIANTS[variant], at, before)
        assert run.landed_in is not None or not stores.exact, str(run)
        check(run, VARIANTS[variant])
