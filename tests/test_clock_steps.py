"""Leases across a step of the clock they are measured on (an NTP step, a resume from suspend).

SQLite measures leases on the host's wall clock (`time.time`, which every worker of the file
shares: stepping it here steps it for all of them); PostgreSQL on the database's `now()`,
stepped here by a `now()` and a `clock_timestamp()` of the test schema's own, which the
search_path puts before pg_catalog's. A step forward must not hand a live process's running
orders to another (they would be undone while they run: the client answered `interrupted`, the
vendor told twice); a step back must not keep a dead process's orders (and their money) from
recovery for as long as the step.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from order_pipeline.desk import Answer
from order_pipeline.server import Settings, assemble
from order_pipeline.store import RUNNING, MemoryStore, OrderStore, SqliteStore

from .conftest import make_order
from .pg import POSTGRES_URL, admin, with_params
from .test_store import begun, postgres_stores


@pytest.fixture(name="wall")
def _wall(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """`wall(seconds)` steps the host's wall clock (`time.time`) by `seconds`, at once."""
    real = time.time
    shift = [0.0]
    monkeypatch.setattr(time, "time", lambda: real() + shift[0])

    def step(seconds: float) -> None:
        shift[0] += seconds

    return step


async def renewing(store: OrderStore, owner: str, lease: float, *, every: float = 0.2) -> None:
    """A live process's lease, renewed as `OrderDesk.maintain` renews it, for ever."""
    while True:
        await store.renew_lease(owner, lease)
        await trio.sleep(every)


async def claims_for(
    store: OrderStore, owner: str, seconds: float, *, lease: float = 1.0
) -> set[str]:
    """The keys `owner` (holding a lease of `lease` seconds) claims in rounds a tenth of a
    second apart for `seconds`."""
    taken: set[str] = set()
    with trio.move_on_after(seconds):
        while True:
            await store.renew_lease(owner, lease)
            for order in await store.claim_interrupted(owner, 100):
                taken.add(order.key)
            await trio.sleep(0.1)
    return taken


# -- SQLite: one host's wall clock ----------------------------------------------------------


async def test_a_forward_step_does_not_undo_a_live_worker_s_running_order(
    tmp_path: Path, wall: Callable[[float], None]
) -> None:
    """Two workers on one file; the host's clock steps 10 s forward while worker B runs an
    order. Every lease then looks expired until its owner renews it (within a second): worker
    A's recovery round must not take B's order meanwhile. It did: B's order was undone while it
    ran (its payment refunded, its vendor and courier cancelled) and answered 409/503
    `interrupted` although every step succeeded."""
    path = tmp_path / "orders.db"
    async with SqliteStore(path) as store_a, SqliteStore(path) as store_b:
        worker_a = assemble(Settings(), store=store_a).desk
        serving_b = assemble(Settings(), store=store_b)
        worker_b = serving_b.desk
        answers: list[Answer] = []
        order = make_order("o-1", amount=250, delay_ms={"vendor": 3000})

        async def send() -> None:
            answers.append(await worker_b.submit(order, "k-1"))

        async with trio.open_nursery() as nursery:
            await nursery.start(worker_b.maintain)
            nursery.start_soon(send)
            await serving_b.tracker.wait_for(lambda n: n == 3)  # its steps run
            await serving_b.tracker.wait_for(lambda n: n == 1)  # payment and courier done
            wall(10.0)  # an NTP step, a resume: before B's next renewal, at ~1 s
            await nursery.start(worker_a.maintain)  # its recovery round: at once
            with trio.fail_after(10):
                while not answers:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

        stored = await store_b.get("k-1")
        assert stored is not None
        assert (answers[0].status, stored.kind, stored.owner) == (200, None, worker_b.owner)
        assert await store_b.net_charge("k-1") == 250


async def test_after_a_forward_step_a_dead_owner_s_orders_are_still_recovered(
    tmp_path: Path, wall: Callable[[float], None]
) -> None:
    """The wait after a step is bounded: a dead owner's orders are claimed within a couple of
    seconds of it, a live owner's (renewing on the stepped clock) never."""
    path = tmp_path / "orders.db"
    async with SqliteStore(path) as claimer, SqliteStore(path) as workers:
        await workers.renew_lease("dead", 5.0)  # then it dies
        await workers.renew_lease("live", 5.0)
        await begun(workers, "k-dead", owner="dead")
        await begun(workers, "k-live", owner="live")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(renewing, workers, "live", 5.0)
            await claims_for(claimer, "me", 0.3)
            wall(10.0)
            taken = await claims_for(claimer, "me", 4.0)
            nursery.cancel_scope.cancel()
        assert taken == {"k-dead"}


async def test_a_backward_step_does_not_keep_a_dead_worker_s_orders_from_recovery(
    tmp_path: Path, wall: Callable[[float], None]
) -> None:
    """The host's clock steps an hour back just after a worker died (or the machine rebooted
    with its clock an hour fast, and NTP corrected it): the dead worker's lease, written an
    hour ahead, looked alive for an hour, and its running orders, their money taken, stayed
    running (409 to every retry) for that hour. Once the live owners have had time to renew,
    a lease nobody renewed since the step is dead."""
    path = tmp_path / "orders.db"
    async with SqliteStore(path) as claimer, SqliteStore(path) as workers:
        await workers.renew_lease("dead", 5.0)  # then it dies
        await workers.renew_lease("live", 5.0)
        dead = await begun(workers, "k-dead", owner="dead")
        await workers.charge(dead.attempt_id, "k-dead", 250)
        await begun(workers, "k-live", owner="live")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(renewing, workers, "live", 5.0)
            await claims_for(claimer, "me", 0.3)
            wall(-3600.0)
            taken = await claims_for(claimer, "me", 4.0)
            nursery.cancel_scope.cancel()
        assert taken == {"k-dead"}
        live = await workers.get("k-live")
        assert live is not None
        assert (live.state, live.owner) == (RUNNING, "live")


# -- PostgreSQL: the database's clock -------------------------------------------------------


@asynccontextmanager
async def stepping_database(schema: str) -> AsyncIterator[tuple[str, Callable[[float], Any]]]:
    """A URL on `schema` whose `now()` and `clock_timestamp()` are the database's shifted by
    what `step(seconds)` added, for every session (as the database host's own clock step)."""
    with admin() as conn:
        conn.execute(f"CREATE TABLE {schema}.clock_shift (shift interval NOT NULL)")
        conn.execute(f"INSERT INTO {schema}.clock_shift VALUES (interval '0 s')")
        for name, volatility in (("now", "STABLE"), ("clock_timestamp", "VOLATILE")):
            conn.execute(
                f"CREATE FUNCTION {schema}.{name}() RETURNS timestamptz LANGUAGE sql {volatility}"
                f" AS $$ SELECT pg_catalog.{name}() + (SELECT shift FROM {schema}.clock_shift) $$"
            )

    async def step(seconds: float) -> None:
        def run() -> None:
            with admin() as conn:
                conn.execute(
                    f"UPDATE {schema}.clock_shift SET shift = shift + %s * interval '1 s'",
                    (seconds,),
                )

        await trio.to_thread.run_sync(run)

    yield with_params(POSTGRES_URL, options=f"-csearch_path={schema},pg_catalog"), step


@pytest.mark.postgres
async def test_a_forward_step_of_the_database_s_clock_hands_no_live_host_s_order_over(
    schema: str,
) -> None:
    """The database's clock steps 10 s forward (its host's NTP, a resume of its VM): every
    host's lease looks expired until the host renews it. Host A's claim must not take host B's
    running order meanwhile; it did, at once, and undid it under B."""
    async with (
        stepping_database(schema) as (url, step),
        postgres_stores(url, 2) as (host_a, host_b),
    ):
        await host_b.renew_lease("live", 5.0)
        await begun(host_b, "k-live", owner="live")
        await begun(host_b, "k-dead", owner="dead")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(renewing, every=1.0), host_b, "live", 5.0)
            await claims_for(host_a, "me", 0.3)
            assert (await host_a.get("k-dead")).owner == "me"  # type: ignore[union-attr]
            await step(10.0)
            taken = await claims_for(host_a, "me", 3.0)
            nursery.cancel_scope.cancel()
        assert taken == set()
        live = await host_b.get("k-live")
        assert live is not None
        assert (live.state, live.owner) == (RUNNING, "live")


@pytest.mark.postgres
async def test_a_backward_step_of_the_database_s_clock_keeps_no_dead_host_s_order(
    schema: str,
) -> None:
    """The database's clock steps an hour back just after a host died: its lease must not
    keep its running order from recovery for an hour."""
    async with (
        stepping_database(schema) as (url, step),
        postgres_stores(url, 2) as (host_a, host_b),
    ):
        await host_b.renew_lease("dead", 5.0)  # then it dies
        await host_b.renew_lease("live", 5.0)
        await begun(host_b, "k-dead", owner="dead")
        await begun(host_b, "k-live", owner="live")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(renewing, host_b, "live", 5.0)
            await claims_for(host_a, "me", 0.3)
            await step(-3600.0)
            taken = await claims_for(host_a, "me", 4.0)
            nursery.cancel_scope.cancel()
        assert taken == {"k-dead"}


# -- the desk's own orders ------------------------------------------------------------------


@pytest.mark.postgres
async def test_a_step_seen_through_a_slow_round_trip_hands_no_live_order_over(
    schema: str,
) -> None:
    """The database's clock steps 10 s forward, and each `clock_timestamp()` round trip then
    takes 0.3 s (the database just resumed, or is loaded): the claim must still see the step
    (within the round trip's error) and take nothing. It skipped the look on a round trip
    over 0.25 s and, every lease looking expired, took host B's live order."""
    async with (
        stepping_database(schema) as (url, step),
        postgres_stores(url, 2) as (host_a, host_b),
    ):
        with admin() as conn:
            conn.execute(f"CREATE TABLE {schema}.slow (on_ boolean NOT NULL)")
            conn.execute(f"INSERT INTO {schema}.slow VALUES (false)")
            conn.execute(
                f"CREATE OR REPLACE FUNCTION {schema}.clock_timestamp() RETURNS timestamptz"
                " LANGUAGE plpgsql VOLATILE AS $$ BEGIN"
                f" IF (SELECT on_ FROM {schema}.slow) THEN PERFORM pg_sleep(0.3); END IF;"
                f" RETURN pg_catalog.clock_timestamp() + (SELECT shift FROM {schema}.clock_shift);"
                " END $$"
            )
        await host_b.renew_lease("live", 5.0)
        await begun(host_b, "k-live", owner="live")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(renewing, every=1.0), host_b, "live", 5.0)
            await claims_for(host_a, "me", 0.3)  # a baseline, fast round trips
            with admin() as conn:
                conn.execute(f"UPDATE {schema}.slow SET on_ = true")
            await step(10.0)
            taken = await claims_for(host_a, "me", 0.5)
            nursery.cancel_scope.cancel()
        live = await host_b.get("k-live")
        assert live is not None
        assert taken == set()
        assert (live.state, live.owner) == (RUNNING, "live")


async def test_a_backward_step_does_not_drop_an_order_whose_final_record_is_held(
    wall: Callable[[float], None],
) -> None:
    """An order of ours that ran, whose final record (`ok`, say) is held for the next commit
    (on PostgreSQL: its row locked past the lock timeout), is never recovered by us while it
    runs: the record would land after the undoing, `ok` with the money back. The desk kept
    such keys while `running_of(owner, 0.0)` listed them, that is, while they started before
    the store's `now`: a step back of the clock hid one begun in the seconds before it, the
    key was dropped, and once the clock had caught up (step + a lease) the order was taken
    for one left running, and undone."""
    store = MemoryStore()
    desk = assemble(Settings(lease_timeout=0.5), store=store).desk
    await begun(store, "k-held", owner=desk.owner)
    desk._held_records.add("k-held")  # its run ended; its final record is held
    wall(-1.0)
    assert await desk._left_running() == []
    await trio.sleep(1.7)  # the clock catches up: the order is over a lease old again
    assert await desk._left_running() == []
    assert await desk._left_running() == []  # seen twice: would be recovered now
    assert desk._held_records == {"k-held"}
