"""The order store: one contract suite run on every backend, then what only a SQLite file does,
then what only PostgreSQL does.

Real SQLite files in tmp_path and a real PostgreSQL server, never a mock. A new backend joins
the contract suite by adding its URL to BACKENDS.

PostgreSQL: the server at ORDER_PIPELINE_TEST_POSTGRES (default
postgresql://postgres@127.0.0.1:5432/test), each test in schemas of its own, created before it
and dropped after it. Without a server those tests skip, unless ORDER_PIPELINE_REQUIRE_POSTGRES=1
(CI, `nox -s postgres`) makes them fail.
"""

from __future__ import annotations

import errno
import os
import queue
import re
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, closing, contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlsplit

import httpx
import orjson
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from order_pipeline.store import (
    FINISHED,
    RUNNING,
    Begun,
    Existing,
    FinishedReply,
    MemoryStore,
    OrderStore,
    SqliteStore,
    StepRecord,
    StoredOrder,
    StoreError,
    StoreProcess,
    StoreUnavailable,
    StoreURL,
    every_order,
    open_store,
    parse_store_url,
    process,
    shown_url,
)
from order_pipeline.store.sqlite import APPLICATION_ID, SCHEMA_VERSION, _connect, _is_busy
from order_pipeline.store.writer import Op

from . import pg
from .conftest import examples
from .pg import POSTGRES_URL, admin, postgres_url, table_locked, with_params
from .server_process import StartServer

if TYPE_CHECKING:
    import psycopg

    from order_pipeline.store.postgres import PostgresStore

T = TypeVar("T")
IN_A_STORE_PROCESS = " in a store process"
BACKENDS: dict[str, Callable[[Path], str]] = {
    "sqlite": lambda tmp: f"sqlite:///{tmp / 'orders.db'}",
    "memory": lambda tmp: "memory",
    "postgresql": postgres_url,
    # In a store process (process.py), as a server runs a PostgreSQL store; on SQLite too,
    # for the process's own mechanics (a server keeps SQLite in its writer thread).
    "sqlite" + IN_A_STORE_PROCESS: lambda tmp: f"sqlite:///{tmp / 'orders.db'}",
    "postgresql" + IN_A_STORE_PROCESS: postgres_url,
}
BACKEND_PARAMS = [
    pytest.param(name, marks=pytest.mark.postgres) if name.startswith("postgresql") else name
    for name in BACKENDS
]
# In this process: the tests of a backend's own writer thread.
SQL_BACKEND_PARAMS = [
    pytest.param("postgresql", marks=pytest.mark.postgres) if name == "postgresql" else name
    for name in ("sqlite", "postgresql")
]
BODY = b'{"amount":100,"order_id":"o-1"}'


@pytest.fixture(name="store_url", params=BACKEND_PARAMS)
def _store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each backend's URL (sync too: PostgreSQL's skip keeps its reason)."""
    return BACKENDS[request.param](tmp_path)


@pytest.fixture(name="store")
async def _store(request: pytest.FixtureRequest, store_url: str) -> AsyncIterator[OrderStore]:
    if not request.node.callspec.params["store_url"].endswith(IN_A_STORE_PROCESS):
        async with open_store(store_url) as store:
            yield store
        return
    lost: list[str] = []
    async with StoreProcess(store_url, lost.append) as in_its_process:
        yield in_its_process
    assert lost == []


async def begun(store: OrderStore, key: str = "k-1", owner: str = "w-1") -> StoredOrder:
    """Begin a new order under `key` and return it (failing if the key was taken)."""
    result = await store.begin(key, "o-1", "hash-1", BODY, owner)
    assert isinstance(result, Begun)
    return result.order


async def interrupted(store: OrderStore, key: str = "k-1") -> StoredOrder:
    """An order whose first attempt ended interrupted (as recovery records it)."""
    order = await begun(store, key)
    store.record_step(key, order.attempt_id, StepRecord("payment", "ok", duration_ms=5))
    await store.finish(key, order.attempt_id, 503, b"{}", "interrupted")
    return order


# -- the contract, on every backend -------------------------------------------------------


async def test_begin_of_a_new_key_starts_attempt_one(store: OrderStore) -> None:
    """A new key is committed RUNNING as attempt 1, with a fresh attempt id, and can be read."""
    before = time.time()
    order = await begun(store)
    assert (order.key, order.order_id, order.request_hash, order.body) == (
        "k-1",
        "o-1",
        "hash-1",
        BODY,
    )
    assert (order.attempt, order.owner, order.state, order.steps) == (1, "w-1", RUNNING, ())
    assert len(order.attempt_id) == 32
    assert before <= order.started_at <= time.time()
    assert (order.finished_at, order.http_status, order.reply, order.kind) == (
        None,
        None,
        None,
        None,
    )
    assert await store.get("k-1") == order
    assert await store.get("k-2") is None


async def test_records_from_a_process_that_lost_its_order_are_ignored(store: OrderStore) -> None:
    """Once another process has claimed an order (the first one's lease lapsed), the first
    one's step records are ignored, as its finish is: the claimer's stand."""
    order = await begun(store, owner="w-1")  # w-1 holds no lease: as good as dead
    (claimed,) = await store.claim_interrupted("w-2", 10)
    assert claimed.owner == "w-2"
    undone = StepRecord("payment", "ok", None, 5, "ok", 3)
    store.record_step("k-1", order.attempt_id, undone, owner="w-2")
    await store.get("k-1")
    late = StepRecord("payment", "ok", None, 5, "error", 9)
    store.record_step("k-1", order.attempt_id, late, owner="w-1")
    store.record_step("k-1", order.attempt_id, StepRecord("vendor", "ok"), owner="w-1")

    stored = await store.get("k-1")

    assert stored is not None
    assert stored.steps == (undone,)


async def test_records_from_before_an_order_was_claimed_back_take_no_undo_back(
    store: OrderStore,
) -> None:
    """w-1's lease lapsed; w-2 claimed its order, undid its steps and died; w-1 claimed it
    back. w-1's records from before (held in an outage, or of its run going on) then carry
    its owner again, and land: they may not take a step's compensation back (a compensated
    step read as not undone; a failed undo no longer needing attention), and a compensation
    that failed may not replace one that succeeded (the step is undone: they are idempotent)."""
    order = await begun(store, owner="w-1")  # w-1 holds no lease: as good as dead
    (claimed,) = await store.claim_interrupted("w-2", 10)
    assert claimed.owner == "w-2"
    refunded = StepRecord("payment", "ok", None, 5, "ok", 3)
    notified = StepRecord("vendor", "ok", None, 7, "ok", 2)
    not_cancelled = StepRecord("courier", "ok", None, 4, "error", 8)
    undone = (refunded, notified, not_cancelled)
    for record in undone:
        store.record_step("k-1", order.attempt_id, record, owner="w-2")
    await store.get("k-1")  # committed; then w-2 dies (it never held a lease either)
    (back,) = await store.claim_interrupted("w-1", 10)
    assert back.owner == "w-1"

    for record in (
        StepRecord("payment", "ok", None, 5),
        StepRecord("vendor", "ok", None, 7, "timeout", 900),
        StepRecord("courier", "ok", None, 4),
    ):
        store.record_step("k-1", order.attempt_id, record, owner="w-1")
    stored = await store.get("k-1")

    assert stored is not None
    assert stored.steps == back.steps == undone
    assert stored.needs_attention


async def test_a_record_taking_an_undo_back_loses_in_one_commit_too(store: OrderStore) -> None:
    """Records of one step committed together are written as if one after another: the later
    replaces the earlier unless it would take its undo back (PostgreSQL, which writes one row
    per step, picks it so)."""
    order = await begun(store)
    refunded = StepRecord("payment", "ok", None, 5, "ok", 3)
    for record in (StepRecord("payment", "ok", None, 5, "error", 9), refunded):
        store.record_step("k-1", order.attempt_id, record)
    store.record_step("k-1", order.attempt_id, StepRecord("payment", "ok", None, 5))
    store.record_step("k-1", order.attempt_id, StepRecord("vendor", "ok", None, 7, "error", 4))
    store.record_step("k-1", order.attempt_id, StepRecord("vendor", "ok", None, 7))

    stored = await store.get("k-1")

    assert stored is not None
    assert stored.steps == (refunded, StepRecord("vendor", "ok", None, 7, "error", 4))


async def test_a_later_step_record_stands_unless_it_takes_the_stored_one_s_undo_back(
    store: OrderStore,
) -> None:
    """Each pair of a stored record's compensation and a later record's (none, failed, ok),
    committed one after the other: the later replaces the stored one, unless it would take
    its undo back (`takes_undo_back`: none after any, or anything but ok after ok). A step's
    first record and each record of its compensation's going on are written."""
    none, failed, timed_out, ok = None, "error", "timeout", "ok"
    later_stands = {
        (none, none): True,
        (none, failed): True,
        (none, ok): True,
        (failed, none): False,
        (failed, timed_out): True,
        (failed, ok): True,
        (ok, none): False,
        (ok, failed): False,
        (ok, ok): True,
    }
    cases = []
    for n, ((stored, later), stands) in enumerate(later_stands.items()):
        order = await begun(store, key=f"k-{n}")
        first = StepRecord("payment", "ok", None, 5, stored, 3 if stored else None)
        second = StepRecord("payment", "ok", None, 6, later, 4 if later else None)
        store.record_step(f"k-{n}", order.attempt_id, first)
        cases.append((f"k-{n}", order.attempt_id, first, second, stands))
    await store.get("k-0")  # the first records committed
    for key, attempt_id, _, second, _ in cases:
        store.record_step(key, attempt_id, second)

    for key, _, first, second, stands in cases:
        stored_order = await store.get(key)
        assert stored_order is not None
        assert stored_order.steps == ((second if stands else first),), (first, second)


async def test_a_finish_from_a_process_that_lost_its_order_is_ignored(store: OrderStore) -> None:
    """Once another process has claimed an order, the first one's final record (its own
    reply, by finish and finish_soon) is ignored; the claimer's stands."""
    order = await begun(store, owner="w-1")  # w-1 holds no lease: as good as dead
    (claimed,) = await store.claim_interrupted("w-2", 10)
    assert claimed.owner == "w-2"

    await store.finish("k-1", order.attempt_id, 200, b"first", None, owner="w-1")
    store.finish_soon("k-1", order.attempt_id, 200, b"first", None, owner="w-1")
    late = await store.get("k-1")
    await store.finish("k-1", order.attempt_id, 503, b"claimer", "interrupted", owner="w-2")
    done = await store.get("k-1")

    assert late is not None
    assert (late.state, late.owner, late.reply) == (RUNNING, "w-2", None)
    assert done is not None
    assert (done.state, done.http_status, done.reply) == (FINISHED, 503, b"claimer")


async def test_begin_of_a_taken_key_returns_the_stored_order(store: OrderStore) -> None:
    """A second begin with the key gets the first request's order, steps included, unchanged."""
    first = await begun(store)
    store.record_step("k-1", first.attempt_id, StepRecord("vendor", "ok", duration_ms=3))
    again = await store.begin("k-1", "o-2", "hash-2", b"{}", "w-2")
    assert isinstance(again, Existing)
    assert again.order.request_hash == "hash-1"
    assert again.order.body == BODY
    assert again.order.attempt_id == first.attempt_id
    assert again.order.steps == (StepRecord("vendor", "ok", duration_ms=3),)


async def test_concurrent_begins_of_one_key_start_it_once(store: OrderStore) -> None:
    """Of 50 tasks beginning the same key at once, exactly one runs it; all see that one."""
    results: list[Begun | Existing] = []

    async def begin(owner: str) -> None:
        results.append(await store.begin("k-1", "o-1", "hash-1", BODY, owner))

    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(begin, f"w-{i}")
    winners = [r for r in results if isinstance(r, Begun)]
    assert len(winners) == 1
    assert {r.order.attempt_id for r in results} == {winners[0].order.attempt_id}


async def test_steps_and_reply_are_recorded(store: OrderStore) -> None:
    """Steps show in get as recorded, a compensation replaces its step's record, finish the rest."""
    order = await begun(store)
    payment = StepRecord("payment", "ok", duration_ms=150)
    vendor = StepRecord("vendor", "error", detail="vendor_unavailable", duration_ms=200)
    store.record_step("k-1", order.attempt_id, payment)
    store.record_step("k-1", order.attempt_id, vendor)
    refunded = StepRecord("payment", "ok", duration_ms=150, compensation="ok", compensation_ms=80)
    store.record_step("k-1", order.attempt_id, refunded)
    await store.finish("k-1", order.attempt_id, 502, b'{"error":"vendor"}', "step_failed")
    done = await store.get("k-1")
    assert done is not None
    assert done.steps == (refunded, vendor)
    assert (done.state, done.http_status, done.reply, done.kind) == (
        FINISHED,
        502,
        b'{"error":"vendor"}',
        "step_failed",
    )
    assert done.finished_at is not None
    assert done.finished_at >= done.started_at


async def test_finished_reply_is_the_attempt_s_once_it_finished(store: OrderStore) -> None:
    """None while the attempt runs; its reply once a queued finish is committed; None for
    another attempt or key."""
    order = await begun(store)
    assert await store.finished_reply("k-1", order.attempt_id) is None
    store.finish_soon("k-1", order.attempt_id, 502, b'{"error":"x"}', "step_failed")
    replied = await store.finished_reply("k-1", order.attempt_id)
    assert replied == FinishedReply(502, b'{"error":"x"}', "step_failed")
    assert await store.finished_reply("k-1", "another-attempt") is None
    assert await store.finished_reply("k-2", order.attempt_id) is None
    store.finish_soon("k-1", "another-attempt", 200, b"{}", None)  # writes nothing
    assert await store.finished_reply("k-1", "another-attempt") is None


async def test_finish_of_a_stale_attempt_changes_nothing(store: OrderStore) -> None:
    """A finish with another attempt id, or after the order finished, leaves the row alone."""
    order = await begun(store)
    await store.finish("k-1", "not-this-attempt", 500, b"stale", "interrupted")
    running = await store.get("k-1")
    assert running is not None
    assert running.state == RUNNING
    await store.finish("k-1", order.attempt_id, 200, b"first", None)
    await store.finish("k-1", order.attempt_id, 500, b"second", "interrupted")
    done = await store.get("k-1")
    assert done is not None
    assert (done.http_status, done.reply, done.kind) == (200, b"first", None)


async def test_record_step_of_a_stale_attempt_is_dropped(store: OrderStore) -> None:
    """A step recorded under an attempt id that is not the order's current one is not shown."""
    order = await begun(store)
    store.record_step("k-1", "not-this-attempt", StepRecord("payment", "ok"))
    await store.finish("k-1", order.attempt_id, 200, b"{}", None)
    done = await store.get("k-1")
    assert done is not None
    assert done.steps == ()


async def test_restart_only_from_interrupted_and_the_expected_attempt(store: OrderStore) -> None:
    """Only an interrupted order at the expected attempt restarts, with a clean new attempt."""
    running = await begun(store, "k-run")
    assert await store.restart("k-run", "w-2", 1) is None
    await store.finish("k-run", running.attempt_id, 200, b"{}", None)
    assert await store.restart("k-run", "w-2", 1) is None  # finished ok: nothing to resume
    assert await store.restart("k-none", "w-2", 1) is None
    timed_out = await begun(store, "k-timeout")
    await store.finish("k-timeout", timed_out.attempt_id, 504, b"{}", "timeout")
    assert await store.restart("k-timeout", "w-2", 1) is None  # replayed, as every failure
    first = await interrupted(store)
    assert await store.restart("k-1", "w-2", 2) is None
    again = await store.restart("k-1", "w-2", 1)
    assert again is not None
    assert (again.attempt, again.owner, again.state, again.steps) == (2, "w-2", RUNNING, ())
    assert again.attempt_id != first.attempt_id
    assert again.started_at >= first.started_at
    assert (again.request_hash, again.body) == (first.request_hash, first.body)
    assert (again.finished_at, again.http_status, again.reply, again.kind) == (
        None,
        None,
        None,
        None,
    )
    assert await store.get("k-1") == again


async def test_running_of_finds_an_owner_s_running_orders_past_an_age(store: OrderStore) -> None:
    """An owner's orders still running and older than the age, with their steps: not another
    owner's, not a finished one, not a younger one."""
    mine = await begun(store, "k-mine", owner="w-1")
    store.record_step("k-mine", mine.attempt_id, StepRecord("payment", "ok"), owner="w-1")
    await begun(store, "k-theirs", owner="w-2")
    done = await begun(store, "k-done", owner="w-1")
    await store.finish("k-done", done.attempt_id, 200, b"{}", None)
    await trio.sleep(1)  # ages are on the store's clock: real time
    await begun(store, "k-young", owner="w-1")

    found = await store.running_of("w-1", 0.5)

    assert [(o.key, o.state, o.owner) for o in found] == [("k-mine", RUNNING, "w-1")]
    assert [r.step for r in found[0].steps] == ["payment"]
    assert await store.running_of("w-1", 3600) == []


async def test_one_of_two_concurrent_restarts_wins(store: OrderStore) -> None:
    """Two processes restarting the same interrupted order: one gets it, the other None."""
    await interrupted(store)
    results: list[StoredOrder | None] = []

    async def restart(owner: str) -> None:
        results.append(await store.restart("k-1", owner, 1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(restart, "w-2")
        nursery.start_soon(restart, "w-3")
    (winner,) = [r for r in results if r is not None]
    assert len(results) == 2
    assert await store.get("k-1") == winner


async def test_claim_takes_orders_of_expired_or_missing_leases_only(store: OrderStore) -> None:
    """Orders of a dead owner (lease expired or never taken) are claimed; a live owner's aren't."""
    await store.renew_lease("dead", -1.0)
    await store.renew_lease("live", 60.0)
    await store.renew_lease("me", 60.0)
    dead = await begun(store, "k-dead", owner="dead")
    store.record_step("k-dead", dead.attempt_id, StepRecord("payment", "ok", duration_ms=7))
    await begun(store, "k-gone", owner="gone")
    await begun(store, "k-live", owner="live")
    finished = await begun(store, "k-done", owner="dead")
    await store.finish("k-done", finished.attempt_id, 200, b"{}", None)

    claimed = {o.key: o for o in await store.claim_interrupted("me", 10)}
    assert set(claimed) == {"k-dead", "k-gone"}
    assert claimed["k-dead"].steps == (StepRecord("payment", "ok", duration_ms=7),)
    assert claimed["k-dead"].attempt_id == dead.attempt_id
    assert {o.owner for o in claimed.values()} == {"me"}
    assert await store.claim_interrupted("other", 10) == []  # "me" is alive and holds them
    live = await store.get("k-live")
    assert live is not None
    assert live.owner == "live"


async def test_release_lease_lets_others_claim_at_once(store: OrderStore) -> None:
    """An owner that released its lease (clean shutdown) has its running orders claimable."""
    await store.renew_lease("w-1", 60.0)
    await begun(store, owner="w-1")
    assert await store.claim_interrupted("me", 10) == []
    await store.release_lease("w-1")
    assert [o.key for o in await store.claim_interrupted("me", 10)] == ["k-1"]


async def test_a_claim_leaves_the_keys_its_claimer_still_runs_alone(store: OrderStore) -> None:
    """A claimer's `busy` keys (orders its own runs go on with, though another claimed them
    meanwhile and died) are not claimed back, whoever holds them; a later claim takes them."""
    await begun(store, "k-1", owner="dead")
    await begun(store, "k-2", owner="dead")
    await store.renew_lease("me", 60.0)

    claimed = await store.claim_interrupted("me", 10, busy=["k-1", "k-9"])
    assert [o.key for o in claimed] == ["k-2"]
    left = await store.get("k-1")
    assert left is not None
    assert left.owner == "dead"
    assert [o.key for o in await store.claim_interrupted("me", 10, busy=[])] == ["k-1"]


async def test_concurrent_claimers_get_disjoint_orders(store: OrderStore) -> None:
    """Two live processes claiming at once never both take one order, and leave none behind."""
    keys = {f"k-{i}" for i in range(20)}
    for key in keys:
        await begun(store, key, owner="dead")
    claims: dict[str, list[StoredOrder]] = {}

    async def claim(owner: str) -> None:
        await store.renew_lease(owner, 60.0)
        claims[owner] = await store.claim_interrupted(owner, 15)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(claim, "a")
        nursery.start_soon(claim, "b")
    a, b = ({o.key for o in claims[owner]} for owner in "ab")
    assert not a & b
    assert a | b == keys
    for owner, orders in claims.items():
        for order in orders:
            stored = await store.get(order.key)
            assert stored is not None
            assert stored.owner == owner


async def test_charge_is_idempotent_on_its_id(store: OrderStore) -> None:
    """A charge retried with the same id counts once; net_charge sums a key's own charges."""
    await store.charge("c-1", "k-1", 100)
    await store.charge("c-1", "k-1", 100)
    await store.charge("c-2", "k-1", 30)
    await store.charge("c-3", "k-2", 7)
    assert await store.net_charge("k-1") == 130
    assert await store.net_charge("k-2") == 7
    assert await store.net_charge("k-3") == 0


async def test_refund_is_idempotent_and_voids_unknown_charges(store: OrderStore) -> None:
    """A refund takes its charge back once; refunding a charge not made takes nothing and voids
    it, so a late charge (from a process that lost its order to recovery) is not taken."""
    await store.refund("c-never", "k-2")
    await store.charge("c-1", "k-1", 100)
    await store.charge("c-2", "k-1", 30)
    await store.refund("c-1", "k-1")
    await store.refund("c-1", "k-1")
    assert await store.net_charge("k-1") == 30
    await store.charge("c-1", "k-1", 100)  # a retried charge does not undo its refund
    assert await store.net_charge("k-1") == 30
    await store.charge("c-never", "k-2", 5)
    assert await store.net_charge("k-2") == 0
    await store.charge("c-3", "k-2", 7)
    assert await store.net_charge("k-2") == 7


async def test_list_orders_with_ledger_and_needs_attention(store: OrderStore) -> None:
    """list_orders gives each order with its net charge; needs_attention only failed undos,
    and orders whose undoing never finished: running, their owner's lease gone (a live
    owner's running order is not)."""
    ok = await begun(store, "k-ok")
    await store.charge(ok.attempt_id, "k-ok", 100)
    await store.finish("k-ok", ok.attempt_id, 200, b"{}", None)
    stuck = await begun(store, "k-stuck")
    await store.charge(stuck.attempt_id, "k-stuck", 40)
    store.record_step(
        "k-stuck", stuck.attempt_id, StepRecord("payment", "ok", compensation="error")
    )
    await store.finish("k-stuck", stuck.attempt_id, 500, b"{}", "compensation_failed")
    slow = await begun(store, "k-slow")
    cancel_timed_out = StepRecord("vendor", "ok", compensation="timeout")
    store.record_step("k-slow", slow.attempt_id, cancel_timed_out)
    await store.finish("k-slow", slow.attempt_id, 502, b"{}", "step_failed")
    undone = await begun(store, "k-undone")
    cancelled = StepRecord("vendor", "ok", compensation="ok")
    store.record_step("k-undone", undone.attempt_id, cancelled)
    await store.finish("k-undone", undone.attempt_id, 502, b"{}", "step_failed")
    dead = await begun(store, "k-dead", owner="w-dead")  # w-dead never held a lease
    await store.charge(dead.attempt_id, "k-dead", 7)
    await store.renew_lease("w-live", 60.0)
    await begun(store, "k-live", owner="w-live")

    everything = {o.key: net for o, net in await store.list_orders()}
    assert everything == {
        "k-ok": 100, "k-stuck": 40, "k-slow": 0, "k-undone": 0, "k-dead": 7, "k-live": 0
    }  # fmt: skip
    attention = await store.list_orders(needs_attention=True)
    assert {o.key: net for o, net in attention} == {"k-stuck": 40, "k-slow": 0, "k-dead": 7}
    assert all(o.needs_attention for o, _ in attention)
    assert [o.steps[0].compensation for o, _ in attention if o.key == "k-slow"] == ["timeout"]


async def _start_orders_at(store_url: str, starts: dict[str, float]) -> None:
    """Set stored orders' started_at (unix seconds) behind the store's back, on its database."""
    if store_url.startswith("sqlite:///"):
        path = store_url.removeprefix("sqlite:///")

        def write() -> None:
            with closing(sqlite3.connect(path, timeout=5.0)) as conn, conn:
                rows = [(at, key) for key, at in starts.items()]
                conn.executemany("UPDATE orders SET started_at = ? WHERE key = ?", rows)

        await trio.to_thread.run_sync(write)
        return
    schema = unquote(store_url).partition("search_path=")[2]
    for key, at in starts.items():
        await sql(
            "UPDATE orders SET started_at = to_timestamp(%s) WHERE key = %s", at, key, schema=schema
        )


async def test_list_orders_pages_cover_every_order_once_in_order(
    store: OrderStore, store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of any size, each after the last one's (started_at, key), give every order once,
    oldest start first, ties by key (by code point: "K" < "_" < "a" < "é"), each with its own
    steps and net charge; with needs_attention, every such order once, the same way."""
    keys = [f"{prefix}-{n}" for n in range(5) for prefix in ("k", "K", "k_", "é", "kA")]
    starts = {key: 1_750_000_000.0 + (n % 4) * 0.001 for n, key in enumerate(keys)}  # ties
    for n, key in enumerate(keys):
        if store_url == "memory":  # a store of this process: its clock
            monkeypatch.setattr(time, "time", lambda at=starts[key]: at)
        order = await begun(store, key)
        monkeypatch.undo()
        store.record_step(key, order.attempt_id, StepRecord("payment", "ok", detail=key))
        await store.charge(order.attempt_id, key, n)
        if n % 3 == 0:  # its refund failed: it needs attention
            store.record_step(
                key, order.attempt_id, StepRecord("vendor", "ok", compensation="error")
            )
            await store.finish(key, order.attempt_id, 500, b"{}", "compensation_failed")
        else:
            await store.finish(key, order.attempt_id, 200, b"{}", None)
    if store_url != "memory":
        await _start_orders_at(store_url, starts)
    expected = sorted(keys, key=lambda k: (starts[k], k.encode()))
    attention = [k for k in expected if keys.index(k) % 3 == 0]

    for needs_attention, wanted in ((False, expected), (True, attention)):
        for size in (1, 2, 7, len(wanted), len(wanted) + 1, 1000):
            pages, after = [], None
            while True:
                page = await store.list_orders(
                    needs_attention=needs_attention, after=after, limit=size
                )
                pages.append(page)
                if len(page) < size:
                    break
                after = (page[-1][0].started_at, page[-1][0].key)
            listed = [listing for page in pages for listing in page]
            assert [o.key for o, _ in listed] == wanted, (needs_attention, size)
            assert all(len(page) == size for page in pages[:-1])
            for order, net in listed:
                assert order.started_at == pytest.approx(starts[order.key], abs=1e-6)
                assert order.steps[0] == StepRecord("payment", "ok", detail=order.key)
                assert net == keys.index(order.key)
                assert order.needs_attention == (keys.index(order.key) % 3 == 0)
    every = [o.key async for o, _ in every_order(store, page=3)]
    assert every == expected


async def test_purge_forgets_old_finished_orders_only(store: OrderStore) -> None:
    """Purge removes finished orders older than the retention with their steps and ledger
    rows, at most `limit` a call; not one that needs attention (its money may be held: the
    operator's to resolve)."""
    await store.renew_lease("w-1", 60.0)  # k-running's owner is alive
    held = await begun(store, "k-held")
    await store.charge(held.attempt_id, "k-held", 70)
    await store.finish("k-held", held.attempt_id, 500, b"{}", "compensation_failed")
    old = await begun(store, "k-old")
    store.record_step("k-old", old.attempt_id, StepRecord("payment", "ok"))
    await store.charge(old.attempt_id, "k-old", 100)
    await store.refund("c-never-made", "k-old")  # voids that charge, under the key
    await store.finish("k-old", old.attempt_id, 200, b"{}", None)
    for key in ("k-old-2", "k-old-3"):
        other = await begun(store, key)
        await store.finish(key, other.attempt_id, 200, b"{}", None)
    await begun(store, "k-running")
    await trio.sleep(1.0)  # each side of the 0.5 s age by half a second: a stalled machine
    new = await begun(store, "k-new")
    await store.finish("k-new", new.attempt_id, 200, b"{}", None)

    assert await store.purge(0.5, limit=2) == 2  # a batch at most
    assert await store.purge(0.5, limit=2) == 1
    assert await store.purge(0.5, limit=2) == 0
    assert await store.get("k-old") is None
    assert await store.net_charge("k-old") == 0
    await store.charge("c-never-made", "k-old", 5)  # its void was purged with the order
    assert await store.net_charge("k-old") == 5
    assert {o.key for o, _ in await store.list_orders()} == {"k-running", "k-new", "k-held"}
    assert [(o.key, net) for o, net in await store.list_orders(needs_attention=True)] == [
        ("k-held", 70)
    ]
    again = await begun(store, "k-old")  # the key is free again
    assert (again.attempt, again.steps) == (1, ())
    assert await store.purge(0.5, limit=2) == 0


def lease_owners(store: OrderStore, store_url: str) -> set[str]:
    """The owners whose lease rows the store holds, read from its file or database (memory:
    its dict): a row that expired and one missing are alike to every method."""
    parsed = parse_store_url(store_url)
    if parsed.backend == "memory":
        assert isinstance(store, MemoryStore)
        return set(store._leases)
    if parsed.backend == "sqlite":
        assert parsed.path is not None
        with closing(sqlite3.connect(parsed.path)) as conn:
            return {owner for (owner,) in conn.execute("SELECT owner FROM leases")}
    import psycopg

    assert parsed.url is not None
    with psycopg.connect(parsed.url) as conn:  # its search_path: the test's schema
        return {owner for (owner,) in conn.execute("SELECT owner FROM leases")}


async def test_purge_forgets_the_leases_of_processes_long_gone(
    store: OrderStore, store_url: str
) -> None:
    """A process killed leaves its lease (a clean exit releases it): purged once it expired
    over the retention ago, so that a server restarted after every crash leaves no more rows
    than a retention's; a live one, or one expired within the retention, stays."""
    await store.renew_lease("w-killed-long-ago", -10.0)
    await store.renew_lease("w-killed-lately", -0.1)
    await store.renew_lease("w-live", 60.0)
    await begun(store, "k-running", owner="w-killed-long-ago")

    assert await store.purge(5.0, limit=10) == 0  # no order finished: the leases all the same
    assert lease_owners(store, store_url) == {"w-killed-lately", "w-live"}
    await store.purge(-120.0, limit=10)  # every order finished before two minutes from now
    assert lease_owners(store, store_url) == {"w-live"}  # but no live lease
    # Missing is as expired: the dead owner's order is claimed, the live one's lease holds.
    claimed = await store.claim_interrupted("w-live", limit=10)
    assert [o.key for o in claimed] == ["k-running"]
    await store.release_lease("w-live")
    assert lease_owners(store, store_url) == set()


async def test_a_cancelled_begin_did_all_or_nothing(store: OrderStore) -> None:
    """Cancelled before it starts, a begin writes nothing; cancelled in flight, it still returns."""
    with trio.CancelScope() as scope:
        scope.cancel()
        await store.begin("k-early", "o-1", "hash-1", BODY, "w-1")
    assert await store.get("k-early") is None

    returned: list[Begun | Existing] = []

    async def begin() -> None:
        returned.append(await store.begin("k-1", "o-1", "hash-1", BODY, "w-1"))
        await trio.sleep_forever()  # where the cancellation lands

    async with trio.open_nursery() as nursery:
        nursery.start_soon(begin)
        await trio.testing.wait_all_tasks_blocked()  # the begin is queued (SQLite) or done
        nursery.cancel_scope.cancel()
    assert [type(r) for r in returned] == [Begun]
    assert await store.get("k-1") == returned[0].order


# (charge, charge id, key, amount) or (refund, charge id, key, 0)
LedgerOp = tuple[str, str, str, int]
charge_ids = st.sampled_from(["c-1", "c-2", "c-3", "c-4"])
ledger_ops = st.lists(
    st.tuples(st.just("charge"), charge_ids, st.sampled_from("xy"), st.integers(0, 10**9))
    | st.tuples(st.just("refund"), charge_ids, st.sampled_from("xy"), st.just(0)),
    max_size=12,
)


@pytest.mark.fuzz
@settings(max_examples=examples(100))
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@given(ops=ledger_ops)
def test_ledger_matches_a_model(
    tmp_path_factory: pytest.TempPathFactory, backend: str, ops: list[LedgerOp]
) -> None:
    """For random charges and refunds, every backend's net charges are a simple model's."""
    charges: dict[str, tuple[str, int]] = {}
    refunded: set[str] = set()
    for action, charge_id, key, amount in ops:
        if action == "charge":
            charges.setdefault(charge_id, (key, amount))
        else:  # a refund before its charge voids it: the charge is then never taken
            refunded.add(charge_id)
    expected = {"x": 0, "y": 0}
    for charge_id, (key, amount) in charges.items():
        expected[key] += 0 if charge_id in refunded else amount

    async def main(url: str) -> dict[str, int]:
        async with open_store(url) as store:
            for action, charge_id, key, amount in ops:
                if action == "charge":
                    await store.charge(charge_id, key, amount)
                else:
                    await store.refund(charge_id, key)
            return {k: await store.net_charge(k) for k in expected}

    url = BACKENDS[backend](tmp_path_factory.mktemp("ledger"))
    assert trio.run(main, url) == expected, backend


# -- URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("memory", StoreURL("memory")),
        ("sqlite:///orders.db", StoreURL("sqlite", Path("orders.db"))),
        ("sqlite:///data/orders.db", StoreURL("sqlite", Path("data/orders.db"))),
        ("sqlite:////var/lib/orders.db", StoreURL("sqlite", Path("/var/lib/orders.db"))),
    ],
)
def test_store_urls_parse(url: str, parsed: StoreURL) -> None:
    """memory and sqlite:///PATH (relative) or sqlite:////PATH (absolute) are understood."""
    assert parse_store_url(url) == parsed


@pytest.mark.parametrize(
    "url",
    [
        "",
        "sqlite://",
        "sqlite:///",
        "sqlite:///:memory:",
        "sqlite://host/x.db",
        "mem",
        "pg://x",
        # The scheme as written, with its path: not 'SQLITE://', as if the path were empty.
        "SQLITE:///orders.db",
        "Sqlite:////var/lib/orders.db",
    ],
)
async def test_other_store_urls_are_refused(url: str) -> None:
    """Anything else is a one-line StoreError naming the URL (whole) and what would do, even
    to open."""
    with pytest.raises(StoreError, match="unsupported store URL") as raised:
        parse_store_url(url)
    assert repr(url) in str(raised.value)
    assert "sqlite:///PATH or memory" in str(raised.value)
    with pytest.raises(StoreError):
        async with open_store(url):
            pass


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://orders:s3cret@db.example:5433/orders",
        "postgres://orders@db.example/orders",
        "postgresql://orders@db.example/orders?options=-csearch_path%3Dshop&sslmode=require",
    ],
)
def test_postgresql_urls_parse(url: str) -> None:
    """postgresql:// and postgres:// URLs are kept whole; their repr shows no password."""
    pytest.importorskip("psycopg")
    parsed = parse_store_url(url)
    assert parsed == StoreURL("postgresql", url=url)
    assert "s3cret" not in repr(parsed)


@pytest.mark.parametrize(
    "url",
    ["postgresql://orders:s3cret@db.example/orders?nonsense=1", "postgres://u:s3cret@[::1/x"],
)
async def test_a_bad_postgresql_url_is_refused_without_its_password(url: str) -> None:
    """libpq's parsing refuses it at once, in a one-line StoreError without the password."""
    pytest.importorskip("psycopg")
    with pytest.raises(StoreError, match="not a valid PostgreSQL URL") as raised:
        parse_store_url(url)
    assert "s3cret" not in str(raised.value)
    assert "\n" not in str(raised.value)
    with pytest.raises(StoreError):
        async with open_store(url):
            pass


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///orders.db?mode=ro",
        "sqlite:///orders.db#x",
        "sqlite:///orders\n.db",
        # A space an env file or a YAML value kept: `orders.db ` is another, new file.
        "sqlite:///orders.db ",
        "sqlite:/// orders.db",
    ],
)
def test_a_sqlite_url_names_a_file_alone(url: str) -> None:
    """What would be URI syntax, a control character, or a space at either end, is refused
    rather than taken into the file's name (which would open a new, empty store under that
    name)."""
    with pytest.raises(StoreError, match="names a file alone"):
        parse_store_url(url)


@pytest.mark.parametrize(
    "url",
    ["sqlite:///orders/", "sqlite:////var/lib/orders/", "sqlite:///orders/.", "sqlite:///x/.."],
)
async def test_a_sqlite_url_that_names_a_directory_is_refused(tmp_path: Path, url: str) -> None:
    """A path that ends in `/` (or `.`, `..`) names a directory, a file name left out; pathlib
    drops a trailing `/` and `.`, so `sqlite:///orders/` made a new store in a file named
    `orders` (where that directory was still to be made). Refused before anything is made."""
    with pytest.raises(StoreError, match="names a file, not a directory"):
        parse_store_url(url)
    inside = tmp_path / "orders"
    with pytest.raises(StoreError, match="names a file, not a directory"):
        async with open_store(f"sqlite:///{inside}/"):
            pass
    assert not inside.exists()


def test_a_sqlite_url_whose_path_is_not_utf_8_is_refused_saying_so() -> None:
    """A file name of bytes that are not UTF-8 (a Latin-1 `café.db`, which the command line
    and the environment carry as os.fsdecode's escapes) is refused for what it is, naming the
    byte: not as a control character, which it is not."""
    url = "sqlite:///" + os.fsdecode("café.db".encode("latin-1"))
    with pytest.raises(StoreError) as raised:
        parse_store_url(url)
    assert "not UTF-8 (byte 0xe9)" in str(raised.value)
    assert "control character" not in str(raised.value)


@pytest.mark.parametrize(
    "url",
    ["postgresql://orders:s3cret@db.example/orders\n", "postgresql://orders:s3cret@db\texample/o"],
)
def test_a_postgresql_url_with_a_control_character_is_refused(url: str) -> None:
    """libpq would take it into the database's or the host's name, and fail to connect later
    in a message split over lines; it is refused at once, in one line without the password."""
    pytest.importorskip("psycopg")
    with pytest.raises(StoreError, match="holds no control characters") as raised:
        parse_store_url(url)
    assert "s3cret" not in str(raised.value)
    assert "\n" not in str(raised.value)
    assert "\t" not in str(raised.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://orders:s3cret@db.example:5433/orders", "postgresql://db.example:5433"),
        # libpq ends the user part at the first @ before a /: a password may hold ? or #.
        ("postgresql://orders:s3?cret@db.example/orders?x=1", "postgresql://db.example"),
        ("postgres://orders:s3#cret@db.example", "postgres://db.example"),
        ("postgresql://db.example?user=orders&password=s3cret", "postgresql://db.example"),
        # Not ours to open, and as likely to hold a password: a scheme of SQLAlchemy, a typo.
        ("postgresql+psycopg://orders:s3cret@db.example/orders", "postgresql+psycopg://db.example"),
        (" postgresq://orders:s3cret@db.example/orders", " postgresq://db.example"),
        ("sqlite:///orders.db", "sqlite:///orders.db"),
        ("memory", "memory"),
        # An unescaped / in the password: libpq itself reads a port and a dbname from it.
        ("postgresql://app:s3cr3t/x@db.example:5432/orders", "postgresql://db.example:5432"),
        # Not URLs at all, and as likely to hold a password.
        ("postgresql:/app:s3cret@db/orders", "(not shown: it may hold a password)"),
        ("host=db user=app password=s3cret dbname=orders", "(not shown: it may hold a password)"),
        ("bogus", "bogus"),
    ],
)
def test_a_store_url_is_shown_without_its_password(url: str, shown: str) -> None:
    """What messages and logs show of a store URL: never a password, however spelled."""
    assert shown_url(url) == shown


def test_a_postgresql_store_names_itself_without_a_password_libpq_misread() -> None:
    """The name a PostgreSQL store gives itself in messages, from libpq's reading of its URL,
    holds no password even where libpq took it for a port (an unescaped / in it)."""
    pytest.importorskip("psycopg")
    from order_pipeline.store.postgres import PostgresStore

    assert PostgresStore("postgresql://app:pw@db.example:5432/orders").where == (
        "postgresql://app@db.example:5432/orders"
    )
    assert "s3cr3t" not in PostgresStore("postgresql://app:s3cr3t/x@db.example:5432/o").where
    # No host: libpq's default (PGHOST, or a Unix socket), which "localhost" would misname.
    assert PostgresStore("postgresql://app@/orders").where == "postgresql://app@/orders"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://orders:s3cret@db.example/orders",
        "postgresq://orders:s3cret@db.example/orders",
        "postgresql://orders:s3?cret@db.example/orders?nonsense=%zz",
    ],
)
def test_a_refused_store_url_is_named_without_its_password(url: str) -> None:
    """An unsupported or unparsable URL is refused naming its host, not its password."""
    pytest.importorskip("psycopg")
    with pytest.raises(StoreError) as raised:
        parse_store_url(url)
    assert "s3" not in str(raised.value)
    assert "db.example" in str(raised.value)


async def test_open_store_picks_the_backend(tmp_path: Path) -> None:
    """open_store yields a MemoryStore for memory and a SqliteStore on the named file."""
    async with open_store("memory") as memory:
        assert isinstance(memory, MemoryStore)
    async with open_store(f"sqlite:///{tmp_path / 'o.db'}") as sqlite:
        assert isinstance(sqlite, SqliteStore)
        assert sqlite.path == tmp_path / "o.db"
    assert (tmp_path / "o.db").exists()


# -- SQLite only ----------------------------------------------------------------------------


async def test_two_stores_on_one_file_share_orders_and_one_wins_a_key(tmp_path: Path) -> None:
    """Two processes' stores opened at once on one new file: one schema, and one begin wins."""
    path = tmp_path / "orders.db"
    stores = [SqliteStore(path), SqliteStore(path)]
    async with trio.open_nursery() as nursery:
        for store in stores:
            nursery.start_soon(store.__aenter__)
    try:
        results: list[Begun | Existing] = []

        async def begin(store: SqliteStore, owner: str) -> None:
            results.append(await store.begin("k-1", "o-1", "hash-1", BODY, owner))

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(begin, stores[i % 2], f"w-{i}")
        (winner,) = [r for r in results if isinstance(r, Begun)]
        assert {r.order.attempt_id for r in results} == {winner.order.attempt_id}
        other = await begun(stores[1], "k-2")
        assert await stores[0].get("k-2") == other
    finally:
        for store in stores:
            await store.aclose()


async def test_reopening_the_file_keeps_everything(tmp_path: Path) -> None:
    """What was committed before close is there after open, byte for byte."""
    path = tmp_path / "orders.db"
    async with SqliteStore(path) as store:
        order = await begun(store)
        store.record_step("k-1", order.attempt_id, StepRecord("courier", "canceled", "x", 9))
        await store.charge(order.attempt_id, "k-1", 100)
        await store.renew_lease("w-1", -1.0)
        await store.finish("k-1", order.attempt_id, 201, b'{"status":"ok"}\xff', None)
        await begun(store, "k-2")
        kept = await store.get("k-1")
    async with SqliteStore(path) as store:
        assert await store.get("k-1") == kept
        assert await store.net_charge("k-1") == 100
        assert [o.key for o in await store.claim_interrupted("w-2", 10)] == ["k-2"]
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_an_empty_file_becomes_a_store(tmp_path: Path) -> None:
    """A zero-byte file (say, made by touch) is taken as a new store, not refused."""
    path = tmp_path / "orders.db"
    path.write_bytes(b"")
    async with SqliteStore(path) as store:
        order = await begun(store)
        assert await store.get("k-1") == order


@contextmanager
def sqlite_code_of_version(version: int) -> Iterator[None]:
    """The SQLite store as a program that knows schema versions up to `version` runs it."""
    from order_pipeline.store import sqlite

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sqlite, "SCHEMA_VERSION", version)
        patch.setattr(sqlite, "_MIGRATIONS", sqlite._MIGRATIONS[:version])
        yield


Listed = list[tuple[StoredOrder, int]]


async def older_orders(store: OrderStore) -> tuple[Listed, Listed]:
    """Orders of every shape, in a store of an older version: what an upgrade must keep, and
    list (every order, and those needing attention) and purge as before. Both listings."""
    await interrupted(store, "k-interrupted")
    paid = await begun(store, "k-paid")
    await store.charge(paid.attempt_id, "k-paid", 1299)
    store.record_step("k-paid", paid.attempt_id, StepRecord("payment", "ok", duration_ms=3))
    await store.finish("k-paid", paid.attempt_id, 200, b'{"status":"ok"}', None)
    await begun(store, "k-running", owner="w-gone")  # abandoned: needs attention
    held = await begun(store, "k-held")
    await store.charge(held.attempt_id, "k-held", 70)
    store.record_step("k-held", held.attempt_id, StepRecord("payment", "ok", compensation="error"))
    await store.finish("k-held", held.attempt_id, 500, b"{}", "compensation_failed")
    for key, undo in (("k-slow", "timeout"), ("k-undone", "ok")):  # the first needs attention
        failed = await begun(store, key)
        store.record_step(key, failed.attempt_id, StepRecord("vendor", "ok", compensation=undo))
        await store.finish(key, failed.attempt_id, 502, b"{}", "vendor_unavailable")
    await store.renew_lease("w-live", 60.0)
    await begun(store, "k-live", owner="w-live")
    return await store.list_orders(), await store.list_orders(needs_attention=True)


async def upgraded_lists_and_purges_as_before(
    store: OrderStore, everything: Listed, attention: Listed
) -> None:
    """The orders of `older_orders`, upgraded: listed as the older version listed them, and
    purged as it would (every finished one but compensation_failed, whose money is held)."""
    assert await store.list_orders() == everything
    assert await store.list_orders(needs_attention=True) == attention
    assert [o.key for o, _ in attention] == ["k-running", "k-held", "k-slow"]
    assert await store.get("k-paid") == next(o for o, _ in everything if o.key == "k-paid")
    assert await store.purge(-60.0, limit=100) == 4  # finished before a minute from now
    assert [o.key for o, _ in await store.list_orders()] == ["k-running", "k-held", "k-live"]
    assert [(o.key, net) for o, net in await store.list_orders(needs_attention=True)] == [
        ("k-running", 0),
        ("k-held", 70),
    ]


def _sqlite_indexes(path: Path) -> list[str]:
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql NOTNULL")
        return sorted(name for (name,) in rows)


_SQLITE_INDEXES = {  # each schema version's own (its tables' primary keys aside)
    1: ["ledger_key", "orders_finished_at", "orders_state_owner"],
    2: ["ledger_key", "orders_finished_at", "orders_started", "orders_state_owner"],
    3: [
        "ledger_key", "orders_attention", "orders_purgeable", "orders_started",
        "orders_state_owner",
    ],
}  # fmt: skip


@pytest.mark.parametrize("older", [1, 2])
async def test_an_older_file_is_upgraded_with_its_orders(tmp_path: Path, older: int) -> None:
    """A store made by a program of schema version 1 or 2, holding orders of every shape,
    opened by this one: the indexes of the versions since are built (orders_finished_at gives
    way to orders_purgeable), user_version is 3; every order, step and charge is kept, and
    listed and purged as before; the older program then refuses it (newer than it knows),
    untouched."""
    path = tmp_path / "orders.db"
    with sqlite_code_of_version(older):
        async with SqliteStore(path) as old:
            everything, attention = await older_orders(old)
    assert _sqlite_indexes(path) == _SQLITE_INDEXES[older]
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (older,)

    async with SqliteStore(path) as store:
        await upgraded_lists_and_purges_as_before(store, everything, attention)
    assert _sqlite_indexes(path) == _SQLITE_INDEXES[SCHEMA_VERSION]
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (3,)
    upgraded = path.read_bytes()
    with sqlite_code_of_version(older), pytest.raises(StoreError, match="newer than this program"):
        async with SqliteStore(path):
            pass
    assert path.read_bytes() == upgraded


@pytest.mark.parametrize("older", [1, 2])
async def test_stores_opening_one_older_file_at_once_upgrade_it_once(
    tmp_path: Path, older: int
) -> None:
    """Four stores (as four processes starting) on one store of an older version: all open,
    each sees every order; one of them built the indexes, the others found them built
    (re-checked under the write lock)."""
    path = tmp_path / "orders.db"
    with sqlite_code_of_version(older):
        async with SqliteStore(path) as old:
            before = {o.key for o, _ in (await older_orders(old))[0]}
    stores = [SqliteStore(path) for _ in range(4)]
    try:
        async with trio.open_nursery() as nursery:
            for store in stores:
                nursery.start_soon(store.__aenter__)
        for store in stores:
            assert {o.key for o, _ in await store.list_orders()} == before
    finally:
        for store in stores:
            await store.aclose()
    assert _sqlite_indexes(path) == _SQLITE_INDEXES[SCHEMA_VERSION]


@pytest.mark.parametrize("older", [1, 2])
async def test_a_reader_refuses_an_older_file_and_leaves_it_as_it_was(
    tmp_path: Path, older: int
) -> None:
    """An operator's listing does not upgrade a store (its index builds would hold the write
    lock, and servers of the older version would then refuse the file): one line saying a
    server of this version upgrades it; the file's bytes unchanged."""
    path = tmp_path / "orders.db"
    with sqlite_code_of_version(older):
        async with SqliteStore(path) as old:
            await older_orders(old)
    before = path.read_bytes()
    with pytest.raises(StoreError, match=f"version {older}, older than this program's 3: a server"):
        async with open_store(f"sqlite:///{path}", reader=True):
            pass
    assert path.read_bytes() == before


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _foreign_tables(path: Path) -> None:
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY)")
        conn.commit()


def _foreign_application_id(path: Path) -> None:
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA application_id = 1234")
        conn.commit()


def _newer_schema(path: Path) -> None:
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.execute("CREATE TABLE orders (key TEXT PRIMARY KEY, shape TEXT)")
        conn.commit()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b"not a database, just garbage bytes\n" * 50), "not a database"),
        (lambda p: p.write_bytes(b"x"), "not a database"),
        (_foreign_tables, "not an order store"),
        (_foreign_application_id, "not an order store"),
        (_newer_schema, "newer than this program"),
    ],
    ids=["garbage", "one-byte", "other-tables", "other-application-id", "newer-schema"],
)
async def test_a_file_that_is_not_ours_is_refused_untouched(
    tmp_path: Path, make: Callable[[Path], object], reason: str
) -> None:
    """A file that is not this store's database is a one-line StoreError; its bytes stay as is."""
    path = tmp_path / "orders.db"
    make(path)
    before = path.read_bytes()
    with pytest.raises(StoreError, match=reason) as raised:
        async with SqliteStore(path):
            pass
    assert str(path) in str(raised.value)
    assert "\n" not in str(raised.value)
    assert path.read_bytes() == before
    assert _names(tmp_path) == ["orders.db"]  # no -wal or -journal file either


def _foreign_with_its_wal_left(path: Path) -> None:
    """Another program's database in WAL mode whose last writer died before a checkpoint:
    its latest commits are only in the -wal file beside it."""
    code = (
        "import os, sqlite3, sys\n"
        "conn = sqlite3.connect(sys.argv[1])\n"
        "conn.execute('PRAGMA journal_mode = WAL')\n"
        "conn.execute('PRAGMA wal_autocheckpoint = 0')\n"
        "conn.execute('CREATE TABLE notes (text TEXT)')\n"
        "conn.execute(\"INSERT INTO notes VALUES ('mine')\")\n"
        "conn.commit()\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True)


@pytest.mark.parametrize(
    "name", [b"//orders.db", "café.db".encode("latin-1")], ids=["double-slash", "not-utf-8"]
)
async def test_a_store_reopens_whatever_its_path_s_spelling(tmp_path: Path, name: bytes) -> None:
    """The read-only check of an existing file finds it by its path's own bytes: a path that
    begins with // or is not UTF-8 opens again as it opened the first time."""
    path = Path(os.fsdecode(os.fsencode(tmp_path) + b"/" + name.lstrip(b"/")))
    if name.startswith(b"//"):
        path = Path("/" + str(path))  # //tmp/...: the same file, another spelling
    for _ in range(2):
        async with SqliteStore(path) as store:
            await store.renew_lease("w-1", 1.0)


async def test_a_foreign_file_with_a_wal_left_beside_it_is_refused_untouched(
    tmp_path: Path,
) -> None:
    """Refusing another program's WAL-mode database does not checkpoint its -wal into it (a
    read-write connection's close would): the file and its -wal stay byte for byte."""
    path = tmp_path / "notes.db"
    _foreign_with_its_wal_left(path)
    wal = tmp_path / "notes.db-wal"
    before = (path.read_bytes(), wal.read_bytes())
    assert before[1]  # the commit is in the WAL only

    with pytest.raises(StoreError, match="not an order store"):
        async with open_store(f"sqlite:///{path}"):
            pass

    assert (path.read_bytes(), wal.read_bytes()) == before


def _in_wal_mode(make: Callable[[Path], object]) -> Callable[[Path], None]:
    """`make`'s database, then switched to WAL mode and closed cleanly (no -wal left)."""

    def made(path: Path) -> None:
        make(path)
        with closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA journal_mode = WAL")

    return made


@pytest.mark.parametrize("reader", [False, True], ids=["server", "listing"])
@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_in_wal_mode(_foreign_tables), "not an order store"),
        (_in_wal_mode(_newer_schema), "newer than this program"),
    ],
    ids=["other-tables", "newer-schema"],
)
async def test_a_wal_mode_file_that_is_not_ours_is_refused_with_nothing_left_beside_it(
    tmp_path: Path, make: Callable[[Path], object], reason: str, reader: bool
) -> None:
    """Refusing a WAL-mode database that is not ours (another program's, a newer version's
    store) leaves no -wal or -shm beside it: a read-only connection makes both and cannot
    remove them, and another user's so left kept the file's owner from writing it
    ("attempt to write a readonly database")."""
    path = tmp_path / "orders.db"
    make(path)
    before = path.read_bytes()
    assert _names(tmp_path) == ["orders.db"]

    with pytest.raises(StoreError, match=reason):
        async with SqliteStore(path, reader=reader):
            pass

    assert path.read_bytes() == before
    assert _names(tmp_path) == ["orders.db"]


@pytest.mark.parametrize(
    "where",
    ["missing/dir/orders.db", ".", "fifo", "x" * 300],
    ids=["missing-dir", "a-dir", "a-fifo", "a-name-too-long"],
)
async def test_an_unopenable_path_is_refused(tmp_path: Path, where: str) -> None:
    """A path in a missing directory, a directory, a FIFO (whose read would block for good)
    or one the system cannot even look up is a one-line StoreError naming it."""
    if where == "fifo":
        os.mkfifo(tmp_path / where)
    path = tmp_path / where
    with pytest.raises(StoreError) as raised:
        async with open_store(f"sqlite:///{path}"):
            pass
    assert str(path) in str(raised.value)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "missing").exists()


async def test_a_path_under_a_file_is_refused_saying_that_file_is_no_directory(
    tmp_path: Path,
) -> None:
    """`sqlite:///orders.db/x` (a file taken for a directory): the line said `directory
    .../orders.db does not exist` while the file was there; it says it is not a directory."""
    (tmp_path / "orders.db").write_bytes(b"")
    path = tmp_path / "orders.db" / "x"
    with pytest.raises(StoreError) as raised:
        async with open_store(f"sqlite:///{path}"):
            pass
    assert str(raised.value) == (
        f"{path}: cannot open the store: {tmp_path / 'orders.db'} is not a directory"
    )
    missing = tmp_path / "missing" / "orders.db"
    with pytest.raises(StoreError, match=r"directory .*/missing does not exist"):
        async with open_store(f"sqlite:///{missing}"):
            pass
    # A symbolic link to a file in a missing directory: that directory is named, not the
    # open-files limit (SQLite's CANTOPEN, the link's own directory writable).
    link = tmp_path / "link.db"
    link.symlink_to(missing)
    with pytest.raises(StoreError) as raised:
        async with open_store(f"sqlite:///{link}"):
            pass
    assert str(raised.value) == (
        f"{link}: cannot open the store: directory {missing.parent} does not exist"
    )
    loop = tmp_path / "loop.db"
    loop.symlink_to(loop)
    with pytest.raises(StoreError, match="Too many levels of symbolic links"):
        async with open_store(f"sqlite:///{loop}"):
            pass


@contextmanager
def read_only(path: Path, mode: int = 0o444) -> Iterator[None]:
    """`path` not writable, even by root (immutable: chattr +i), for the block."""
    if os.geteuid() != 0:
        was = path.stat().st_mode
        path.chmod(mode)
        try:
            yield
        finally:
            path.chmod(was)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is refused here: root cannot make a file read-only otherwise")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


async def test_a_store_file_that_cannot_be_written_is_refused_at_open(tmp_path: Path) -> None:
    """A store file this process may not write (read-only, or on a read-only mount) is a
    one-line StoreError when it opens (the server exits 2), not a crash at its first write."""
    path = tmp_path / "orders.db"
    async with SqliteStore(path):
        pass
    with read_only(path), pytest.raises(StoreError, match="readonly") as raised:
        async with open_store(f"sqlite:///{path}"):
            pass
    assert str(path) in str(raised.value)
    assert "\n" not in str(raised.value)


async def test_an_operator_lists_a_store_file_that_cannot_be_written(tmp_path: Path) -> None:
    """A reader (`order-pipeline orders`) opens a store file it may not write (another user's,
    in a directory it may write), where a server is refused."""
    path = tmp_path / "orders.db"
    async with SqliteStore(path) as store:
        order = await begun(store)
        await store.finish("k-1", order.attempt_id, 200, b"{}", None)
    with read_only(path):
        async with open_store(f"sqlite:///{path}", reader=True) as reading:
            listed = await reading.list_orders()
    assert [(o.key, o.state) for o, _ in listed] == [("k-1", FINISHED)]


async def test_an_operator_lists_a_store_while_another_process_holds_its_write_lock(
    tmp_path: Path,
) -> None:
    """A reader (`order-pipeline orders`) takes no write lock: it lists while a server commits
    (a listing that took it stalled every commit of the servers on the file for as long)."""
    path = tmp_path / "orders.db"
    async with SqliteStore(path) as store:
        order = await begun(store)
        await store.finish("k-1", order.attempt_id, 200, b"{}", None)
    with closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO leases VALUES ('w-2', 0)")
        async with SqliteStore(path, reader=True, busy_timeout=0.2) as reading:
            listed = await reading.list_orders()
        other.execute("ROLLBACK")
    assert [(o.key, o.state) for o, _ in listed] == [("k-1", FINISHED)]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_a_store_that_cannot_open_its_wal_for_want_of_descriptors_says_so(tmp_path: Path) -> None:
    """Under a low `ulimit -n` SQLite cannot open the -wal beside the file (EMFILE): the line
    names the limit, not a directory that cannot be written (it was writable), which sent the
    operator to check permissions that were fine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    said = []
    for spare in range(8):  # descriptors left free: too few for the file, its -wal, its -shm
        path = tmp_path / f"orders-{spare}.db"
        top = max(int(fd) for fd in os.listdir("/proc/self/fd")) + 16
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
        held: list[int] = []
        try:
            with suppress(OSError):
                while len(held) < top:  # every descriptor below the limit taken
                    held.append(os.open(os.devnull, os.O_RDONLY))
            for _ in range(spare):
                os.close(held.pop())
            _connect(path, 1.0).close()
        except StoreError as exc:
            said.append(str(exc))
        finally:
            for fd in held:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    cannot_open = [line for line in said if "unable to open database file" in line]
    assert cannot_open, said
    for line in cannot_open:
        assert "ulimit -n" in line
        assert "must be able to write its -wal and -shm files" not in line


async def test_a_store_in_a_directory_that_cannot_be_written_is_refused_saying_why(
    tmp_path: Path,
) -> None:
    """SQLite reads a WAL database only where it may make the -shm file beside it: a store in
    a directory that cannot be written (a read-only mount) is refused, to a reader too, in
    one line that says what to do, and left as it was. (Reading it `immutable`, without
    locks, would read garbage while a server writes it through another mount.)"""
    path = tmp_path / "store" / "orders.db"
    path.parent.mkdir()
    async with SqliteStore(path) as store:
        order = await begun(store)
        await store.finish("k-1", order.attempt_id, 200, b"{}", None)
    content = path.read_bytes()
    with read_only(path.parent, mode=0o555):
        for reader, advice in ((True, "or list a copy of the file, with its -wal,"), (False, "")):
            with pytest.raises(StoreError) as refused:
                async with open_store(f"sqlite:///{path}", reader=reader):
                    pass
            said = str(refused.value)
            assert f"must be able to write its -wal and -shm files in {path.parent}" in said
            assert (advice in said, "\n" in said) == (True, False)
    assert sorted(p.name for p in path.parent.iterdir()) == ["orders.db"]
    assert path.read_bytes() == content


async def test_a_locked_file_is_unavailable_then_recovers(tmp_path: Path) -> None:
    """While another process holds the write lock a commit raises StoreUnavailable; then works."""
    path = tmp_path / "orders.db"
    async with SqliteStore(path, busy_timeout=0.1) as store:
        with closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            failed: list[BaseException] = []

            async def begin(key: str) -> None:
                try:
                    await store.begin(key, "o-1", "hash-1", BODY, "w-1")
                except StoreUnavailable as exc:
                    failed.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(begin, "k-1")
                nursery.start_soon(begin, "k-2")
            assert len(failed) == 2
            assert all("locked" in str(exc) for exc in failed)
            other.execute("ROLLBACK")
        order = await begun(store)  # nothing of the failed batch was committed
        assert await store.get("k-1") == order
        assert await store.get("k-2") is None


Finished = tuple[str, str, float, str | None]  # key, owner, finished_at, kind


def _fill(conn: sqlite3.Connection, orders: list[Finished]) -> None:
    """Finished orders (key, owner, finished_at, kind) straight into the file, fast."""
    conn.executemany(
        "INSERT INTO orders (key, order_id, request_hash, body, attempt, attempt_id, owner,"
        " state, started_at, finished_at, http_status, reply, kind) VALUES"
        f" (?1, 'o', 'h', x'', 1, 'a-' || ?1, ?2, '{FINISHED}', ?3, ?3, 200, x'', ?4)",
        orders,
    )


async def _instructions(store: SqliteStore, call: Callable[[], Awaitable[T]]) -> tuple[T, int]:
    """What `call` returns, and about how many SQLite instructions its statements ran."""
    instructions = 0

    def count() -> int:
        nonlocal instructions
        instructions += 1000
        return 0

    await store._call(lambda conn: conn.set_progress_handler(count, 1000))
    try:
        return await call(), instructions
    finally:
        await store._call(lambda conn: conn.set_progress_handler(None, 0))


async def test_a_sqlite_purge_reads_the_expired_orders_only(tmp_path: Path) -> None:
    """A purge holds the write lock, and every order's commit behind it, for as long as its
    statement runs: it must read the expired orders (a range of orders_purgeable), not every
    finished one, nor the compensation_failed ones it keeps for good, which come first. 20,000
    orders within the retention, 20,000 kept and one past the retention: the purge of that one
    takes a few thousand SQLite instructions, not one pass per order (it took over a million
    through orders_state_owner, about 100 ms a batch at 500,000; and 140,000 past the kept
    ones through orders_finished_at, about 5 ms a batch)."""
    async with SqliteStore(tmp_path / "orders.db") as store:
        now = time.time()
        orders: list[Finished] = [(f"r-{i}", f"w-{i % 7}", now, None) for i in range(20_000)]
        orders += [(f"h-{i}", "w-old", now - 7300, "compensation_failed") for i in range(20_000)]
        orders.append(("k-old", "w-old", now - 7200, None))
        await store._call(lambda conn: _fill(conn, orders))

        purged, instructions = await _instructions(store, lambda: store.purge(3600.0, 1000))
        assert purged == 1
        assert await store.get("k-old") is None
    assert instructions < 20_000, instructions


async def test_a_sqlite_page_needing_attention_reads_those_that_may(tmp_path: Path) -> None:
    """A page of `--needs-attention` is one read transaction, which keeps the WAL from being
    checkpointed while it lasts (the servers' commits then grow it): it must read the orders
    that may need attention (running or failed: a range of orders_attention), not every
    order until a page of them is found. 20,000 orders that finished ok and three that need
    attention: a few thousand SQLite instructions, not one pass per order (300,000)."""
    async with SqliteStore(tmp_path / "orders.db") as store:
        now = time.time()
        orders: list[Finished] = [
            (f"k-{i:05}", "w-1", now - 100 + i / 1000, None) for i in range(20_000)
        ]
        orders[5_000] = ("k-05000", "w-1", now - 95, "compensation_failed")
        orders[15_000] = ("k-15000", "w-1", now - 85, "vendor_unavailable")
        await store._call(lambda conn: _fill(conn, orders))
        slow = StepRecord("vendor", "ok", compensation="timeout")
        store.record_step("k-15000", "a-k-15000", slow)
        await begun(store, "k-running", owner="w-gone")

        page, instructions = await _instructions(
            store, lambda: store.list_orders(needs_attention=True)
        )
        assert [o.key for o, _ in page] == ["k-05000", "k-15000", "k-running"]
    assert instructions < 20_000, instructions


class _Planned:
    """A SQLite connection that asks for each statement's plan before it runs it."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.plans: dict[str, str] = {}  # the statement's first three words: its plan

    def execute(self, sql: str, args: Any = ()) -> sqlite3.Cursor:
        plan = self.conn.execute(f"EXPLAIN QUERY PLAN {sql}", args).fetchall()
        self.plans[" ".join(sql.split()[:3])] = "; ".join(row[3] for row in plan)
        return self.conn.execute(sql, args)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        return self.conn.executemany(sql, rows)


async def test_sqlite_plans_read_attention_and_purges_through_their_indexes(
    tmp_path: Path,
) -> None:
    """EXPLAIN QUERY PLAN: a page of `--needs-attention`, the first and those after, is a
    range of orders_attention (not a scan of orders_started, every order); a purge, a range
    of orders_purgeable (not of orders_finished_at, which held the orders it keeps)."""
    from order_pipeline.store import sqlite

    async with SqliteStore(tmp_path / "orders.db") as store:
        now = time.time()
        orders: list[Finished] = [
            (f"k-{i}", "w-1", now - 100 + i, None if i % 9 else "timeout") for i in range(90)
        ]
        await store._call(lambda conn: _fill(conn, orders))

        def plans(conn: sqlite3.Connection) -> tuple[str, str, str]:
            planned = _Planned(conn)
            sqlite._list_orders(planned, True, None, 1000, now)  # type: ignore[arg-type]
            first = planned.plans["SELECT key, order_id,"]
            sqlite._list_orders(planned, True, (now - 50, "k-50"), 1000, now)  # type: ignore[arg-type]
            sqlite._purge(planned, now - 3600, 100)  # type: ignore[arg-type]
            after = planned.plans["SELECT key, order_id,"]
            return first, after, planned.plans["DELETE FROM orders"]

        first, after, purge = await store._call(plans)
    assert first.startswith("SCAN orders USING INDEX orders_attention"), first
    assert after.startswith("SEARCH orders USING INDEX orders_attention ((started_at,key)>"), after
    assert "orders_started" not in first + after
    assert "SEARCH orders USING INDEX orders_purgeable (finished_at>? AND finished_at<?)" in purge


async def test_an_operation_failing_alone_leaves_its_sqlite_batch_alone(tmp_path: Path) -> None:
    """In one batch, a charge SQLite cannot take (an amount past 64 bits) raises its own
    error; the begins around it are committed all the same."""
    path = tmp_path / "orders.db"
    results: dict[str, object] = {}

    async def call(name: str, fn: Callable[[], Awaitable[object]]) -> None:
        try:
            results[name] = await fn()
        except (OverflowError, ZeroDivisionError) as exc:
            results[name] = exc

    def write_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO leases (owner, expires_at) VALUES ('w-half', 0)")
        raise ZeroDivisionError("after its write")

    async def first_taken() -> bool:
        return store._queue.empty()  # the writer holds it, waiting for the lock

    async with SqliteStore(path) as store:
        with closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "k-0", lambda: store.begin("k-0", "o-0", "h", BODY, "w"))
                await trio.testing.wait_all_tasks_blocked()  # queued
                await wait_for(first_taken, "the writer to take the first begin")
                nursery.start_soon(call, "k-1", lambda: store.begin("k-1", "o-1", "h", BODY, "w"))
                nursery.start_soon(call, "charge", lambda: store.charge("c-1", "k-1", 2**70))
                nursery.start_soon(call, "half", lambda: store._call(write_then_fail))
                nursery.start_soon(call, "k-2", lambda: store.begin("k-2", "o-2", "h", BODY, "w"))
                await trio.testing.wait_all_tasks_blocked()
                other.execute("ROLLBACK")  # the rest queue behind the first: one batch
        assert isinstance(results["charge"], OverflowError)
        assert isinstance(results["half"], ZeroDivisionError)
        with closing(sqlite3.connect(path)) as reader:  # its write was undone with it
            assert reader.execute("SELECT owner FROM leases").fetchall() == []
        assert all(isinstance(results[k], Begun) for k in ("k-0", "k-1", "k-2"))
        k2 = results["k-2"]
        assert isinstance(k2, Begun)
        assert await store.get("k-2") == k2.order
        assert await store.net_charge("k-1") == 0


@asynccontextmanager
async def one_batch_behind_a_lock(store: SqliteStore, nursery: trio.Nursery) -> AsyncIterator[None]:
    """Hold the file's write lock until the writer has taken a lease renewal and waits for
    it: what is queued inside then runs as one batch behind it, once the lock is let go."""

    async def first_taken() -> bool:
        return store._queue.empty()

    with closing(sqlite3.connect(store.path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        nursery.start_soon(store.renew_lease, "w-1", 5.0)
        await trio.testing.wait_all_tasks_blocked()  # queued
        await wait_for(first_taken, "the writer to take the lease")
        yield
        store._send_riding()  # what nobody waits for goes with the rest, as a call would send it
        await trio.testing.wait_all_tasks_blocked()
        other.execute("ROLLBACK")


async def test_a_finish_whose_batch_failed_is_replied_once_committed(tmp_path: Path) -> None:
    """finished_reply answers from what finish_soon wrote only once it is committed: a finish
    whose batch failed after it ran (SQLite rolled the transaction back, as on an I/O error)
    is kept as not committed, runs again with the next batch, and is answered from that."""
    path = tmp_path / "orders.db"
    failed = threading.Event()

    def fail_the_batch(conn: sqlite3.Connection) -> None:
        conn.execute("ROLLBACK")
        failed.set()
        raise sqlite3.OperationalError("disk I/O error (simulated)")

    async def the_batch_failed() -> bool:
        return failed.is_set()

    async with SqliteStore(path) as store:
        order = await begun(store)
        async with trio.open_nursery() as nursery, one_batch_behind_a_lock(store, nursery):
            store.finish_soon("k-1", order.attempt_id, 200, b"{}", None)  # the finish first
            store._put(fail_the_batch, None)
        # The batch behind the renewal's ran and failed: the writer thread holds the finish
        # again, in front of the next batch. Until it has run, a call queued now would ride
        # in that batch and fail with it (seen once under coverage in CI).
        await wait_for(the_batch_failed, "the batch behind the renewal's to fail")
        assert len(store._replies) == 0  # nothing of the failed batch's as committed
        commits = store.commits
        reply = await store.finished_reply("k-1", order.attempt_id)  # carries the finish again
        assert reply == FinishedReply(200, b"{}", None)
        assert store.commits == commits + 1
        finished = await store.get("k-1")
        assert finished is not None
        assert finished.state == FINISHED


async def test_a_finish_whose_batch_fails_as_the_close_begins_is_tried_by_the_close(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch failing for an outage once the store's close has begun: the final record it
    carried is held for the close's own batch, which follows, and stored if the outage is
    over by then (not given up at once: no call will carry it, but the close's batch will;
    one outlasting the close: `test_a_record_whose_batch_fails_once_the_close_began_...`)."""
    path = tmp_path / "orders.db"
    async with SqliteStore(path) as store:
        order = await begun(store)

        def fail_once_the_close_began(conn: sqlite3.Connection) -> None:
            while not store._closed:  # in the writer thread
                time.sleep(0.001)
            conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("disk I/O error (simulated)")

        store.finish_soon("k-1", order.attempt_id, 200, b"{}", None)
        store._put(fail_once_the_close_began, None).records = 0
        store._send_riding()  # the batch runs, failing as the close begins

        async def taken() -> bool:
            return store._queue.empty()

        await wait_for(taken, "the writer to take the batch")
    async with SqliteStore(path) as store:
        stored = await store.get("k-1")

    assert stored is not None
    assert stored.state == FINISHED
    assert " not stored: " not in caplog.text  # no record given up


async def test_step_records_are_written_when_their_batch_runs_again(tmp_path: Path) -> None:
    """The step records a batch took from their queue are its own: when an operation failing
    alone makes the batch run again, they are written all the same (and only once)."""
    path = tmp_path / "orders.db"
    failed: list[BaseException] = []

    async def charge_too_much() -> None:
        try:
            await store.charge("c-1", "k-1", 2**70)  # more than SQLite's 64 bits
        except OverflowError as exc:
            failed.append(exc)

    async with SqliteStore(path) as store:
        order = await begun(store)
        async with trio.open_nursery() as nursery, one_batch_behind_a_lock(store, nursery):
            # The step records first, then the charge that fails alone.
            store.record_step("k-1", order.attempt_id, StepRecord("payment", "ok", None, 5))
            store.record_step("k-1", order.attempt_id, StepRecord("vendor", "ok", None, 3))
            nursery.start_soon(charge_too_much)
        stored = await store.get("k-1")
        assert len(failed) == 1
        assert stored is not None
        assert stored.steps == (
            StepRecord("payment", "ok", None, 5),
            StepRecord("vendor", "ok", None, 3),
        )


async def test_step_records_of_a_batch_locked_out_are_written_with_the_next(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch that fails before running any operation (the file locked past busy_timeout)
    holds its step records, with a line in the log; they are written with the next ones."""
    path = tmp_path / "orders.db"
    async with SqliteStore(path, busy_timeout=0.2) as store:
        order = await begun(store)
        with closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            store.record_step("k-1", order.attempt_id, StepRecord("payment", "ok", None, 5))
            with pytest.raises(StoreUnavailable) as failed:
                await store.get("k-1")  # in the same batch: both fail
            other.execute("ROLLBACK")
        store.record_step("k-1", order.attempt_id, StepRecord("vendor", "ok", None, 3))
        stored = await store.get("k-1")
    assert stored is not None
    assert stored.steps == (
        StepRecord("payment", "ok", None, 5), StepRecord("vendor", "ok", None, 3)
    )  # fmt: skip
    held = f"1 record(s) not stored yet, held for the next commit: {failed.value}"
    assert held in caplog.messages  # the outage's own words, for whoever reads the log


@asynccontextmanager
async def sqlite_here_or_in_a_store_process(
    path: Path, in_a_store_process: bool
) -> AsyncIterator[OrderStore]:
    """A SQLite store in this process's writer thread, or in a store process."""
    if not in_a_store_process:
        async with SqliteStore(path, busy_timeout=0.2) as store:
            yield store
        return
    lost: list[str] = []
    async with StoreProcess(f"sqlite:///{path}", lost.append) as store:
        yield store
    assert lost == []


@pytest.mark.parametrize("in_a_store_process", [False, True])
@pytest.mark.parametrize("how", ["deleted", "replaced", "moved away"])
async def test_a_store_whose_file_is_gone_commits_nothing_until_it_is_back(
    tmp_path: Path, in_a_store_process: bool, how: str
) -> None:
    """The store's file deleted, replaced or moved away while it serves: a commit would go
    to a file nobody will open again, so every call fails (StoreUnavailable) and the path's
    file is untouched; with the same file back at the path, the store commits again."""
    path, aside = tmp_path / "orders.db", tmp_path / "aside.db"
    async with sqlite_here_or_in_a_store_process(path, in_a_store_process) as store:
        await begun(store)
        path.rename(aside)
        if how == "deleted":
            aside.unlink()
        if how == "replaced":
            path.write_bytes(b"")

        with pytest.raises(
            StoreUnavailable, match="deleted or replaced since the store opened it"
        ) as gone:
            await begun(store, "k-2")
        assert not hasattr(gone.value, "__notes__")  # one of the store's own errors: no note

        if how == "replaced":
            assert path.read_bytes() == b""
            path.unlink()
        if how != "deleted":
            aside.rename(path)
            await begun(store, "k-3")
    if how != "deleted":
        async with SqliteStore(path) as store:
            assert await store.get("k-1") is not None
            assert await store.get("k-2") is None
            assert await store.get("k-3") is not None


@pytest.mark.parametrize("in_a_store_process", [False, True])
async def test_a_final_record_whose_commit_failed_rides_on_the_next_call(
    tmp_path: Path, in_a_store_process: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """`finish_soon` whose batch fails for an outage is held again, not lost (lost, it would
    leave its order running under its owner's live lease): the next call commits it."""
    path, aside = tmp_path / "orders.db", tmp_path / "aside.db"
    async with sqlite_here_or_in_a_store_process(path, in_a_store_process) as store:
        order = await begun(store)
        store.finish_soon("k-1", order.attempt_id, 200, b'{"status":"ok"}', None)
        path.rename(aside)  # an outage: every commit fails
        with pytest.raises(StoreUnavailable) as failed:
            await store.renew_lease("w-1", 5)  # carries the finish
        aside.rename(path)

        stored = await store.get("k-1")

        assert stored is not None
        assert (stored.state, stored.http_status, stored.reply) == (
            FINISHED, 200, b'{"status":"ok"}'
        )  # fmt: skip
        held = f"1 record(s) not stored yet, held for the next commit: {failed.value}"
        assert held in caplog.messages  # the outage's own words, in a store process too


@pytest.mark.parametrize("in_a_store_process", [False, True])
async def test_step_records_whose_commit_failed_ride_on_the_next_call(
    tmp_path: Path, in_a_store_process: bool
) -> None:
    """Step records whose batch fails for an outage are held again, as a final record is, and
    written before the records queued since (dropped, `GET` of a running order and the
    listing of a failed one lacked what its steps and compensations did)."""
    path, aside = tmp_path / "orders.db", tmp_path / "aside.db"
    async with sqlite_here_or_in_a_store_process(path, in_a_store_process) as store:
        order = await begun(store)
        store.record_step("k-1", order.attempt_id, StepRecord("payment", "ok", None, 5))
        store.record_step("k-1", order.attempt_id, StepRecord("vendor", "ok", None, 7))
        path.rename(aside)  # an outage: every commit fails
        with pytest.raises(StoreUnavailable):
            await store.renew_lease("w-1", 5)  # carries the step records
        aside.rename(path)
        undone = StepRecord("payment", "ok", None, 5, "ok", 3)
        store.record_step("k-1", order.attempt_id, undone)

        stored = await store.get("k-1")

        assert stored is not None
        assert stored.steps == (undone, StepRecord("vendor", "ok", None, 7))


@pytest.mark.parametrize("in_a_store_process", [False, True])
async def test_step_records_held_again_hold_back_no_other_order_s(
    tmp_path: Path, in_a_store_process: bool
) -> None:
    """One order's step records held after an outage, another order's recorded since: the next
    commit writes both (the other's go with an operation of their own, not the held one's)."""
    path, aside = tmp_path / "orders.db", tmp_path / "aside.db"
    async with sqlite_here_or_in_a_store_process(path, in_a_store_process) as store:
        first, second = await begun(store, "k-1"), await begun(store, "k-2")
        store.record_step("k-1", first.attempt_id, StepRecord("payment", "ok", None, 5))
        path.rename(aside)  # an outage: every commit fails
        with pytest.raises(StoreUnavailable):
            await store.renew_lease("w-1", 5)  # carries the step record
        aside.rename(path)
        store.record_step("k-2", second.attempt_id, StepRecord("vendor", "ok", None, 7))

        stored = [await store.get(key) for key in ("k-1", "k-2")]

    assert [order.steps if order else None for order in stored] == [
        (StepRecord("payment", "ok", None, 5),),
        (StepRecord("vendor", "ok", None, 7),),
    ]


@pytest.mark.parametrize("in_a_store_process", [False, True])
async def test_the_log_counts_the_step_records_held_and_lost_not_their_operations(
    tmp_path: Path, in_a_store_process: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Records of an attempt whose records are held join the held operation, leaving the one
    queued for them with none: the lines count records, and an operation with none is neither
    held nor lost (a store closed in an outage logged `0 step record(s) written together not
    stored` at error, once per such operation, beside the lines of the records lost)."""
    path, aside = tmp_path / "orders.db", tmp_path / "aside.db"
    async with sqlite_here_or_in_a_store_process(path, in_a_store_process) as store:
        order = await begun(store)
        store.record_step("k-1", order.attempt_id, StepRecord("payment", "ok", None, 5))
        path.rename(aside)  # an outage: every commit fails
        with pytest.raises(StoreUnavailable):
            await store.renew_lease("w-1", 5)  # carries the payment's record: held
        store.record_step("k-1", order.attempt_id, StepRecord("vendor", "ok", None, 7))
        store.record_step("k-1", order.attempt_id, StepRecord("courier", "ok", None, 3))
        with pytest.raises(StoreUnavailable):
            await store.renew_lease("w-1", 5)  # the vendor's and courier's join the payment's
    # The store closed while the outage lasts: what it holds is tried once more, and lost.
    held = [m.split(":")[0] for m in caplog.messages if "held for the next commit" in m]
    lost = [m.split(":")[0] for m in caplog.messages if "not stored: " in m]
    assert held[-1] == "3 record(s) not stored yet, held for the next commit"
    assert lost == ["3 step record(s) written together not stored"]


def said_and_unsaid(messages: list[str], line: str) -> tuple[int, int]:
    """How many of `messages` are `line`, and how many like it they say went unsaid."""
    said = [m for m in messages if line in m]
    unsaid = [re.search(r"\(and (\d+) more like it since the last such line\)", m) for m in said]
    return len(said), sum(int(found.group(1)) for found in unsaid if found)


@pytest.mark.parametrize("in_a_store_process", [False, True])
async def test_an_outage_s_failed_batches_are_a_line_a_second_that_counts_them_all(
    tmp_path: Path, in_a_store_process: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Each batch an outage fails holds the records it carried, and logged a line saying so:
    at 30 orders/s, 30 lines a second of the same words. Now the first is said at once, then
    one a second at most, the latest, with how many like it went unsaid; the store's close
    says those left unsaid, so that the lines still count every batch."""
    path, aside = tmp_path / "orders.db", tmp_path / "aside.db"
    batches = 40
    async with sqlite_here_or_in_a_store_process(path, in_a_store_process) as store:
        order = await begun(store)
        store.finish_soon("k-1", order.attempt_id, 200, b'{"status":"ok"}', None)
        path.rename(aside)  # an outage: every commit fails, the final record is held
        began = time.monotonic()
        for _ in range(batches):
            with pytest.raises(StoreUnavailable):
                await store.renew_lease("w-1", 5)  # carries the held record: held again
        took = time.monotonic() - began
    said, unsaid = said_and_unsaid(caplog.messages, "held for the next commit")
    assert said <= 2 + took  # the first, one a second, the one the close says
    assert said + unsaid == batches


@pytest.mark.parametrize("in_a_store_process", [False, True])
async def test_an_outage_that_ends_as_the_store_closes_says_its_end(
    tmp_path: Path, in_a_store_process: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Records held through an outage and stored by the close's own batch (or by one less
    than a second after the last line, its end not yet due) had no end line: the store
    closed with `held for the next commit` as the outage's last word, as if they were never
    stored. The close says the end it held back."""
    path, aside = tmp_path / "orders.db", tmp_path / "aside.db"
    async with sqlite_here_or_in_a_store_process(path, in_a_store_process) as store:
        order = await begun(store)
        store.finish_soon("k-1", order.attempt_id, 200, b'{"status":"ok"}', None)
        path.rename(aside)  # an outage: every commit fails, the final record is held
        for _ in range(3):
            with pytest.raises(StoreUnavailable):
                await store.renew_lease("w-1", 5)
        aside.rename(path)  # back: the close's batch stores the record held
    with closing(sqlite3.connect(path)) as db:
        [(state,)] = db.execute("SELECT state FROM orders WHERE key = 'k-1'").fetchall()
    assert state == FINISHED
    said, unsaid = said_and_unsaid(caplog.messages, "held for the next commit")
    assert said + unsaid == 3
    held = [m for m in caplog.messages if "held" in m]
    assert held[-1] == "held records stored, after 3 batch(es) that could not store them"


async def test_the_end_of_an_outage_is_a_line_after_the_one_it_left_unsaid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    """Once the held records are stored, the log says so (and the line left unsaid before
    it), once a line is due: an outage that comes and goes is still a line a second."""
    path, aside = tmp_path / "orders.db", tmp_path / "aside.db"
    async with SqliteStore(path, busy_timeout=0.2) as store:
        order = await begun(store)
        store.finish_soon("k-1", order.attempt_id, 200, b'{"status":"ok"}', None)
        path.rename(aside)  # an outage: every commit fails, the final record is held
        for _ in range(3):
            with pytest.raises(StoreUnavailable) as failed:
                await store.renew_lease("w-1", 5)
        aside.rename(path)
        await store.renew_lease("w-1", 5)  # stores it: too soon after the first line to say
        await trio.sleep(1)
        await store.renew_lease("w-1", 5)
        stored = await store.get("k-1")

    assert stored is not None
    assert stored.state == FINISHED
    held = f"1 record(s) not stored yet, held for the next commit: {failed.value}"
    assert [m for m in caplog.messages if "held" in m] == [
        held,
        f"{held} (and 1 more like it since the last such line)",
        "held records stored, after 3 batch(es) that could not store them",
    ]


async def test_the_end_of_an_outage_is_said_when_new_records_ride_with_the_held_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The batch that stores the records held through an outage carries records nobody waits
    for that were never held (another order's, queued since, behind them): the log says the
    outage's end all the same, whichever of its records comes last."""
    path, aside = tmp_path / "orders.db", tmp_path / "aside.db"
    async with SqliteStore(path, busy_timeout=0.2) as store:
        first, second = await begun(store, "k-1"), await begun(store, "k-2")
        store.finish_soon("k-1", first.attempt_id, 200, b'{"status":"ok"}', None)
        path.rename(aside)  # an outage: every commit fails, the final record is held
        with pytest.raises(StoreUnavailable):
            await store.renew_lease("w-1", 5)
        aside.rename(path)
        store.record_step("k-2", second.attempt_id, StepRecord("payment", "ok", None, 5))
        await store.renew_lease("w-1", 5)  # the held finish, then k-2's record, both stored
        stored = [await store.get(key) for key in ("k-1", "k-2")]

    assert [(order.state, order.steps) if order else None for order in stored] == [
        (FINISHED, ()),
        (RUNNING, (StepRecord("payment", "ok", None, 5),)),
    ]
    held = [m for m in caplog.messages if "held" in m]
    assert held[-1] == "held records stored, after 1 batch(es) that could not store them"


async def test_held_records_lost_are_never_said_stored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A record held after an outage that then fails on its own is lost, with a line; the
    records committed beside it were never held, and the log may not say `held records
    stored` for them (the outage's end, read as the lost record stored)."""
    tries = 0

    def fails_for_an_outage_then_on_its_own(conn: sqlite3.Connection) -> None:
        nonlocal tries
        tries += 1
        if tries == 1:
            conn.execute("ROLLBACK")  # as SQLite does on an I/O error
            raise sqlite3.OperationalError("disk I/O error (simulated)")
        raise ValueError("refused")

    async with SqliteStore(tmp_path / "orders.db") as store:
        order = await begun(store)
        store._put(fails_for_an_outage_then_on_its_own, None, kept=True)
        with pytest.raises(StoreUnavailable) as failed:
            await store.renew_lease("w-1", 5)  # carries it: held
        store.finish_soon("k-1", order.attempt_id, 200, b"{}", None)
        stored = await store.get("k-1")  # tried again, it fails alone; the finish commits

    assert tries == 2
    assert stored is not None
    assert stored.state == FINISHED
    assert [m for m in caplog.messages if "held" in m or "not stored" in m] == [
        f"1 record(s) not stored yet, held for the next commit: {failed.value}",
        "a queued record not stored: refused",
    ]


async def test_an_outage_s_lines_are_timed_on_the_store_s_trio_clock(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    """The held line of a store in a Trio run is timed on that run's clock (as the rest of
    the server is): on the virtual clock, batches failing a second apart are a line each,
    none left unsaid, however little real time passed."""
    path, aside = tmp_path / "orders.db", tmp_path / "aside.db"
    async with SqliteStore(path, busy_timeout=0.2) as store:
        order = await begun(store)
        store.finish_soon("k-1", order.attempt_id, 200, b'{"status":"ok"}', None)
        path.rename(aside)  # an outage: every commit fails, the final record is held
        for _ in range(3):
            with pytest.raises(StoreUnavailable) as failed:
                await store.renew_lease("w-1", 5)
            await trio.sleep(1)
        aside.rename(path)  # back: the close's batch stores the record, a second later

    held = f"1 record(s) not stored yet, held for the next commit: {failed.value}"
    assert [m for m in caplog.messages if "held" in m] == [
        held,
        held,
        held,
        "held records stored, after 3 batch(es) that could not store them",
    ]


async def test_step_records_held_from_two_batches_in_a_row_keep_their_order(
    tmp_path: Path,
) -> None:
    """The writer thread runs a batch handed over while the one before it failed before Trio
    holds that one's step records again: records held from two batches in a row are written
    in the order they were recorded, the later record of a step last (the earlier batch's,
    held again in front of the later's, overwrote a compensation with the step it undid)."""
    path, aside = tmp_path / "orders.db", tmp_path / "aside.db"

    async def fails() -> None:
        with pytest.raises(StoreUnavailable):
            await store.renew_lease("w-1", 5)

    async with SqliteStore(path, busy_timeout=30) as store:
        order = await begun(store)
        with closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")  # the first batch waits for the lock
            async with trio.open_nursery() as nursery:
                store.record_step("k-1", order.attempt_id, StepRecord("payment", "ok", None, 5))
                nursery.start_soon(fails)

                async def first_taken() -> bool:  # its step records taken, the batch waiting
                    return not store._steps._queued

                await wait_for(first_taken, "the writer to take the first batch")
                undone = StepRecord("payment", "ok", None, 5, "ok", 3)
                store.record_step("k-1", order.attempt_id, undone)
                nursery.start_soon(fails)  # the second batch, handed over behind the first
                await trio.testing.wait_all_tasks_blocked()
                path.rename(aside)  # an outage: the first batch fails, then the second
            aside.rename(path)
            other.execute("ROLLBACK")

        stored = await store.get("k-1")

    assert stored is not None
    assert stored.steps == (undone,)


async def claimed_back_behind_an_outage(first: SqliteStore, path: Path) -> StoredOrder:
    """w-1's claim back of its order, handed over behind the batch that carries its queued
    records (its lease renewal's), which meets an outage (another connection holds the
    write lock) and fails; the outage ends while the claim waits for the lock. The order
    as claimed back."""
    with closing(sqlite3.connect(path, isolation_level=None)) as other:

        async def renew_in_an_outage() -> None:
            with pytest.raises(StoreUnavailable):
                await first.renew_lease("w-1", 5)  # carries w-1's records: held again
            other.execute("ROLLBACK")  # the outage ends while the claim waits for the lock

        async def first_taken() -> bool:  # its step records taken, the batch waiting
            return not first._steps._queued

        other.execute("BEGIN IMMEDIATE")  # w-1's outage: its batch waits for the lock
        async with trio.open_nursery() as nursery:
            nursery.start_soon(renew_in_an_outage)
            await wait_for(first_taken, "the writer to take the failing batch")
            (back,) = await first.claim_interrupted("w-1", 10)  # the batch behind it
    return back


async def test_step_records_held_while_an_order_was_taken_over_take_no_undo_back(
    tmp_path: Path,
) -> None:
    """Two processes on one file. w-1's lease lapsed; w-2 claimed its order, recorded its
    payment refunded and died. w-1's record of the payment, held after an outage, landed once
    w-1 had claimed the order back: its claim ran in a batch of its own, handed over behind
    the failed one before Trio held that one's records again, so they committed after it,
    under w-1's name the order's owner's again, and took the refund back (the payment read as
    not undone). The writer thread now runs the held record ahead of the claim, dropped (the
    order w-2's then), so this passes without `takes_undo_back` too; the record may not take
    the refund back either way."""
    path = tmp_path / "orders.db"
    async with SqliteStore(path, busy_timeout=1.0) as first, SqliteStore(path) as second:
        order = await begun(first, owner="w-1")  # w-1 holds no lease: its lease lapsed
        await second.claim_interrupted("w-2", 10)
        refunded = StepRecord("payment", "ok", None, 5, "ok", 3)
        second.record_step("k-1", order.attempt_id, refunded, owner="w-2")
        await second.aclose()  # w-2 dies (it never held a lease either)
        ran = StepRecord("payment", "ok", None, 5)
        first.record_step("k-1", order.attempt_id, ran, owner="w-1")
        back = await claimed_back_behind_an_outage(first, path)
        stored = await first.get("k-1")  # commits the held record

    assert back.steps == (refunded,)
    assert stored is not None
    assert (stored.owner, stored.steps) == ("w-1", (refunded,))


async def test_a_final_record_held_while_an_order_was_taken_over_does_not_land_after_a_claim_back(
    tmp_path: Path,
) -> None:
    """As `test_step_records_held_while_an_order_was_taken_over_take_no_undo_back`, for
    w-1's final record: its run ended ok in the outage (answered 503); w-2 claimed the order,
    refunded its payment and died. w-1's claim back, handed over while the batch holding that
    `ok` failed, must run behind it, not ahead: the writer thread holds a failed batch's
    records itself (held by Trio, they came after the claim, and the `ok` landed under w-1's
    name again: the order ended ok with its payment refunded, and a retry replayed it)."""
    path = tmp_path / "orders.db"
    async with SqliteStore(path, busy_timeout=1.0) as first, SqliteStore(path) as second:
        order = await begun(first, owner="w-1")  # w-1 holds no lease: its lease lapsed
        await second.claim_interrupted("w-2", 10)
        await second.refund(order.attempt_id, "k-1")
        refunded = StepRecord("payment", "ok", None, 5, "ok", 3)
        second.record_step("k-1", order.attempt_id, refunded, owner="w-2")
        await second.aclose()  # w-2 dies (it never held a lease either)
        ran = StepRecord("payment", "ok", None, 5)
        first.record_step("k-1", order.attempt_id, ran, owner="w-1")
        reply = b'{"status":"ok"}'
        first.finish_soon("k-1", order.attempt_id, 200, reply, None, owner="w-1")
        back = await claimed_back_behind_an_outage(first, path)
        stored = await first.get("k-1")  # commits what is held

    assert back.state == RUNNING
    assert stored is not None
    assert (stored.state, stored.owner) == (RUNNING, "w-1")  # left to w-1's recovery


async def test_a_batch_that_raises_unexpectedly_fails_its_callers_instead_of_hanging(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in a backend's batch (an exception out of `_run_batch`) is StoreUnavailable for
    every caller of that batch; the next batch runs as usual."""

    class Broken(SqliteStore):
        broken = True

        def _run_batch(self, ops: list[Op[sqlite3.Connection, Any]]) -> None:
            if self.broken:
                self.broken = False
                raise RuntimeError("a bug")
            super()._run_batch(ops)

    async with Broken(tmp_path / "orders.db") as store:
        with trio.fail_after(10), pytest.raises(StoreUnavailable, match="a bug"):
            await store.get("k-1")
        assert await store.get("k-1") is None
    assert f"{store.where}: a batch failed unexpectedly" in caplog.messages


async def test_a_final_record_that_meets_a_backend_s_bug_is_not_held_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A record whose batch fails for a backend's bug (not an outage) is logged as lost, not
    held again: held, it would fail every batch it rode on."""

    class Broken(SqliteStore):
        def _run_batch(self, ops: list[Op[sqlite3.Connection, Any]]) -> None:
            if any(op.kept for op in ops):
                raise RuntimeError("a bug")
            super()._run_batch(ops)

    async with Broken(tmp_path / "orders.db") as store:
        order = await begun(store)
        store.finish_soon("k-1", order.attempt_id, 200, b"{}", None)
        with trio.fail_after(10), pytest.raises(StoreUnavailable, match="a bug"):
            await store.get("k-1")
        stored = await store.get("k-1")
    assert stored is not None
    assert stored.state == RUNNING
    assert "a queued record not stored: " in caplog.text


async def test_a_record_failing_on_its_own_is_logged_lost_not_held_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A kept record whose operation fails for an error of its own (not an outage) is lost with
    a line in the log, not held again: held, it would fail again in every batch it rode on."""

    def refused(conn: sqlite3.Connection) -> None:
        raise ValueError("refused")

    async with SqliteStore(tmp_path / "orders.db") as store:
        store._put(refused, None, kept=True)
        assert await store.get("k-1") is None  # carries it; the rest of the batch commits
        riding = list(store._riding)
    assert riding == []
    assert "a queued record not stored: refused" in caplog.messages
    assert "held for the next commit" not in caplog.text


async def test_records_committed_are_not_held_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A final record and step records that committed are done with: nothing is held for the
    next commit (held, they would be written again with every batch)."""
    async with SqliteStore(tmp_path / "orders.db") as store:
        order = await begun(store)
        store.record_step("k-1", order.attempt_id, StepRecord("payment", "ok", None, 5))
        store.finish_soon("k-1", order.attempt_id, 200, b"{}", None)
        stored = await store.get("k-1")
        riding = list(store._riding)
    assert stored is not None
    assert (stored.state, stored.steps) == (FINISHED, (StepRecord("payment", "ok", None, 5),))
    assert riding == []
    assert "held for the next commit" not in caplog.text


async def test_step_records_recorded_between_two_calls_ride_as_one_operation(
    tmp_path: Path,
) -> None:
    """Step records recorded before a call hands what is held to the writer thread are queued
    as one operation (one statement in the batch), not one each."""
    async with SqliteStore(tmp_path / "orders.db") as store:
        order = await begun(store)
        for step in ("payment", "vendor", "courier"):
            store.record_step("k-1", order.attempt_id, StepRecord(step, "ok", None, 1))
        queued = len(store._riding)
        stored = await store.get("k-1")
    assert queued == 1
    assert stored is not None
    assert [record.step for record in stored.steps] == ["payment", "vendor", "courier"]


async def test_a_record_whose_batch_fails_once_the_close_began_is_logged_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A final record whose batch fails for an outage after the store's close began is held for
    the close's own batch (no call will carry it, that batch will), which fails too (the
    outage goes on): it is logged as not stored, once."""
    path, aside = tmp_path / "orders.db", tmp_path / "aside.db"

    async def fails() -> None:
        with pytest.raises(StoreUnavailable):
            await store.renew_lease("w-1", 5)

    async def taken() -> bool:  # the batch taken, waiting for the lock
        return store._queue.empty()

    async with SqliteStore(path, busy_timeout=30) as store:
        order = await begun(store)
        with closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")
            async with trio.open_nursery() as nursery:
                store.finish_soon("k-1", order.attempt_id, 200, b"{}", None)
                nursery.start_soon(fails)  # carries the finish
                await trio.testing.wait_all_tasks_blocked()
                await wait_for(taken, "the writer to take the batch")
                nursery.start_soon(store.aclose)
                await trio.testing.wait_all_tasks_blocked()  # closing: waits for the thread
                path.rename(aside)  # an outage: the batch fails
            aside.rename(path)
            other.execute("ROLLBACK")
    assert caplog.text.count("a queued record not stored: ") == 1
    assert caplog.text.count("held for the next commit") == 1  # before it, for the close's batch
    async with SqliteStore(path) as store:
        stored = await store.get("k-1")
    assert stored is not None
    assert stored.state == RUNNING


@pytest.mark.parametrize("store_url", SQL_BACKEND_PARAMS, indirect=True)
async def test_replies_not_read_back_are_read_from_the_database(store: OrderStore) -> None:
    """More finished orders than an SQL store keeps replies of, none read back at once: each
    finished_reply is still the order's own (the first ones read from the database)."""
    orders = []
    async with trio.open_nursery() as nursery:

        async def one(i: int) -> None:
            orders.append(await begun(store, f"k-{i}"))

        for i in range(1010):
            nursery.start_soon(one, i)
    for order in orders:
        store.finish_soon(order.key, order.attempt_id, 200, order.key.encode(), None)
    await store.get("k-0")  # after the finishes' commit
    assert len(store._replies) == 1000  # type: ignore[attr-defined]  # bounded, in both
    for order in orders:
        replied = await store.finished_reply(order.key, order.attempt_id)
        assert replied == FinishedReply(200, order.key.encode(), None)


async def test_a_reply_finish_soon_wrote_is_read_back_without_a_statement(
    tmp_path: Path,
) -> None:
    """finished_reply answers from what finish_soon wrote, whether it rides in the same batch
    (as the desk reads back every reply it sends) or was committed by one before, without
    reading the database: a read each would cost every order a statement in the writer
    thread."""
    statements: list[str] = []
    async with SqliteStore(tmp_path / "orders.db") as store:
        first, second = await begun(store, "k-1"), await begun(store, "k-2")
        store.finish_soon("k-2", second.attempt_id, 200, b"2", None)
        await store.renew_lease("w-1", 5)  # commits k-2's finish
        await store._call(lambda conn: conn.set_trace_callback(statements.append))
        store.finish_soon("k-1", first.attempt_id, 200, b"1", None)
        replies = [
            await store.finished_reply("k-1", first.attempt_id),  # in the same batch
            await store.finished_reply("k-2", second.attempt_id),  # committed before
        ]
        await store._call(lambda conn: conn.set_trace_callback(None))

    assert replies == [FinishedReply(200, b"1", None), FinishedReply(200, b"2", None)]
    assert any(s.startswith("UPDATE orders") for s in statements)  # k-1's finish, traced
    assert [s for s in statements if s.startswith("SELECT")] == []


@pytest.mark.parametrize(
    ("code", "busy"),
    [(5, True), (261, True), (517, True), (773, True), (6, False), (1, False), (None, False)],
    ids=["BUSY", "BUSY_RECOVERY", "BUSY_SNAPSHOT", "BUSY_TIMEOUT", "LOCKED", "ERROR", "none"],
)
def test_another_process_s_lock_is_told_by_its_primary_code(code: int | None, busy: bool) -> None:
    """sqlite3 gives the extended code (SQLITE_BUSY_RECOVERY while another process recovers
    the WAL after a crash): every SQLITE_BUSY is waited for, nothing else, and an error
    SQLite did not raise (no code) is not taken for one."""
    error = sqlite3.OperationalError("database is locked")
    if code is not None:
        error.sqlite_errorcode = code  # as sqlite3 sets it
    assert _is_busy(error) is busy


async def test_concurrent_finishes_share_commits(tmp_path: Path) -> None:
    """20 orders finishing at once are committed in fewer than 20 transactions (group commit)."""
    async with SqliteStore(tmp_path / "orders.db") as store:
        orders = [await begun(store, f"k-{i}") for i in range(20)]
        before = store.commits
        async with trio.open_nursery() as nursery:
            for order in orders:
                nursery.start_soon(store.finish, order.key, order.attempt_id, 200, b"{}", None)
        assert store.commits - before < 20
        assert all(o.state == FINISHED for o, _ in await store.list_orders())


async def thousand_orders_flow_through(store: SqliteStore | PostgresStore) -> None:
    """A thousand concurrent orders (begin, three steps, finish) all land, in batched commits."""

    async def run(key: str) -> None:
        order = await begun(store, key)
        for step in ("payment", "vendor", "courier"):
            store.record_step(key, order.attempt_id, StepRecord(step, "ok", duration_ms=1))
        await store.finish(key, order.attempt_id, 200, b"{}", None)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(1000):
            nursery.start_soon(run, f"k-{i}")
    elapsed = time.perf_counter() - started
    print(f"{1000 / elapsed:.0f} orders/s in {store.commits} commits")  # -s shows it
    listed = await store.list_orders()
    assert len(listed) == 1000
    assert all(o.state == FINISHED and len(o.steps) == 3 for o, _ in listed)
    assert store.commits < 1000


async def test_many_orders_flow_through_the_writer(tmp_path: Path) -> None:
    """A thousand concurrent orders (begin, three steps, finish) all land, in batched commits."""
    async with SqliteStore(tmp_path / "orders.db") as store:
        await thousand_orders_flow_through(store)


async def test_a_closed_store_refuses_work(tmp_path: Path) -> None:
    """After close, calls raise StoreUnavailable instead of hanging on a stopped thread."""
    async with SqliteStore(tmp_path / "orders.db") as store:
        pass
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.get("k-1")
    for step in ("payment", "vendor"):  # each of them, not the first only
        with pytest.raises(StoreUnavailable, match="closed"):
            store.record_step("k-1", "a", StepRecord(step, "ok"))


async def test_a_store_not_yet_opened_refuses_work(tmp_path: Path) -> None:
    """Before `async with` opens it, a store refuses every call as a closed one does, rather
    than queue work for a writer thread that does not run yet (a call that waits for it
    would wait for ever); closing it is nothing to do."""
    store = SqliteStore(tmp_path / "orders.db")
    with pytest.raises(StoreUnavailable, match="closed"):
        store.finish_soon("k-1", "a", 200, b"{}", None)
    with pytest.raises(StoreUnavailable, match="closed"):
        store.record_step("k-1", "a", StepRecord("payment", "ok"))
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.get("k-1")
    await store.aclose()
    assert not (tmp_path / "orders.db").exists()


async def test_a_store_whose_opening_is_cancelled_opens_and_closes_all_the_same(
    tmp_path: Path,
) -> None:
    """The writer thread opens the store whatever happens: an `async with` cancelled as it
    begins (a server stopped as it starts) waits for the open, enters, and closes the store
    on its way out. Cancelled out of the wait, it would leave the thread behind, holding the
    file open and waiting for work that no call could give it."""
    path = tmp_path / "orders.db"
    store = SqliteStore(path)
    entered = False
    with trio.CancelScope() as scope:
        scope.cancel()
        async with store:
            entered = True
            await trio.lowlevel.checkpoint()  # where the cancellation lands
    assert entered
    assert store._thread is not None
    assert not store._thread.is_alive()
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.get("k-1")


async def test_a_close_that_is_cancelled_still_waits_for_its_batch(tmp_path: Path) -> None:
    """A store's close is not cancellable: cancelled (a shutdown cut short), it still waits
    for its own batch to commit what rode on it (here a final record, behind another
    process's write lock) and for the thread to end. Cancelled out of that wait, it would
    return with the record not yet committed, and the thread still running."""
    path = tmp_path / "orders.db"
    after_the_close: list[object] = []

    async def close_cancelled() -> None:
        with trio.CancelScope() as scope:
            scope.cancel()
            await store.aclose()
        assert store._thread is not None
        after_the_close.append(store._thread.is_alive())
        with closing(sqlite3.connect(path)) as reader:
            after_the_close.extend(reader.execute("SELECT state FROM orders").fetchone())

    async with SqliteStore(path, busy_timeout=30) as store:
        order = await begun(store)
        with closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN IMMEDIATE")  # the close's batch waits for the lock
            store.finish_soon("k-1", order.attempt_id, 200, b"{}", None)  # rides on the close
            async with trio.open_nursery() as nursery:
                nursery.start_soon(close_cancelled)
                await trio.testing.wait_all_tasks_blocked()  # the close waits (or returned)
                other.execute("ROLLBACK")

    assert after_the_close == [False, FINISHED]


def _may_use_sched_batch() -> bool:
    """Whether a thread here may put itself under SCHED_BATCH (a sandbox may refuse it)."""
    allowed: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError:
            allowed.append(False)
        else:
            allowed.append(True)

    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return allowed == [True]


@pytest.mark.skipif(
    not hasattr(os, "SCHED_BATCH") or not _may_use_sched_batch(),
    reason="SCHED_BATCH is Linux's, and this process may not use it",
)
@pytest.mark.parametrize("store_url", SQL_BACKEND_PARAMS, indirect=True)
async def test_the_writer_thread_does_not_preempt_the_trio_thread(store: OrderStore) -> None:
    """An SQL store's writer thread (not the Trio thread) runs under SCHED_BATCH."""
    writer = store._thread  # type: ignore[attr-defined]  # both SQL stores'
    assert writer.native_id != threading.get_native_id()
    assert os.sched_getscheduler(writer.native_id) == os.SCHED_BATCH


async def test_the_writer_thread_is_named_after_its_store_and_holds_no_exit_back(
    tmp_path: Path,
) -> None:
    """The writer thread bears its store's name (a thread dump, py-spy, an unhandled
    exception's line say whose it is), and is a daemon: a process whose Trio run ended
    without closing its store (a crash) still exits, rather than wait for a thread that
    waits for work."""
    path = tmp_path / "orders.db"
    async with SqliteStore(path):
        (writer,) = [t for t in threading.enumerate() if t.name == f"store writer {path}"]
        assert writer.daemon


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
async def test_a_writer_thread_refused_sched_batch_says_why_and_works_the_same(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the system refuses SCHED_BATCH (a sandbox's seccomp filter: EPERM), the writer
    thread keeps its policy, says why at debug level, and the store works the same."""

    def refused(pid: int, policy: int, param: os.sched_param) -> None:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "sched_setscheduler", refused)
    caplog.set_level("DEBUG", logger="order_pipeline.store")
    async with SqliteStore(tmp_path / "orders.db") as store:
        order = await begun(store)
        assert await store.get("k-1") == order
    why = os.strerror(errno.EPERM)
    said = f"the store's writer thread keeps its scheduling policy: [Errno {errno.EPERM}] {why}"
    assert said in caplog.messages


class _CountedPuts(queue.SimpleQueue[Any]):
    """A writer's queue that counts what the Trio side hands over to its thread."""

    puts = 0

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self.puts += 1
        super().put(item, block, timeout)


@pytest.mark.parametrize("store_url", SQL_BACKEND_PARAMS, indirect=True)
async def test_records_nobody_waits_for_ride_on_the_next_call_that_waits(
    store_url: str,
) -> None:
    """Step records and finish_soon wake no writer thread for a transaction of their own:
    they go to it in one piece with the next call that waits, whose one commit carries them,
    or at the close."""
    path = parse_store_url(store_url).path
    store = SqliteStore(path) if path is not None else postgres_store(store_url)
    store._queue = counted = _CountedPuts()
    async with store:
        order = await begun(store)
        before = counted.puts
        store.record_step("k-1", order.attempt_id, StepRecord("payment", "ok", None, 5))
        store.record_step("k-1", order.attempt_id, StepRecord("vendor", "ok", None, 3))
        store.finish_soon("k-1", order.attempt_id, 200, b"{}", None)
        await trio.testing.wait_all_tasks_blocked()
        assert counted.puts == before  # nothing handed over yet
        commits = store.commits
        reply = await store.finished_reply("k-1", order.attempt_id)
        assert reply == FinishedReply(200, b"{}", None)
        assert counted.puts == before + 1  # the records, the finish and the read together
        assert store.commits == commits + 1
        stored = await store.get("k-1")
        assert stored is not None
        assert {(r.step, r.status) for r in stored.steps} == {("payment", "ok"), ("vendor", "ok")}
        store.record_step("k-1", order.attempt_id, StepRecord("courier", "ok", None, 1))
    async with open_store(store_url) as reopened:  # the close committed what it held
        stored = await reopened.get("k-1")
        assert stored is not None
        assert len(stored.steps) == 3


# -- in a store process (process.py), as a server runs a SQL store -------------------------


@pytest.mark.parametrize("store_url", SQL_BACKEND_PARAMS, indirect=True)
async def test_a_server_runs_postgresql_in_a_store_process_and_sqlite_in_its_thread(
    store_url: str,
) -> None:
    """What `open_store` opens for a server (given `on_store_process_lost`): PostgreSQL in a
    store process, SQLite in the server's own writer thread (docs/performance.md)."""
    lost: list[str] = []
    async with open_store(store_url, on_store_process_lost=lost.append) as store:
        expected = StoreProcess if store_url.startswith("postgresql") else SqliteStore
        assert type(store) is expected
        await begun(store)
    assert lost == []


async def test_a_store_process_that_dies_fails_every_call_and_says_so(tmp_path: Path) -> None:
    """Killed (say, out of memory): what waited and what comes later raise StoreUnavailable,
    instead of hanging, and the server hears of it once, through on_store_process_lost."""
    lost: list[str] = []
    url = f"sqlite:///{tmp_path / 'orders.db'}"
    async with StoreProcess(url, lost.append) as store:
        await begun(store)
        assert store._process is not None
        store._process.kill()
        with trio.fail_after(10), pytest.raises(StoreUnavailable, match="ended unexpectedly"):
            await store.get("k-1")
        with pytest.raises(StoreUnavailable, match="ended unexpectedly"):
            store.record_step("k-1", "a", StepRecord("payment", "ok"))
        assert lost == [f"the store process ended unexpectedly (exit status {-signal.SIGKILL})"]
    async with open_store(url) as reopened:  # what was committed before stays
        assert await reopened.get("k-1") is not None


async def test_a_store_process_exits_when_its_server_is_killed(tmp_path: Path) -> None:
    """The server SIGKILLed (with a log line of its store process unread): its store process
    reads the socket's end, commits what it received and exits, quietly."""
    db = tmp_path / "orders.db"
    script = f"""
import os, signal, trio
from order_pipeline.store import StepRecord, StoreProcess
async def main():
    async with StoreProcess("sqlite:///{db}", print) as store:
        order = (await store.begin("k-1", "o-1", "h", b"{{}}", "w-1")).order
        store.record_step("k-1", order.attempt_id, StepRecord("payment", "ok"))
        await store.charge("c-1", "k-1", 5)  # carries the record
        print(store._process.pid, flush=True)
        store._hold("record_step", "too few arguments")  # a log line comes back, unread
        store._send(store._frame_held())
        os.kill(os.getpid(), signal.SIGKILL)
trio.run(main)
"""
    with trio.fail_after(20):  # (the store process holds stderr open until it ends)
        server = await trio.run_process(
            [sys.executable, "-c", script], capture_stdout=True, capture_stderr=True, check=False
        )
    assert server.returncode == -signal.SIGKILL
    assert b"Traceback" not in server.stderr  # the store process ended quietly too
    assert b"Logging error" not in server.stderr
    store_process = int(server.stdout)
    with trio.fail_after(10):
        while _alive(store_process):  # noqa: ASYNC110 # poll: another process's end
            await trio.sleep(0.01)
    async with open_store(f"sqlite:///{db}") as store:
        order = await store.get("k-1")
        assert order is not None
        assert [(r.step, r.status) for r in order.steps] == [("payment", "ok")]
        assert await store.net_charge("k-1") == 5


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead and not yet reaped by whoever adopted it, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def test_a_store_process_s_log_lines_are_the_server_s(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What the store process logs (here: a record it could not store) is logged by the
    server, as its own logger's record, with the store process's pid."""
    lost: list[str] = []
    async with StoreProcess(f"sqlite:///{tmp_path / 'orders.db'}", lost.append) as store:
        store._hold("record_step", "too few arguments")
        await store.get("k-1")  # sends it; its log line comes back before the answer
        assert store._process is not None
        (line,) = [r for r in caplog.records if r.name == "order_pipeline.store.process"]
        assert line.levelname == "ERROR"
        assert line.getMessage().startswith("record_step not stored: ")
        assert line.process == store._process.pid != os.getpid()
    assert lost == []


async def test_a_call_the_other_side_cannot_take_fails_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Arguments that cannot be pickled, a record that cannot be, a method called wrongly:
    that call fails (or that record is logged as not stored), and the store serves on. An
    unexpected error says where the store process raised it."""
    lost: list[str] = []
    url = f"sqlite:///{tmp_path / 'orders.db'}"
    async with StoreProcess(url, lost.append) as store:
        order = await begun(store)
        unpicklable = threading.Lock()
        store.record_step("k-1", order.attempt_id, StepRecord("payment", "ok", unpicklable))  # type: ignore[arg-type]
        store.record_step("k-1", order.attempt_id, StepRecord("vendor", "ok"))
        with pytest.raises(StoreUnavailable, match="get: its arguments cannot be pickled"):
            await store.get(unpicklable)
        with pytest.raises(TypeError, match="missing 1 required positional argument") as bug:
            await store._call("get")  # the store process's method, called wrongly
        # Its traceback stays behind; where it was raised crosses as a note.
        assert "raised in the store process at:\n" in bug.value.__notes__[0]
        assert "in _start" in bug.value.__notes__[0]
        stored = await store.get("k-1")
        assert stored is not None
        assert [r.step for r in stored.steps] == ["vendor"]
        assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
            "record_step not stored: its arguments cannot be pickled"
        ]
    assert lost == []


async def test_frames_larger_than_the_socket_takes_at_once_cross_whole(tmp_path: Path) -> None:
    """A call of 8 MB (more than a socket pair's buffer) is sent in pieces, the ones after
    it queue behind it, and every answer comes back in order."""
    lost: list[str] = []
    async with StoreProcess(f"sqlite:///{tmp_path / 'orders.db'}", lost.append) as store:
        body = b"x" * 8_000_000
        assert store._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < len(body)
        async with trio.open_nursery() as watching:
            # A frame cut short leaves both sides waiting, and a sent call is not
            # cancellable: after 30 s, end the store process, so that the calls fail.
            watching.start_soon(_kill_after, store, 30)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.begin, "big", "o-1", "hash-1", body, "w-1")
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(begun, store, "small")
            watching.cancel_scope.cancel()
        big = await store.get("big")
        assert big is not None
        assert big.body == body
        assert await store.get("small") is not None
    assert lost == []


class _Frames:
    """A store process's side of the socket pair, given the frames it reads one at a time
    (as they arrive when the server's sends are read apart); what it sends is kept."""

    def __init__(self, *reads: list[Any]) -> None:
        self._reads = list(reads)
        self.sent: list[Any] = []

    def receive(self) -> list[Any]:
        return self._reads.pop(0) if self._reads else []

    def send(self, message: Any) -> None:
        self.sent.append(message)


async def test_a_close_read_apart_from_its_held_frame_tries_a_held_record_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The close sends what is held (here nothing) and its end as two frames, which the store
    process may read apart: the first, carrying no call, runs nothing, so a final record held
    since an outage is tried once, at the end, not once more first (on an unreachable
    database, 5 s more of a drain: a server on PostgreSQL whose database was down exited 1 at
    its hard deadline, instead of 0, in one run of two)."""
    path = tmp_path / "orders.db"
    async with SqliteStore(path) as opened:
        order = await begun(opened)
    store = SqliteStore(path, busy_timeout=0.2)
    store._open_driven()
    finish: process.Call = (None, "finish_soon", ("k-1", order.attempt_id, 200, b"{}", None), {})
    with closing(sqlite3.connect(path, isolation_level=None)) as locker:
        locker.execute("BEGIN IMMEDIATE")  # an outage: every commit fails, the record is kept
        try:
            process._serve_calls(store, _Frames([[finish]], [[]], [None]), [])  # type: ignore[arg-type]
        finally:
            store._close()
    held = "1 record(s) not stored yet, held for the next commit"
    assert caplog.text.count(held) == 1
    assert caplog.text.count("a queued record not stored: ") == 1


async def test_a_close_with_records_riding_on_it_tries_a_held_record_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A final record held since an outage, and a step record riding on the close (an order
    that ended during the drain): the close tries them once, in one batch (one busy wait of
    SQLite's, 5 s), not once for the records and again at the end (10 s; every run of four)."""
    path = tmp_path / "orders.db"
    lost: list[str] = []
    async with StoreProcess(f"sqlite:///{path}", lost.append) as store:
        order = await begun(store)
        with closing(sqlite3.connect(path, isolation_level=None)) as locker:
            locker.execute("BEGIN IMMEDIATE")  # an outage: every commit fails
            store.finish_soon("k-1", order.attempt_id, 200, b"{}", None)
            with trio.fail_after(20), pytest.raises(StoreUnavailable, match="locked"):
                await store.renew_lease("w-1", 5)  # fails: the record is held again
            store.record_step("k-1", order.attempt_id, StepRecord("payment", "ok"))
            with trio.fail_after(20):
                await store.aclose()
    assert lost == []
    held = "1 record(s) not stored yet, held for the next commit"
    assert caplog.text.count(held) == 1
    assert caplog.text.count("a queued record not stored: ") == 1


async def _kill_after(store: StoreProcess, seconds: float) -> None:
    await trio.sleep(seconds)
    assert store._process is not None
    store._process.kill()


async def test_a_store_process_refuses_a_file_that_is_not_ours(tmp_path: Path) -> None:
    """Opening errors cross over as they are: one StoreError line (a server exits 2 on it)."""
    path = tmp_path / "other.db"
    path.write_bytes(b"not a database at all" * 100)
    lost: list[str] = []
    with pytest.raises(StoreError, match=r"cannot open the store: file is not a database$"):
        async with StoreProcess(f"sqlite:///{path}", lost.append):
            pass
    assert lost == []
    assert path.read_bytes() == b"not a database at all" * 100


async def test_a_store_process_that_dies_before_it_opens_fails_the_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store process that ends before it opened the store (killed by the kernel, a crash in
    a driver) fails the open with its exit status, as an error the server exits 2 on."""
    monkeypatch.setattr(process, "_CHILD", "import os; os._exit(3)  # {path} {fd}")
    lost: list[str] = []
    with (
        trio.fail_after(10),
        pytest.raises(StoreError, match=r"ended before it opened the store \(exit status 3\)$"),
    ):
        async with StoreProcess(f"sqlite:///{tmp_path / 'orders.db'}", lost.append):
            pass
    assert lost == []
    assert not (tmp_path / "orders.db").exists()


# -- PostgreSQL only ------------------------------------------------------------------------


def postgres_store(url: str, **options: Any) -> PostgresStore:
    """A PostgresStore, imported here: without psycopg the tests above still run."""
    from order_pipeline.store.postgres import PostgresStore

    return PostgresStore(url, **options)


@asynccontextmanager
async def postgres_stores(
    url: str, count: int, **options: Any
) -> AsyncIterator[list[PostgresStore]]:
    """`count` stores on `url` (as on so many hosts), opened at once, closed after the block."""
    stores = [postgres_store(url, **options) for _ in range(count)]
    try:
        async with trio.open_nursery() as nursery:
            for store in stores:
                nursery.start_soon(store.__aenter__)
        yield stores
    finally:
        for store in stores:
            await store.aclose()


async def sql(query: str, *args: Any, schema: str | None = None) -> list[tuple[Any, ...]]:
    """Run one statement (in `schema`) on a connection of the test's own, in a thread."""

    def run() -> list[tuple[Any, ...]]:
        with admin() as conn:
            if schema is not None:
                conn.execute(f"SET search_path TO {schema}")
            cursor = conn.execute(query, args)
            return cursor.fetchall() if cursor.description else []

    return await trio.to_thread.run_sync(run)


async def backends(application: str, *, waiting: bool = False) -> list[int]:
    """The pids of the server processes serving `application` (only those waiting on a lock)."""
    rows = await sql(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
        " AND (NOT %s OR wait_event_type = 'Lock')",
        application,
        waiting,
    )
    return [pid for (pid,) in rows]


async def wait_for(condition: Callable[[], Awaitable[object]], what: str) -> None:
    """Poll `condition` until it holds; fail, saying `what`, after 10 s."""
    with trio.move_on_after(10.0):
        while not await condition():  # noqa: ASYNC110  # the server's state: no Event tells it
            await trio.sleep(0.02)
        return
    pytest.fail(f"gave up waiting for {what}")


async def terminate(application: str) -> list[int]:
    """End the server processes serving `application` (their connections are lost)."""
    pids = await backends(application)
    for pid in pids:
        await sql("SELECT pg_terminate_backend(%s)", pid)

    async def gone() -> bool:
        return not set(pids) & set(await backends(application))

    await wait_for(gone, f"backends {pids} to end")
    return pids


def application() -> str:
    """An application_name of the test's own, to find its store's connections by."""
    return f"order-store-test-{uuid.uuid4().hex[:12]}"


async def waits_for_a_lock(app: str, relation: str, mode: str | None = None) -> bool:
    """Whether a connection named `app` waits for a lock on `relation` (of `mode`, if given)."""
    rows = await sql(
        "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid)"
        " WHERE application_name = %s AND NOT granted AND relation = %s::regclass"
        " AND mode = coalesce(%s, mode)",
        app,
        relation,
        mode,
    )
    return bool(rows[0][0])


@pytest.mark.postgres
async def test_two_hosts_begin_one_key_once(schema: str) -> None:
    """Two stores on one schema, 50 begins of one key from each at once: exactly one Begun."""
    async with postgres_stores(postgres_url(schema=schema), 2) as stores:
        results: list[Begun | Existing] = []

        async def begin(store: OrderStore, owner: str) -> None:
            results.append(await store.begin("k-1", "o-1", "hash-1", BODY, owner))

        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(begin, stores[i % 2], f"w-{i}")
        (winner,) = [r for r in results if isinstance(r, Begun)]
        assert len(results) == 100
        assert {r.order.attempt_id for r in results} == {winner.order.attempt_id}
        assert await stores[0].get("k-1") == await stores[1].get("k-1") == winner.order


@pytest.mark.postgres
async def test_two_hosts_beginning_keys_in_opposite_orders_all_get_answers(schema: str) -> None:
    """Two hosts' batches taking keys in opposite orders may deadlock; the victim runs again."""
    async with postgres_stores(postgres_url(schema=schema), 2) as (a, b):
        results: dict[str, list[Begun | Existing]] = {}

        async def begin(store: OrderStore, key: str, owner: str) -> None:
            results.setdefault(key, []).append(await store.begin(key, "o-1", "h", BODY, owner))

        keys = [f"k-{i}" for i in range(40)]
        async with trio.open_nursery() as nursery:
            for key_a, key_b in zip(keys, reversed(keys), strict=True):
                nursery.start_soon(begin, a, key_a, "a")
                nursery.start_soon(begin, b, key_b, "b")
        assert set(results) == set(keys)
        for got in results.values():
            (winner,) = [r for r in got if isinstance(r, Begun)]
            assert {r.order.attempt_id for r in got} == {winner.order.attempt_id}


@pytest.mark.postgres
async def test_two_hosts_claiming_at_once_take_disjoint_orders_covering_all(schema: str) -> None:
    """Two stores claiming a dead owner's orders at once: no order twice, none left behind."""
    async with postgres_stores(postgres_url(schema=schema), 2) as (a, b):
        keys = {f"k-{i}" for i in range(60)}
        async with trio.open_nursery() as nursery:
            for key in keys:
                nursery.start_soon(begun, a, key, "dead")
        claims: dict[str, list[StoredOrder]] = {"a": [], "b": []}

        async def claim(store: OrderStore, owner: str) -> None:
            await store.renew_lease(owner, 60.0)
            while batch := await store.claim_interrupted(owner, 7):
                claims[owner] += batch

        async with trio.open_nursery() as nursery:
            nursery.start_soon(claim, a, "a")
            nursery.start_soon(claim, b, "b")
        claimed_a, claimed_b = ([o.key for o in claims[owner]] for owner in "ab")
        assert not set(claimed_a) & set(claimed_b)
        assert sorted(claimed_a + claimed_b) == sorted(keys)
        for owner, orders in claims.items():
            for order in orders:
                stored = await b.get(order.key)
                assert stored is not None
                assert order.owner == stored.owner == owner


@pytest.mark.postgres
@pytest.mark.parametrize(
    "isolation", ["", "repeatable\\ read", "serializable"], ids=["default", "rr", "serializable"]
)
async def test_a_claim_leaves_an_order_whose_owner_s_lease_is_committed_while_it_locks(
    schema: str, isolation: str
) -> None:
    """A claim locks its candidates (SELECT ... FOR UPDATE SKIP LOCKED), then takes them by
    an UPDATE that checks each owner's lease again, in a snapshot of its own: a lease
    committed between the two (the owner's renewal; or, as `_claim` says, the lease of a
    host whose claim of the order committed while the locking statement ran, which that
    statement's snapshot does not see) keeps the order with its owner. The test holds the
    claim between its two statements with a SHARE lock on the orders table, which the
    locking SELECT's ROW SHARE passes and the UPDATE's ROW EXCLUSIVE waits for (its
    snapshot is taken once it has the lock); the owner's lease commits meanwhile. The same
    with a stricter default_transaction_isolation set for the store's role or database (here
    by the URL), where a statement's snapshot would be its transaction's."""
    app = application()
    url = with_params(postgres_url(schema=schema), application_name=app)
    if isolation:
        url = with_params(url, options=f"-cdefault_transaction_isolation={isolation}")
    async with postgres_stores(url, 1) as (claimer,), postgres_stores(url, 1) as (owner,):
        await begun(owner, "k-1", owner="w-late")  # its lease not (yet) renewed: dead
        await claimer.renew_lease("me", 60.0)
        claims: list[list[StoredOrder]] = []

        async def claim() -> None:
            claims.append(await claimer.claim_interrupted("me", 10))

        async def update_waits() -> bool:
            rows = await sql(
                "SELECT query FROM pg_stat_activity WHERE application_name = %s"
                " AND wait_event_type = 'Lock'",
                app,
            )
            return [query.split()[:2] for (query,) in rows] == [["UPDATE", "orders"]]

        async with trio.open_nursery() as nursery, table_locked(schema, "orders", "SHARE"):
            nursery.start_soon(claim)
            await wait_for(update_waits, "the claim's UPDATE to wait, k-1 locked by its SELECT")
            await owner.renew_lease("w-late", 60.0)
        assert claims == [[]]
        order = await owner.get("k-1")
        assert order is not None
        assert (order.owner, order.state) == ("w-late", RUNNING)
        # Claimable but for that lease: once it lapses, the same claim takes the order.
        await owner.release_lease("w-late")
        assert [(o.key, o.owner) for o in await claimer.claim_interrupted("me", 10)] == [
            ("k-1", "me")
        ]


@pytest.mark.postgres
async def test_no_order_is_claimed_while_leases_cannot_be_renewed(schema: str) -> None:
    """An operator's lock on the leases table that stops writes but not reads (LOCK TABLE
    leases IN EXCLUSIVE MODE; SHARE, as a CREATE INDEX takes) stops every renewal, the
    database reachable all along: a claim must not then judge owners dead by leases nobody
    could renew. It waits for that lock as a renewal does, and fails alone (recovery paused),
    so a live host's running order stays its own."""
    async with postgres_stores(postgres_url(schema=schema), 2, timeout=0.3) as (owner, claimer):
        await owner.renew_lease("w-a", 0.5)
        await begun(owner, "k-1", owner="w-a")

        async def lapsed() -> bool:
            live = await sql("SELECT count(*) FROM leases WHERE expires_at > now()", schema=schema)
            return live == [(0,)]

        async with table_locked(schema, "leases", "EXCLUSIVE"):
            with pytest.raises(StoreUnavailable, match="lock timeout") as failed:
                await owner.renew_lease("w-a", 0.5)
            # The table is locked, no row: what is known is the wait's end (a LOCK TABLE's error
            # said `a row locked by another`).
            assert "a lock wait timed out: " in str(failed.value)
            assert "row" not in str(failed.value)
            await wait_for(lapsed, "the owner's lease to lapse, unrenewable")
            with pytest.raises(StoreUnavailable, match="lock timeout"):
                await claimer.claim_interrupted("w-b", 10)
        await owner.renew_lease("w-a", 60.0)
        assert await claimer.claim_interrupted("w-b", 10) == []
        order = await owner.get("k-1")
        assert order is not None
        assert (order.owner, order.state) == ("w-a", RUNNING)


@pytest.mark.postgres
async def test_leases_and_times_are_the_database_clocks(
    monkeypatch: pytest.MonkeyPatch, schema: str
) -> None:
    """A host whose clock is an hour slow neither loses its lease, nor dates orders by it, nor
    keeps finished orders an hour longer."""
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() - 3600.0)
    async with postgres_stores(postgres_url(schema=schema), 2) as (slow, other):
        await slow.renew_lease("slow", 60.0)
        ((left,),) = await sql(
            "SELECT extract(epoch FROM expires_at - now())::float8 FROM leases", schema=schema
        )
        assert 50.0 < left <= 60.0
        order = await begun(slow, owner="slow")
        assert abs(order.started_at - real_time()) < 60.0
        assert await other.claim_interrupted("other", 10) == []  # alive, by the database
        await slow.renew_lease("slow", 0.3)
        assert await other.claim_interrupted("other", 10) == []
        await trio.sleep(0.5)  # the 0.3 s lease lapses: on the database's clock, real time
        (claimed,) = await other.claim_interrupted("other", 10)
        assert claimed.key == "k-1"
        await other.finish("k-1", claimed.attempt_id, 503, b"{}", "interrupted")
        await trio.sleep(0.3)  # k-1 ages past the 0.1 s retention, on the same clock
        assert await slow.purge(0.1, limit=10) == 1  # retention counted on the database's clock


@pytest.mark.postgres
async def test_stores_opening_one_new_schema_at_once_migrate_it_once(schema: str) -> None:
    """Four stores (as four hosts starting) on one empty schema: all open, one schema made."""
    from order_pipeline.store.postgres import SCHEMA_VERSION as POSTGRES_SCHEMA_VERSION
    from order_pipeline.store.postgres import VERSION_TABLE

    async with postgres_stores(postgres_url(schema=schema), 4) as stores:
        order = await begun(stores[0])
        assert await stores[3].get("k-1") == order
    assert await sql(f"SELECT version FROM {VERSION_TABLE}", schema=schema) == [
        (POSTGRES_SCHEMA_VERSION,)
    ]
    async with postgres_stores(postgres_url(schema=schema), 1) as (again,):
        assert await again.get("k-1") == order  # opened again: kept, not migrated again


@contextmanager
def postgres_code_of_version(version: int) -> Iterator[None]:
    """The PostgreSQL store as a program that knows schema versions up to `version` runs it."""
    from order_pipeline.store import postgres

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(postgres, "SCHEMA_VERSION", version)
        patch.setattr(postgres, "_MIGRATIONS", postgres._MIGRATIONS[:version])
        yield


async def _pg_indexes(schema: str) -> list[str]:
    rows = await sql(
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = %s"
        " AND indexname NOT LIKE '%%_pkey'",
        schema,
    )
    return sorted(name for (name,) in rows)


_PG_INDEXES = {  # each schema version's own (its tables' primary keys aside)
    1: ["ledger_key", "orders_finished_at", "orders_state_owner"],
    2: ["ledger_key", "orders_finished_at", "orders_started", "orders_state_owner"],
    3: [
        "ledger_key", "orders_attention", "orders_purgeable", "orders_started",
        "orders_state_owner", "steps_undo_failed",
    ],
}  # fmt: skip


@pytest.mark.postgres
@pytest.mark.parametrize("older", [1, 2])
async def test_an_older_schema_is_upgraded_with_its_orders(schema: str, older: int) -> None:
    """A schema made by a program of version 1 or 2, holding orders of every shape: a reader
    of this version refuses it; a store of this version upgrades it (the indexes of the
    versions since; orders_finished_at gives way to orders_purgeable), every order kept, and
    listed and purged as before; the older program then refuses it."""
    from order_pipeline.store.postgres import VERSION_TABLE

    url = postgres_url(schema=schema)
    with postgres_code_of_version(older):
        async with open_store(url) as old:
            everything, attention = await older_orders(old)
    assert await _pg_indexes(schema) == _PG_INDEXES[older]
    with pytest.raises(StoreError, match=f"version {older}, older than this program's 3"):
        async with open_store(url, reader=True):
            pass

    async with open_store(url) as store:
        await upgraded_lists_and_purges_as_before(store, everything, attention)
    assert await _pg_indexes(schema) == _PG_INDEXES[3]
    assert await sql(f"SELECT version FROM {VERSION_TABLE}", schema=schema) == [(3,)]
    async with open_store(url, reader=True) as reading:
        assert len(await reading.list_orders()) == 3
    with postgres_code_of_version(older), pytest.raises(StoreError, match="newer than this"):
        async with open_store(url):
            pass


@pytest.mark.postgres
@pytest.mark.parametrize("older", [1, 2])
async def test_stores_opening_one_older_schema_at_once_upgrade_it_once(
    schema: str, older: int
) -> None:
    """Four stores (four hosts starting) on a schema of an older version: all open and see
    every order; one upgraded it under the migration lock, the others found it done."""
    url = postgres_url(schema=schema)
    with postgres_code_of_version(older):
        async with open_store(url) as old:
            before = {o.key for o, _ in (await older_orders(old))[0]}
    async with postgres_stores(url, 4) as stores:
        for store in stores:
            assert {o.key for o, _ in await store.list_orders()} == before
    assert await _pg_indexes(schema) == _PG_INDEXES[3]


@pytest.mark.postgres
async def test_an_upgrade_that_deadlocks_with_an_older_hosts_batch_is_tried_again(
    schema: str,
) -> None:
    """Version 3's migration locks orders (an index's build), then steps (another's), then
    orders alone (the dropped index): a batch of an older host still running that wrote a
    step record, and then writes orders, waits for the migration while the migration waits
    for it. PostgreSQL ends the one that waited first, here the migration: the new host
    must try it again (the batch meanwhile commits), not fail to start (it exited 2 with
    "deadlock detected")."""
    url = postgres_url(schema=schema)
    with postgres_code_of_version(2):
        async with open_store(url) as old:
            order = await begun(old, "k-1")
    app = application()
    batch = await trio.to_thread.run_sync(admin)  # the older host's
    try:

        async def run(statement: str) -> None:
            await trio.to_thread.run_sync(batch.execute, statement)

        async def upgrade() -> None:
            async with open_store(with_params(url, application_name=app)):
                pass

        async def migration_waits_for_steps() -> bool:
            return await waits_for_a_lock(app, f"{schema}.steps")

        await run(f"SET search_path TO {schema}")
        # The deadlock is found, and its victim chosen, by the first of the two to wait out its
        # deadlock_timeout (1 s); the batch begins to wait 10 to 25 ms after the migration, a
        # margin a busy machine's scheduling can undo. The batch looks last, whatever the timing.
        await run("SET deadlock_timeout = '10s'")
        await run("BEGIN")
        await run(
            "INSERT INTO steps (attempt_id, step, status, duration_ms)"
            f" VALUES ('{order.attempt_id}', 'payment', 'ok', 3)"
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upgrade)
            await wait_for(migration_waits_for_steps, "the migration to wait for the step record")
            await run("UPDATE orders SET kind = 'payment_declined' WHERE key = 'k-1'")
            await run("COMMIT")
    finally:
        await trio.to_thread.run_sync(batch.close)
    assert await _pg_indexes(schema) == _PG_INDEXES[3]
    async with open_store(url, reader=True) as reading:
        assert [(o.key, o.kind) for o, _ in await reading.list_orders()] == [
            ("k-1", "payment_declined")
        ]


@pytest.mark.postgres
async def test_an_upgrade_leaves_the_old_index_rather_than_stall_orders_behind_a_reader(
    schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A transaction that read orders and stays open (a pg_dump's, for as long as the dump
    runs): dropping orders_finished_at takes the table's exclusive lock, which waits for it
    while every statement on orders waits behind the drop. The upgrade waits at most
    LOCK_WAIT_S for that lock, then leaves the index (a warning says to drop it), and a
    read queued behind the drop is answered. Before, every statement on orders waited
    through the migration's lock wait (60 s: an older host's reads and writes failed 503
    all along), and then the host failed to start."""
    from order_pipeline.store.postgres import VERSION_TABLE

    url = postgres_url(schema=schema)
    with postgres_code_of_version(2):
        async with open_store(url) as old:
            await begun(old, "k-1")
    app = application()
    dump = await trio.to_thread.run_sync(admin)
    try:

        async def run(statement: str) -> None:
            await trio.to_thread.run_sync(dump.execute, statement)

        async def upgrade() -> None:
            async with open_store(with_params(url, application_name=app)):
                pass

        async def drop_waits() -> bool:
            return await waits_for_a_lock(app, f"{schema}.orders", "AccessExclusiveLock")

        await run(f"SET search_path TO {schema}")
        await run("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await run("SELECT count(*) FROM orders")
        with trio.fail_after(30):  # the migration's own lock wait is 60 s
            async with trio.open_nursery() as nursery:
                nursery.start_soon(upgrade)
                await wait_for(drop_waits, "the drop to wait for the orders table")
                assert await sql("SELECT key FROM orders", schema=schema) == [("k-1",)]
    finally:
        await trio.to_thread.run_sync(dump.close)
    assert await _pg_indexes(schema) == sorted([*_PG_INDEXES[3], "orders_finished_at"])
    assert await sql(f"SELECT version FROM {VERSION_TABLE}", schema=schema) == [(3,)]
    assert "index orders_finished_at was left in place" in caplog.text


@pytest.mark.postgres
@pytest.mark.parametrize("isolation", ["repeatable\\ read", "serializable"], ids=["rr", "ser"])
async def test_hosts_making_a_schema_at_once_under_a_stricter_isolation_make_it_once(
    schema: str, isolation: str
) -> None:
    """Two hosts open a new schema at once, their role's default_transaction_isolation
    stricter than read committed (set here by the URL): the one that waited for the other's
    migration must find it done. It read the version again in its first read's snapshot,
    from before that migration, made the tables again and failed to open (DuplicateTable:
    exit 2). Both are held at the schema's migration lock until both wait there."""
    from order_pipeline.store.postgres import VERSION_TABLE

    url = with_params(
        postgres_url(schema=schema), options=f"-cdefault_transaction_isolation={isolation}"
    )
    lock = await _schema_migration_lock(schema)
    holder = await trio.to_thread.run_sync(admin)
    stores = [postgres_store(url) for _ in range(2)]
    try:
        await trio.to_thread.run_sync(holder.execute, "SELECT pg_advisory_lock(%s)", (lock,))
        async with trio.open_nursery() as nursery:
            for store in stores:
                nursery.start_soon(store.__aenter__)
            with trio.fail_after(20):
                while await _waiting_for(lock) < len(stores):  # noqa: ASYNC110 # the database's state
                    await trio.sleep(0.05)
            await trio.to_thread.run_sync(holder.execute, "SELECT pg_advisory_unlock(%s)", (lock,))
        for store in stores:
            assert await store.get("k-none") is None  # open, and on one schema
        assert await sql(f"SELECT count(*) FROM {VERSION_TABLE}", schema=schema) == [(1,)]
    finally:
        await trio.to_thread.run_sync(holder.close)
        for store in stores:
            await store.aclose()


async def _schema_migration_lock(schema: str) -> int:
    """The advisory lock's key a migration of `schema` takes: "ordp" and the schema's oid."""
    from order_pipeline.store.postgres import SCHEMA_MIGRATION_LOCKS

    rows = await sql("SELECT oid::bigint FROM pg_namespace WHERE nspname = %s", schema)
    return int(SCHEMA_MIGRATION_LOCKS + rows[0][0])


async def _waiting_for(advisory_lock: int | None, app: str | None = None) -> int:
    """How many sessions (named `app`, if given) wait for the advisory lock (a bigint key: its
    high and low halves), or for any if it is None."""
    high, low = (None, None) if advisory_lock is None else divmod(advisory_lock, 1 << 32)
    rows = await sql(
        "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid)"
        " WHERE locktype = 'advisory' AND NOT granted"
        " AND classid::bigint = coalesce(%s, classid::bigint)"
        " AND objid::bigint = coalesce(%s, objid::bigint)"
        " AND application_name = coalesce(%s, application_name)",
        high,
        low,
        app,
    )
    return int(rows[0][0])


@pytest.mark.postgres
async def test_a_new_schema_opens_while_another_schemas_upgrade_waits(schema: str) -> None:
    """Two order stores in one database, a schema each (staging and production, say): the
    upgrade of one, its index's build waiting for a lock on its orders, does not hold up the
    first start of the other. The migration lock was one key for the whole database: the
    new schema's store waited for the other's migration, up to the lock wait (60 s), and
    failed to start."""
    other = pg.new_schema()
    other_url = postgres_url(schema=other)
    with postgres_code_of_version(2):
        async with open_store(other_url):
            pass
    upgrading, starting = application(), application()
    started = trio.Event()

    async def upgrade() -> None:
        async with open_store(with_params(other_url, application_name=upgrading)):
            pass

    async def first_start() -> None:
        async with open_store(with_params(postgres_url(schema=schema), application_name=starting)):
            started.set()

    async def upgrade_waits() -> bool:
        return await waits_for_a_lock(upgrading, f"{other}.orders")

    async def started_or_waits() -> bool:
        return started.is_set() or await _waiting_for(None, starting) > 0

    # The lock (a batch's, say) is let go first, then the nursery waits for both stores.
    async with trio.open_nursery() as nursery, table_locked(other, "orders", "ROW EXCLUSIVE"):
        nursery.start_soon(upgrade)
        await wait_for(upgrade_waits, "the upgrade's index to wait for the orders table")
        nursery.start_soon(first_start)
        await wait_for(started_or_waits, "the new schema's store to start or to wait")
        waited = not started.is_set()
    assert not waited, "the new schema's first start waited for the other schema's migration"
    assert await _pg_indexes(schema) == await _pg_indexes(other) == _PG_INDEXES[3]


@pytest.mark.postgres
@pytest.mark.parametrize("older", [1, 2])
async def test_an_upgrade_an_older_release_could_make_waits_for_its_migration_lock(
    schema: str, older: int
) -> None:
    """A rolling upgrade: a host of an older release migrates a schema (up to version 2, the
    newest it knows) under the database's one migration lock alone. A new host upgrading a
    schema of version 1 takes that lock too, so the two do not migrate it at once (each
    would build the same index); one of version 2, which no older release migrates, does
    not wait for it (another schema's migration may hold it)."""
    from order_pipeline.store.postgres import MIGRATION_LOCK

    url = postgres_url(schema=schema)
    with postgres_code_of_version(older):
        async with open_store(url):
            pass
    app = application()
    opened = trio.Event()

    async def upgrade() -> None:
        async with open_store(with_params(url, application_name=app)):
            opened.set()

    async def opened_or_waits() -> bool:
        return opened.is_set() or await _waiting_for(MIGRATION_LOCK, app) > 0

    holder = await trio.to_thread.run_sync(admin)  # the older host's migration's
    try:
        await trio.to_thread.run_sync(
            holder.execute, "SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,)
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upgrade)
            await wait_for(opened_or_waits, "the upgrade to open the store or to wait")
            waited = not opened.is_set()
            await trio.to_thread.run_sync(
                holder.execute, "SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,)
            )
    finally:
        await trio.to_thread.run_sync(holder.close)
    assert waited == (older == 1)
    assert await _pg_indexes(schema) == _PG_INDEXES[3]


@pytest.mark.postgres
async def test_a_schema_whose_version_an_older_host_set_back_is_upgraded_again(
    schema: str,
) -> None:
    """A host of an older release that read the version below 2, and waited for the
    database's migration lock while another host took the schema to 2, finds it at 2 and
    writes 2 (its UPDATE, unconditional) after a new host's upgrade to 3, which took the
    schema's own lock alone. The next start upgrades it again: version 3's indexes are made
    only if missing (it failed to start: relation "orders_attention" already exists)."""
    from order_pipeline.store.postgres import VERSION_TABLE

    url = postgres_url(schema=schema)
    async with open_store(url) as store:
        order = await begun(store, "k-1")
    await sql(f"UPDATE {VERSION_TABLE} SET version = 2", schema=schema)  # the older host's
    async with open_store(url) as store:
        assert await store.get("k-1") == order
    assert await sql(f"SELECT version FROM {VERSION_TABLE}", schema=schema) == [(3,)]
    assert await _pg_indexes(schema) == _PG_INDEXES[3]


@pytest.mark.postgres
async def test_upgrading_again_drops_no_index_of_another_schema_of_the_search_path(
    schema: str,
) -> None:
    """The same, with another store of version 2 in the next schema of the search_path
    (production, say, not yet upgraded, in public after the role's own schema). The schema's
    orders_finished_at is gone already: dropping it if it exists, by its name alone, found
    the other schema's and dropped that one."""
    from order_pipeline.store.postgres import VERSION_TABLE

    other = pg.new_schema()
    with postgres_code_of_version(2):
        async with open_store(postgres_url(schema=other)):
            pass
    async with open_store(postgres_url(schema=schema)):
        pass
    await sql(f"UPDATE {VERSION_TABLE} SET version = 2", schema=schema)  # the older host's
    async with open_store(postgres_url(schema=f"{schema},{other}")):
        pass
    assert await _pg_indexes(schema) == _PG_INDEXES[3]
    assert await _pg_indexes(other) == _PG_INDEXES[2]


async def _tables(schema: str) -> list[str]:
    rows = await sql(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = %s",
        schema,
    )
    return sorted(name for (name,) in rows)


@pytest.mark.postgres
@pytest.mark.parametrize("what", ["foreign-table", "newer-schema"])
async def test_a_schema_that_is_not_ours_is_refused_untouched(what: str, schema: str) -> None:
    """Tables of our names without our version table, or a newer version: StoreError."""
    from order_pipeline.store.postgres import SCHEMA_VERSION as POSTGRES_SCHEMA_VERSION
    from order_pipeline.store.postgres import VERSION_TABLE

    url = postgres_url(schema=schema)
    if what == "foreign-table":
        await sql("CREATE TABLE orders (id integer PRIMARY KEY)", schema=schema)
        reason = "not an order store"
    else:
        async with open_store(url):
            pass
        newer = POSTGRES_SCHEMA_VERSION + 1
        await sql(f"UPDATE {VERSION_TABLE} SET version = %s", newer, schema=schema)
        reason = "newer than this program"
    before = await _tables(schema)
    with pytest.raises(StoreError, match=reason) as raised:
        async with open_store(url):
            pass
    assert schema in str(raised.value) or "127.0.0.1" in str(raised.value)
    assert "\n" not in str(raised.value)
    assert await _tables(schema) == before
    if what == "newer-schema":
        assert await sql(f"SELECT version FROM {VERSION_TABLE}", schema=schema) == [(newer,)]


@pytest.mark.usefixtures("postgres")
@pytest.mark.postgres
async def test_a_search_path_without_a_schema_is_refused() -> None:
    """A search_path naming no existing schema leaves nowhere to create the tables."""
    url = with_params(POSTGRES_URL, options=f"-csearch_path=missing_{uuid.uuid4().hex}")
    with pytest.raises(StoreError, match="no schema of the search_path exists"):
        async with open_store(url):
            pass


def _other_credentials(url: str, what: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or 5432
    user = parts.username or "postgres"
    if what == "port":  # nothing listens on port 1
        return parts._replace(netloc=f"{user}@{host}:1").geturl()
    if what == "user":
        return parts._replace(netloc=f"no_such_role_{uuid.uuid4().hex[:8]}@{host}:{port}").geturl()
    assert what == "database"
    return parts._replace(path=f"/no_such_database_{uuid.uuid4().hex[:8]}").geturl()


@pytest.mark.usefixtures("postgres")
@pytest.mark.postgres
@pytest.mark.parametrize("what", ["port", "user", "database"])
async def test_an_unreachable_or_refusing_server_is_a_store_error(what: str) -> None:
    """No server on the port, an unknown role or database: a one-line StoreError naming the
    host and the cause, within the store's timeout."""
    url = _other_credentials(POSTGRES_URL, what)
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot open the store") as raised:
        async with open_store(url):
            pass
    message = str(raised.value)
    assert f"@{urlsplit(url).hostname}:" in message
    assert {"port": "refused", "user": "role", "database": "database"}[what] in message
    assert "\n" not in message
    assert time.monotonic() - started < 10.0


@pytest.fixture(name="wrong_password_url")
def _wrong_password_url(postgres: None) -> Iterator[str]:
    """The URL of a role of the test's own with a wrong password (skips if the server does not
    check passwords: pg_hba.conf's trust, as on many a developer's machine)."""
    import psycopg

    role = f"order_store_test_{uuid.uuid4().hex[:12]}"
    parts = urlsplit(POSTGRES_URL)
    netloc = f"{role}:wrong-password@{parts.hostname}:{parts.port or 5432}"
    url = parts._replace(netloc=netloc).geturl()
    with admin() as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'right-password'")
    try:
        try:
            psycopg.connect(url).close()
        except psycopg.OperationalError:
            yield url
        else:
            pytest.skip("the server does not check passwords here (pg_hba.conf: trust)")
    finally:
        with admin() as conn:
            conn.execute(f"DROP ROLE {role}")


@pytest.mark.postgres
async def test_a_wrong_password_is_a_store_error_without_the_password(
    wrong_password_url: str,
) -> None:
    """A role's wrong password: StoreError naming the host and the cause, not the password."""
    with pytest.raises(StoreError, match="password") as raised:
        async with open_store(wrong_password_url):
            pass
    assert f"@{urlsplit(wrong_password_url).hostname}:" in str(raised.value)
    assert "wrong-password" not in str(raised.value)
    assert "\n" not in str(raised.value)


def test_the_cli_exits_2_with_one_line_when_the_server_is_unreachable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`order-pipeline orders --store postgresql://...` with nothing there: exit 2, one line."""
    pytest.importorskip("psycopg")
    from order_pipeline.main import main

    url = "postgresql://postgres@127.0.0.1:1/test"
    with pytest.raises(SystemExit) as exited:
        main(["orders", "--store", url])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "127.0.0.1:1" in err
    assert "refused" in err


@pytest.mark.postgres
async def test_a_lost_idle_connection_is_replaced_unseen(schema: str) -> None:
    """The server ends the store's idle connection: the next batch, lost, runs again anew."""
    app = application()
    async with postgres_stores(
        with_params(postgres_url(schema=schema), application_name=app), 1
    ) as (store,):
        order = await begun(store)
        for key in ("k-2", "k-3"):
            assert len(await terminate(app)) == 1
            assert await store.get("k-1") == order
            await begun(store, key)


@asynccontextmanager
async def row_locked(schema: str, *keys: str) -> AsyncIterator[None]:
    """Hold the locks of the orders `keys` (as another host's long transaction would)."""
    locker = await trio.to_thread.run_sync(admin)
    try:
        await trio.to_thread.run_sync(locker.execute, f"SET search_path TO {schema}")
        await trio.to_thread.run_sync(locker.execute, "BEGIN")
        await trio.to_thread.run_sync(
            locker.execute, "SELECT 1 FROM orders WHERE key = ANY(%s) FOR UPDATE", (list(keys),)
        )
        yield
        await trio.to_thread.run_sync(locker.execute, "ROLLBACK")
    finally:
        await trio.to_thread.run_sync(locker.close)


Start = Callable[[str, Callable[[], Awaitable[object]]], None]


@asynccontextmanager
async def one_batch_behind_a_row_lock(
    store: PostgresStore, schema: str, app: str
) -> AsyncIterator[tuple[Start, dict[str, object]]]:
    """Hold the store's writer (its connection named `app`) on another transaction's lock of
    order k-0, which a finish of k-0 waits for: what the block queues runs as one batch once
    it ends. Yields `start(name, call)`, which runs `call` in the background, and the calls'
    results (or the psycopg.Error each raised) by name, complete after the block."""
    import psycopg

    first = await begun(store, "k-0")
    results: dict[str, object] = {}

    async def call(name: str, fn: Callable[[], Awaitable[object]]) -> None:
        try:
            results[name] = await fn()
        except psycopg.Error as exc:
            results[name] = exc

    async with trio.open_nursery() as nursery, row_locked(schema, "k-0"):
        nursery.start_soon(
            call, "finish", lambda: store.finish("k-0", first.attempt_id, 200, b"", None)
        )
        await wait_for(lambda: backends(app, waiting=True), "the finish to wait")
        yield (lambda name, fn: nursery.start_soon(call, name, fn)), results
        store._send_riding()  # what nobody waits for goes with the rest, as a call would send it
        await trio.testing.wait_all_tasks_blocked()
        # Leaving the block releases the lock first, then waits for the calls.


@pytest.mark.postgres
async def test_a_connection_lost_mid_batch_runs_the_batch_again(schema: str) -> None:
    """The store's connection ends while its batch waits on a lock: nothing of it was
    committed, so it runs again on a new connection, and its callers never know."""
    app = application()
    url = with_params(postgres_url(schema=schema), application_name=app)
    async with postgres_stores(url, 1) as (store,):
        order = await begun(store)
        async with trio.open_nursery() as nursery, row_locked(schema, "k-1"):
            nursery.start_soon(store.finish, "k-1", order.attempt_id, 200, b"{}", None)
            nursery.start_soon(begun, store, "k-2")  # in the same batch, or the next
            await wait_for(lambda: backends(app, waiting=True), "the batch to wait")
            (lost,) = await terminate(app)
            await wait_for(lambda: backends(app, waiting=True), "the batch to run again")
            assert lost not in await backends(app)
        done = await store.get("k-1")
        assert done is not None
        assert (done.state, done.http_status) == (FINISHED, 200)
        assert await store.get("k-2") is not None


@pytest.mark.postgres
async def test_a_lock_held_past_the_timeout_fails_only_the_operation_that_waited(
    schema: str,
) -> None:
    """A row locked by someone else past `timeout` (lock_timeout): the operation that waited
    for it raises StoreUnavailable alone; the others of its batch commit, the lease's renewal
    among them (a host frozen in a transaction must not cost a live host its lease). An
    order's final record that met the lock is held, and lands once the lock is gone."""
    async with postgres_stores(postgres_url(schema=schema), 1, timeout=0.3) as (store,):
        order = await begun(store)
        async with row_locked(schema, "k-1"):
            failed: list[StoreUnavailable] = []
            begun_k2: list[object] = []

            async def finish() -> None:
                try:
                    await store.finish("k-1", order.attempt_id, 200, b"", None)
                except StoreUnavailable as exc:
                    failed.append(exc)

            async def begin() -> None:
                begun_k2.append(await store.begin("k-2", "o-2", "h", BODY, "w-1"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(finish)
                nursery.start_soon(begin)
            # One batch: the final record nobody waits for, riding on the renewal.
            store.finish_soon("k-1", order.attempt_id, 201, b"later", None)
            await store.renew_lease("w-1", 60.0)
            (lease,) = await sql(
                f"SELECT extract(epoch FROM expires_at - now())::float8 FROM {schema}.leases"
            )
            still_running = await store.get("k-1")
        assert len(failed) == 1
        assert "lock timeout" in str(failed[0])
        assert [type(b) for b in begun_k2] == [Begun]
        assert lease[0] > 50  # renewed while the lock was held
        assert still_running is not None
        assert still_running.state == RUNNING
        await store.renew_lease("w-1", 60.0)  # carries the held final record
        done = await store.get("k-1")
        assert done is not None
        assert (done.state, done.http_status, done.reply) == (FINISHED, 201, b"later")


@pytest.mark.postgres
async def test_a_statement_timeout_of_the_role_does_not_fail_a_reader_s_opening(
    schema: str,
) -> None:
    """`orders` (a reader) opened on a role whose statement_timeout is shorter than its
    schema check failed at once (QueryCanceled, at open), where the server's own opening and
    every connection of both turn an operator's statement_timeout off."""
    url = postgres_url(schema=schema)
    async with open_store(url) as store:
        await begun(store)
    # The URL's options set it for the session, as `ALTER ROLE ... SET` would for the role.
    async with open_store(with_params(url, options="-cstatement_timeout=1"), reader=True) as r:
        assert [o.key for o, _ in await r.list_orders()] == ["k-1"]


@pytest.mark.postgres
async def test_a_statement_timeout_of_the_role_does_not_fail_a_whole_batch_at_a_lock(
    schema: str,
) -> None:
    """An operator's statement_timeout for the store's role (here the URL's options set it
    for the session, as `ALTER ROLE ... SET statement_timeout` would), shorter than the
    store's lock wait, must not turn a row lock held by another transaction into a failure
    of the whole batch: the final record that met the lock is held, alone; the lease's
    renewal and another order's step record beside it commit (else a live host loses its
    lease, and every batch fails, for as long as a frozen host holds one order's row)."""
    url = with_params(postgres_url(schema=schema), options="-cstatement_timeout=100")
    async with postgres_stores(url, 1, timeout=0.3) as (store,):
        first = await begun(store)
        second = await begun(store, "k-2")
        async with row_locked(schema, "k-1"):
            # One batch: the held records ride on the renewal.
            store.finish_soon("k-1", first.attempt_id, 200, b"{}", None)
            store.record_step("k-2", second.attempt_id, StepRecord("payment", "ok"))
            await store.renew_lease("w-1", 60.0)
            (lease,) = await sql(
                f"SELECT extract(epoch FROM expires_at - now())::float8 FROM {schema}.leases"
            )
            still_running = await store.get("k-1")
            stepped = await store.get("k-2")
        assert lease[0] > 50  # renewed while the lock was held
        assert still_running is not None
        assert still_running.state == RUNNING
        assert stepped is not None
        assert stepped.steps == (StepRecord("payment", "ok"),)
        await store.renew_lease("w-1", 60.0)  # the lock gone: carries the held final record
        done = await store.get("k-1")
        assert done is not None
        assert (done.state, done.http_status) == (FINISHED, 200)


@pytest.mark.postgres
async def test_many_locks_held_past_the_timeout_do_not_hold_the_lease_s_renewal(
    schema: str,
) -> None:
    """A frozen host's transaction may hold the rows of many orders: once a batch has met
    one lock held past lock_timeout, each other operation that meets one fails at once,
    alone, so the renewal riding with them commits well within a lease (one lock_timeout
    each would take 12 x 0.3 s here)."""
    keys = [f"k-{i}" for i in range(12)]
    async with postgres_stores(postgres_url(schema=schema), 1, timeout=0.3) as (store,):
        orders = [await begun(store, key) for key in keys]
        async with row_locked(schema, *keys):
            for order in orders:
                store.finish_soon(order.key, order.attempt_id, 200, b"{}", None)
            started = time.monotonic()
            await store.renew_lease("w-1", 60.0)  # carries the twelve final records
            took = time.monotonic() - started
        assert took < 2.0, took  # 0.3 s and twelve brief tries, not twelve timeouts
        await store.renew_lease("w-1", 60.0)  # the locks gone, the held records land
        assert {(await store.get(key)).state for key in keys} == {FINISHED}  # type: ignore[union-attr]


@pytest.mark.postgres
async def test_a_step_record_held_at_a_lock_holds_back_no_later_record(schema: str) -> None:
    """A step record that meets a row lock (the order's steps written by a frozen host's
    transaction, before this host claimed the order) is held, and lands once the lock is
    gone; the records queued after it, of other orders, land meanwhile (taken with it, they
    waited as long: every later record of the host, for as long as the lock was held)."""
    async with postgres_stores(postgres_url(schema=schema), 1, timeout=0.3) as (store,):
        first, second = await begun(store), await begun(store, "k-2")
        store.record_step("k-1", first.attempt_id, StepRecord("payment", "ok"))
        await store.renew_lease("w-1", 60.0)
        undone = StepRecord("payment", "ok", compensation="ok", compensation_ms=3)
        locker = await trio.to_thread.run_sync(admin)
        try:
            await trio.to_thread.run_sync(locker.execute, f"SET search_path TO {schema}")
            await trio.to_thread.run_sync(locker.execute, "BEGIN")
            await trio.to_thread.run_sync(
                locker.execute, "UPDATE steps SET status = status WHERE attempt_id = %s",
                (first.attempt_id,),
            )  # fmt: skip
            store.record_step("k-1", first.attempt_id, undone)
            await store.renew_lease("w-1", 60.0)  # the record meets the lock: held
            store.record_step("k-2", second.attempt_id, StepRecord("vendor", "ok"))
            stepped = await store.get("k-2")
            locked = await store.get("k-1")
            await trio.to_thread.run_sync(locker.execute, "ROLLBACK")
        finally:
            await trio.to_thread.run_sync(locker.close)
        assert stepped is not None
        assert stepped.steps == (StepRecord("vendor", "ok"),)
        assert locked is not None
        assert locked.steps == (StepRecord("payment", "ok"),)
        await store.renew_lease("w-1", 60.0)  # the lock gone: carries the held record
        done = await store.get("k-1")
        assert done is not None
        assert done.steps == (undone,)


@pytest.mark.postgres
async def test_a_record_held_after_meeting_a_lock_does_not_slow_the_batches_it_rides_on(
    schema: str,
) -> None:
    """An order's final record that met a row lock (a frozen host's transaction) is held and
    rides on every later batch: each waits for locks briefly from the start, so unrelated
    orders commit in milliseconds, not after a full lock_timeout (2 s) each."""
    from order_pipeline.store.postgres import LOCK_WAIT_S

    async with postgres_stores(postgres_url(schema=schema), 1) as (store,):
        order = await begun(store)
        async with row_locked(schema, "k-1"):
            store.finish_soon("k-1", order.attempt_id, 200, b"{}", None)
            await store.renew_lease("w-1", 60.0)  # the final record fails alone, held again
            took = []
            for i in range(3):
                started = time.monotonic()
                await begun(store, f"other-{i}")  # each carries the held record
                took.append(time.monotonic() - started)
            still = await store.get("k-1")
        assert max(took) < LOCK_WAIT_S / 2, took
        assert still is not None
        assert still.state == RUNNING
        await store.renew_lease("w-1", 60.0)  # the lock gone, the held record lands
        done = await store.get("k-1")
        assert done is not None
        assert done.state == FINISHED


@pytest.mark.postgres
async def test_a_pipeline_aborted_by_a_lock_leaves_no_statement_unusable(schema: str) -> None:
    """A lock timeout aborts a pipeline, skipping the Parse of a statement psycopg was
    preparing (at its sixth run); psycopg would take it as prepared and every later run of it
    fail (InvalidSqlStatementName: each new order 500 until a restart). The connection of a
    batch whose pipeline failed is replaced instead. (Whether a round skips the begin's
    prepare hangs on the order Trio runs the two calls in: without the replacement this
    fails in about one run of four, not every run.)"""
    async with postgres_stores(postgres_url(schema=schema), 1, timeout=0.3) as (store,):
        order = await begun(store)
        await begun(store, "k-2")
        async with row_locked(schema, "k-1"):
            for i in range(3):  # a batch each: the finish meets the lock, a begin rides along
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(finish_or_not, store, order)
                    nursery.start_soon(store.begin, f"a-{i}", "o", "h", BODY, "w-1")
        for i in range(6):  # the lock gone: through psycopg's prepare threshold
            assert isinstance(await store.begin(f"b-{i}", "o", "h", BODY, "w-1"), Begun)


async def finish_or_not(store: OrderStore, order: StoredOrder) -> None:
    """Finish `order`, unless a lock held past the lock timeout stops it."""
    with suppress(StoreUnavailable):
        await store.finish(order.key, order.attempt_id, 200, b"{}", None)


@pytest.mark.postgres
async def test_a_batch_run_again_for_an_operation_s_error_still_waits_for_locks(
    schema: str,
) -> None:
    """A batch run again statement by statement for an operation's own error (not a lock)
    waits for another host's row locks as long as ever: a begin that meets another host's
    insert of the same key, held for a moment, gets Existing, not a spurious 503."""
    import psycopg

    app = application()
    async with postgres_stores(
        with_params(postgres_url(schema=schema), application_name=app), 1
    ) as (store,):
        other = await trio.to_thread.run_sync(admin)
        try:
            await trio.to_thread.run_sync(other.execute, f"SET search_path TO {schema}")
            await trio.to_thread.run_sync(other.execute, "BEGIN")
            await trio.to_thread.run_sync(
                lambda: other.execute(
                    "INSERT INTO orders (key, order_id, request_hash, body, attempt, attempt_id,"
                    " owner, state, started_at) VALUES ('k-x', 'o', 'h', '\\x7b7d', 1, 'theirs',"
                    " 'w-other', 'running', now())"
                )
            )
            async with one_batch_behind_a_row_lock(store, schema, app) as (start, results):
                # The charge fails by itself first; the begin, run again after it, then
                # meets the other host's insert of k-x.
                start("charge", lambda: store.charge("c-1", "k-0", 2**70))
                start("k-x", lambda: store.begin("k-x", "o", "h", BODY, "w-1"))

                async def begin_waits() -> bool:  # for the other host's insert of k-x
                    return bool(
                        await sql(
                            "SELECT 1 FROM pg_stat_activity WHERE application_name = %s"
                            " AND %s = ANY(pg_blocking_pids(pid))",
                            app,
                            other.info.backend_pid,
                        )
                    )

                async def commit_later() -> None:
                    await wait_for(begin_waits, "the begin to wait for the other's insert")
                    await trio.to_thread.run_sync(other.execute, "COMMIT")

                start("commit", commit_later)
        finally:
            await trio.to_thread.run_sync(other.close)
        assert isinstance(results["charge"], psycopg.errors.NumericValueOutOfRange)
        assert isinstance(results["k-x"], Existing), results["k-x"]
        assert results["k-x"].order.attempt_id == "theirs"


@pytest.mark.postgres
@pytest.mark.parametrize("digits", ["0", "-3"])
async def test_a_role_s_extra_float_digits_leaves_the_listing_s_pages_whole(
    schema: str, digits: str
) -> None:
    """extra_float_digits set for the store's role or database (here by the URL) below 1
    would print float8 rounded (15 significant digits at 0, 12 at -3): an order's start
    read back so is not its start, and a page after it skips orders or, rounded down,
    lists the same ones for ever. The store's sessions print them exactly."""
    url = with_params(postgres_url(schema=schema), options=f"-cextra_float_digits={digits}")
    keys = [f"k-{n}" for n in range(12)]
    async with open_store(url) as store:
        for key in keys:
            await begun(store, key)
        for n, key in enumerate(keys):  # microseconds apart, and milliseconds
            at = 1_750_000_000.123456 + (n // 2) * 0.000001 + (n % 2) * 0.004
            await sql(
                "UPDATE orders SET started_at = to_timestamp(%s) WHERE key = %s",
                at,
                key,
                schema=schema,
            )
        expected = [
            key
            for (key,) in await sql(
                'SELECT key FROM orders ORDER BY started_at, key COLLATE "C"', schema=schema
            )
        ]
        for size in (1, 2, 3):
            listed: list[str] = []
            after = None
            for _ in range(len(keys) + 1):  # bounded: a page that repeats itself ends it
                page = await store.list_orders(after=after, limit=size)
                listed += [order.key for order, _ in page]
                if len(page) < size:
                    break
                after = (page[-1][0].started_at, page[-1][0].key)
            assert listed == expected, size


@pytest.mark.postgres
async def test_an_operator_s_listing_never_makes_a_postgresql_schema(schema: str) -> None:
    """A reader (`order-pipeline orders`) of an empty schema, a typo of its search_path, is
    refused and creates nothing there; of a store, it lists it."""
    url = postgres_url(schema=schema)
    with pytest.raises(StoreError, match="no order store there"):
        async with open_store(url, reader=True):
            pass
    tables = await sql(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s", schema
    )
    assert tables == [(0,)]
    async with postgres_stores(url, 1) as (store,):
        await begun(store)
    async with open_store(url, reader=True) as reading:
        assert [o.key for o, _ in await reading.list_orders()] == ["k-1"]


@pytest.mark.postgres
async def test_a_database_that_vanishes_is_noticed_in_seconds(schema: str) -> None:
    """The store's connection gives up on the database within seconds of silence, as the
    kernel sees its socket: idle, by keepalives; with what it sent unacknowledged (a network
    partition), by TCP_USER_TIMEOUT, instead of the kernel's quarter of an hour of retries."""

    def tcp_options(conn: Any) -> tuple[int, ...]:
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
            return (
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            )

    async with postgres_stores(postgres_url(schema=schema), 1) as (store,):
        keepalive, idle_s, user_timeout_ms = await store._call(tcp_options)
    assert (keepalive, idle_s, user_timeout_ms) == (1, 10, 10_000)


@pytest.mark.postgres
async def test_a_batch_waits_for_a_row_lock_well_under_a_lease(schema: str) -> None:
    """By default a batch waits two seconds at most for another transaction's row lock (one
    more than PostgreSQL takes to find a deadlock), where a lease lasts five: a batch carries
    the lease's renewal."""
    from order_pipeline.settings import Settings

    async with postgres_stores(postgres_url(schema=schema), 1) as (store,):
        shown = await store._call(lambda conn: conn.execute("SHOW lock_timeout").fetchone())
    assert shown == ("2s",)
    assert Settings().lease_timeout >= 5


@pytest.mark.postgres
async def test_an_operation_failing_alone_leaves_its_batch_alone(schema: str) -> None:
    """In one batch, a charge the database refuses (out of bigint's range) raises its own
    error; the begins and the finish around it are committed all the same, and the finish's
    reply is read back once, from the run that committed."""
    import psycopg

    app = application()
    async with postgres_stores(
        with_params(postgres_url(schema=schema), application_name=app), 1
    ) as (store,):
        third = await begun(store, "k-3")
        async with one_batch_behind_a_row_lock(store, schema, app) as (start, results):
            store.finish_soon("k-3", third.attempt_id, 201, b"three", None)
            start("k-1", lambda: store.begin("k-1", "o-1", "h", BODY, "w-1"))
            start("charge", lambda: store.charge("c-1", "k-1", 2**70))
            start("reply", lambda: store.finished_reply("k-3", third.attempt_id))
            start("k-2", lambda: store.begin("k-2", "o-2", "h", BODY, "w-1"))
        assert isinstance(results["charge"], psycopg.errors.NumericValueOutOfRange)
        assert isinstance(results["k-1"], Begun)
        assert isinstance(results["k-2"], Begun)
        assert await store.get("k-2") == results["k-2"].order
        assert await store.net_charge("k-1") == 0
        assert results["reply"] == FinishedReply(201, b"three", None)
        assert len(store._replies) == 0  # read once


@pytest.mark.postgres
async def test_a_reply_written_by_a_rolled_back_run_of_a_batch_is_not_served(
    schema: str,
) -> None:
    """A batch's finish writes a reply, then another operation fails and the batch is rolled
    back; before it runs again another host finishes the order. The run that commits writes
    nothing, so the reply read back is the other host's, the one stored, not the one the
    rolled-back run wrote."""
    import psycopg

    from order_pipeline.store.postgres import PostgresStore

    theirs = FinishedReply(503, b"theirs", "interrupted")

    class AnotherHostFinishesBetweenRuns(PostgresStore):
        runs = 0

        def _attempt(self, ops: Any, pipelined: bool) -> Any:
            if not pipelined:  # the batch run again statement by statement
                self.runs += 1
                if self.runs == 2:  # after the run where the charge failed
                    with admin() as conn:
                        conn.execute(
                            f"UPDATE {schema}.orders SET state = 'finished',"
                            " finished_at = now(), http_status = %s, reply = %s, kind = %s"
                            " WHERE key = 'k-3'",
                            (theirs.http_status, theirs.reply, theirs.kind),
                        )
            return super()._attempt(ops, pipelined)

    app = application()
    url = with_params(postgres_url(schema=schema), application_name=app)
    async with AnotherHostFinishesBetweenRuns(url) as store:
        third = await begun(store, "k-3")
        async with one_batch_behind_a_row_lock(store, schema, app) as (start, results):
            # Queued in this order: the finish of k-3, the charge that fails, the reply of k-3.
            store.finish_soon("k-3", third.attempt_id, 201, b"ours", None)
            start("charge", lambda: store.charge("c-1", "k-3", 2**70))
            await trio.testing.wait_all_tasks_blocked()
            start("reply", lambda: store.finished_reply("k-3", third.attempt_id))
        assert store.runs == 2
        assert isinstance(results["charge"], psycopg.errors.NumericValueOutOfRange)
        assert results["reply"] == theirs
        stored = await store.get("k-3")
        assert stored is not None
        assert (stored.http_status, stored.reply, stored.kind) == (503, b"theirs", "interrupted")


@pytest.mark.postgres
@pytest.mark.parametrize("committed", [True, False], ids=["committed", "not-committed"])
async def test_a_commit_whose_answer_is_lost_is_looked_up(committed: bool, schema: str) -> None:
    """The connection is lost while committing: the store asks the database whether the
    transaction committed, and keeps its results (Begun, not its own Existing) or runs it again.
    """
    import psycopg

    from order_pipeline.store.postgres import PostgresStore

    class LosesOneCommit(PostgresStore):
        lost = 0

        def _commit(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
            if self.lost:
                super()._commit(conn)
                return
            self.lost += 1
            if committed:
                super()._commit(conn)
            conn.close()
            raise psycopg.OperationalError("the answer to COMMIT was lost (a test's)")

    async with LosesOneCommit(postgres_url(schema=schema)) as store:
        result = await store.begin("k-1", "o-1", "hash-1", BODY, "w-1")
        assert isinstance(result, Begun)
        assert store.lost == 1
        assert await store.get("k-1") == result.order
        assert store.commits == 2  # the begin's batch (counted once) and the get's


@pytest.mark.postgres
async def test_a_lookup_whose_connection_is_lost_asks_again_on_another(schema: str) -> None:
    """The answer to COMMIT is lost, and so is the connection the store then asks on (the
    database restarting, a pooler dropping connections): it asks again on a new one within
    its `timeout`, and the batch's results stand (Begun), rather than giving up at once and
    calling a committed charge one that may have taken effect."""
    import psycopg

    from order_pipeline.store.postgres import PostgresStore

    class LosesACommitThenALookup(PostgresStore):
        lookups = 0

        def _commit(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
            super()._commit(conn)
            if self.lookups == 0:
                self.lookups = 1
                conn.close()
                raise psycopg.OperationalError("the answer to COMMIT was lost (a test's)")

        def _bounded(self, conn: psycopg.Connection[tuple[Any, ...]], deadline: float) -> Any:
            if self.lookups == 1:  # the lookup's first connection, about to ask
                self.lookups = 2
                with admin() as other:
                    other.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
            return super()._bounded(conn, deadline)

    async with LosesACommitThenALookup(postgres_url(schema=schema)) as store:
        result = await store.begin("k-1", "o-1", "hash-1", BODY, "w-1")
        assert isinstance(result, Begun)
        assert store.lookups == 2
        assert await store.get("k-1") == result.order


@pytest.mark.postgres
async def test_a_commit_whose_outcome_cannot_be_looked_up_may_have_taken_effect(
    schema: str,
) -> None:
    """The answer to COMMIT is lost and the database cannot say whether it committed: the
    calls of the batch raise StoreUnavailable saying that it may have taken effect (so the
    payment step whose charge it was is refunded); a failure known to have written nothing
    does not say so."""
    import psycopg

    from order_pipeline.store.postgres import PostgresStore

    class LosesACommitForGood(PostgresStore):
        def _commit(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
            super()._commit(conn)
            conn.close()
            raise psycopg.OperationalError("the answer to COMMIT was lost (a test's)")

        def _outcome(self, xid: str | None, backend_pid: int) -> str:
            return "unknown: no connection (a test's)"

    async with LosesACommitForGood(postgres_url(schema=schema)) as store:
        with pytest.raises(StoreUnavailable, match="while committing") as lost:
            await store.charge("c-1", "k-1", 70)
        assert lost.value.may_have_taken_effect is True
    assert StoreUnavailable("the store is closed").may_have_taken_effect is False


@pytest.mark.postgres
async def test_while_the_database_refuses_us_the_store_is_unavailable_then_recovers(
    schema: str,
) -> None:
    """The store's role may not log in for a while and its connection is ended: operations
    raise StoreUnavailable (orders get 503); once it may again, the pool reconnects."""
    role = f"order_store_test_{uuid.uuid4().hex[:12]}"
    await sql(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    try:
        await sql(f"GRANT USAGE, CREATE ON SCHEMA {schema} TO {role}")
        parts = urlsplit(postgres_url(schema=schema))
        netloc = f"{role}:pw@{parts.hostname}:{parts.port or 5432}"
        app = application()
        url = with_params(parts._replace(netloc=netloc).geturl(), application_name=app)
        async with postgres_stores(url, 1, timeout=0.5) as (store,):
            await begun(store)
            await sql(f"ALTER ROLE {role} NOLOGIN")
            await terminate(app)
            with pytest.raises(StoreUnavailable, match=r"127\.0\.0\.1|@"):
                await store.begin("k-2", "o-1", "hash-1", BODY, "w-1")
            with pytest.raises(StoreUnavailable):
                await store.get("k-1")
            await sql(f"ALTER ROLE {role} LOGIN")

            async def works() -> bool:
                try:
                    await store.get("k-1")
                except StoreUnavailable:
                    return False
                return True

            await wait_for(works, "the store to reconnect")
            await begun(store, "k-2")  # the failed begin wrote nothing
    finally:
        await sql(f"DROP SCHEMA {schema} CASCADE")
        pg.schemas.remove(schema)
        await sql(f"DROP ROLE {role}")


@pytest.mark.postgres
async def test_concurrent_finishes_share_commits_on_postgresql(schema: str) -> None:
    """20 orders finishing at once are committed in fewer than 20 transactions."""
    async with postgres_stores(postgres_url(schema=schema), 1) as (store,):
        orders = [await begun(store, f"k-{i}") for i in range(20)]
        before = store.commits
        async with trio.open_nursery() as nursery:
            for order in orders:
                nursery.start_soon(store.finish, order.key, order.attempt_id, 200, b"{}", None)
        assert store.commits - before < 20
        assert all(o.state == FINISHED for o, _ in await store.list_orders())


@pytest.mark.postgres
async def test_many_orders_flow_through_the_postgresql_writer(schema: str) -> None:
    """A thousand concurrent orders (begin, three steps, finish) all land, in batched commits."""
    async with postgres_stores(postgres_url(schema=schema), 1) as (store,):
        await thousand_orders_flow_through(store)


@pytest.mark.postgres
async def test_a_closed_postgresql_store_refuses_work(schema: str) -> None:
    """After close, calls raise StoreUnavailable instead of hanging on a stopped thread."""
    async with postgres_stores(postgres_url(schema=schema), 1) as (store,):
        pass
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.get("k-1")
    with pytest.raises(StoreUnavailable, match="closed"):
        store.record_step("k-1", "a", StepRecord("payment", "ok"))


@pytest.mark.postgres
async def test_orders_are_found_by_key_however_small_the_table_was_at_first(
    schema: str,
) -> None:
    """A statement the store ran on an empty table (psycopg then prepares it, and PostgreSQL
    may keep one plan for it) still finds an order through the key's index once thousands
    are stored; step records check their attempt through it too, not by reading every order.
    """
    from order_pipeline.store import postgres

    async with postgres_stores(postgres_url(schema=schema), 1) as (store,):
        # psycopg prepares a statement at its sixth run, PostgreSQL may keep a plan from its sixth
        for i in range(16):
            key = f"k-{i}"
            begun = await store.begin(key, "o-1", "hash-1", BODY, "w-1")
            assert isinstance(begun, Begun)
            await store.finish(key, begun.order.attempt_id, 200, b"{}", None)
            assert await store.finished_reply(key, begun.order.attempt_id) is not None

        def plans(conn: Any) -> tuple[str, str]:
            conn.execute(
                "INSERT INTO orders (key, order_id, request_hash, body, attempt, attempt_id,"
                " owner, state, started_at, finished_at, http_status, reply)"
                " SELECT 'bulk-' || i, 'o', 'h', '', 1, 'a-' || i, 'w-0', 'finished', now(),"
                " now(), 200, '' FROM generate_series(1, 5000) AS i"
            )
            (name,) = conn.execute(
                "SELECT name FROM pg_prepared_statements WHERE statement = %s",
                (postgres._FINISHED_REPLY.replace("%s", "$1", 1).replace("%s", "$2", 1),),
            ).fetchone()
            reply = conn.execute(f"EXPLAIN EXECUTE {name}('bulk-7', 'a-7')").fetchall()
            rows = orjson.dumps([["a-7", "payment", "ok", None, 1, None, None, "bulk-7"]])
            steps = conn.execute("EXPLAIN " + postgres._RECORD_STEPS, (rows.decode(),))
            return "\n".join(r[0] for r in reply), "\n".join(r[0] for r in steps.fetchall())

        reply_plan, steps_plan = await store._call(plans)
    assert "Index Cond: (key = " in reply_plan, reply_plan
    assert "Seq Scan on orders" not in steps_plan, steps_plan
    assert "orders_pkey" in steps_plan, steps_plan


class _Explained:
    """A PostgreSQL connection that asks for each statement's plan before it runs it."""

    def __init__(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
        self.conn = conn
        self.plans: dict[str, str] = {}  # the statement's first words: its plan

    def execute(self, query: str, args: Any = None) -> psycopg.Cursor[tuple[Any, ...]]:
        plan = self.conn.execute(f"EXPLAIN {query}", args).fetchall()
        self.plans[" ".join(query.split()[:2])] = "\n".join(row[0] for row in plan)
        return self.conn.execute(query, args)


@pytest.mark.postgres
async def test_postgres_plans_read_attention_and_purges_through_their_indexes(
    schema: str,
) -> None:
    """EXPLAIN: a page of `--needs-attention`, the first and those after, is a range of
    orders_attention (not every order through orders_started), its failed undos looked up
    through steps_undo_failed (not every step read), before the table's first ANALYZE and
    after; a purge, a range of orders_purgeable (not of orders_finished_at, which held the
    compensation_failed orders it keeps). 20,000 orders, most of them finished ok."""
    from order_pipeline.store import postgres

    def plans(conn: Any) -> tuple[str, str, str]:
        explained = _Explained(conn)
        postgres._list_orders(explained, True, None, 1000)  # type: ignore[arg-type]
        first = explained.plans["SELECT orders.key,"]
        after = (time.time() - 1800, "k-")
        postgres._list_orders(explained, True, after, 1000)  # type: ignore[arg-type]
        postgres._purge(explained, 3600.0, 100)  # type: ignore[arg-type]
        return first, explained.plans["SELECT orders.key,"], explained.plans["WITH gone"]

    def fill(conn: Any) -> None:
        conn.execute(
            "INSERT INTO orders (key, order_id, request_hash, body, attempt, attempt_id, owner,"
            " state, started_at, finished_at, http_status, reply, kind)"
            " SELECT 'k-' || i, 'o', 'h', '', 1, 'a-' || i, 'w-0', 'finished',"
            " now() - interval '1 hour' + i * interval '1 ms', now(), 200, '',"
            " CASE WHEN i % 500 = 0 THEN 'compensation_failed' END"
            " FROM generate_series(1, 20000) AS i"
        )
        conn.execute(
            "INSERT INTO steps (attempt_id, step, status, duration_ms, compensation)"
            " SELECT 'a-' || i, s, 'ok', 1, CASE WHEN i % 500 = 0 THEN 'error' END"
            " FROM generate_series(1, 20000) AS i, unnest(array['payment', 'vendor']) AS s"
        )

    async with postgres_stores(postgres_url(schema=schema), 1) as (store,):
        await store._call(fill)
        unanalyzed = await store._call(plans)
        await sql("ANALYZE orders, steps", schema=schema)  # as autovacuum does soon after
        first, after, purge = await store._call(plans)
    for plan in (unanalyzed[0], unanalyzed[1], first, after):
        assert "Index Scan using orders_attention on orders" in plan, plan
        assert "orders_started" not in plan, plan
        assert "Seq Scan on steps" not in plan, plan
    assert "Index Cond: (ROW(started_at, (key)::text) > ROW(" in after, after
    # Before any ANALYZE PostgreSQL takes orders_state_owner for `state =`, as it did before.
    assert "Index Scan using orders_purgeable on orders" in purge, purge


# -- a database that stops answering --------------------------------------------------------


class Blackhole:
    """A TCP proxy on 127.0.0.1 (a port of 18700-18799) to the test server, which can stop
    forwarding without closing anything (`stop`, `resume`): its kernel still acknowledges
    what is sent, so TCP's own timeouts (tcp_user_timeout, keepalives) never fire, as behind
    a stalled pooler or a path that drops what it forwards. Or it can end its connections
    and every new one at once (`refuse`), as a database shut down does."""

    def __init__(self) -> None:
        self.port = 0
        self._flowing = trio.Event()
        self._flowing.set()
        self._refusing = False
        self._open: set[trio.CancelScope] = set()  # the connections it forwards

    def stop(self) -> None:
        self._flowing = trio.Event()

    def refuse(self) -> None:
        self._refusing = True
        for scope in self._open:
            scope.cancel()

    def resume(self) -> None:
        self._refusing = False
        self._flowing.set()

    def url(self, url: str) -> str:
        """`url`, its host and port this proxy's."""
        parts = urlsplit(url)
        user, at, _ = parts.netloc.rpartition("@")
        return parts._replace(netloc=f"{user}{at}127.0.0.1:{self.port}").geturl()

    async def listen(self) -> list[trio.SocketListener]:
        for port in range(18700, 18800):
            try:
                listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
            except OSError:  # taken (by another test run, say)
                continue
            self.port = port
            return listeners
        pytest.fail("no free port in 18700-18799 for the proxy")

    async def connection(self, client: trio.SocketStream) -> None:
        """Forward one connection both ways until either side ends it, then end both."""
        target = urlsplit(POSTGRES_URL)
        forwarding = trio.CancelScope()
        self._open.add(forwarding)  # `refuse` ends it, connecting or forwarding
        try:
            async with client:
                with forwarding:
                    if self._refusing:
                        return
                    try:
                        server = await trio.open_tcp_stream(
                            target.hostname or "127.0.0.1", target.port or 5432
                        )
                    except OSError:
                        return
                    async with server, trio.open_nursery() as nursery:
                        nursery.start_soon(self._forward, client, server, nursery.cancel_scope)
                        nursery.start_soon(self._forward, server, client, nursery.cancel_scope)
        finally:
            self._open.discard(forwarding)

    async def _forward(
        self, source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope
    ) -> None:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                await self._flowing.wait()  # stopped: nothing read, so the kernel buffers it
                data = await source.receive_some(1 << 16)
                await self._flowing.wait()
                if not data:
                    break
                await sink.send_all(data)
        done.cancel()


@asynccontextmanager
async def blackhole() -> AsyncIterator[Blackhole]:
    """A `Blackhole` proxy, forwarding, for the block; its connections end with it."""
    proxy = Blackhole()
    async with trio.open_nursery() as nursery:
        listeners = await proxy.listen()
        await nursery.start(trio.serve_listeners, proxy.connection, listeners)
        try:
            yield proxy
        finally:
            nursery.cancel_scope.cancel()


async def _resume_after(proxy: Blackhole, seconds: float) -> None:
    await trio.sleep(seconds)
    proxy.resume()


@pytest.mark.postgres
async def test_a_database_that_stops_answering_fails_the_batch_in_bounded_time(
    schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The path to the database stops forwarding without closing (its kernel acknowledges,
    so tcp_user_timeout never fires): a batch's connection is broken off 3 x `timeout` after
    the batch began, and its callers get StoreUnavailable instead of waiting as long as the
    stall lasts. Nothing of it was committed; once the path forwards again, the store works
    again, without a restart."""
    async with (
        blackhole() as proxy,
        postgres_stores(proxy.url(postgres_url(schema=schema)), 1, timeout=0.5) as (store,),
    ):
        await begun(store)
        proxy.stop()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_resume_after, proxy, 8.0)  # else today's code waits for ever
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match=r"could not commit within 1\.5 s") as lost:
                await store.begin("k-2", "o-2", "hash-2", BODY, "w-1")
            took = time.monotonic() - started
            nursery.cancel_scope.cancel()
        assert 1.5 <= took < 4.0, took
        assert not lost.value.may_have_taken_effect  # broken off before COMMIT
        assert "no answer from the database in time" in caplog.text
        proxy.resume()
        # The pool reconnects in the background (its backoff may make the first calls fail).
        with trio.fail_after(30):
            for _ in range(300):
                try:
                    order = await store.get("k-1")
                    break
                except StoreUnavailable:
                    await trio.sleep(0.1)
            else:
                pytest.fail("the store did not come back once the path forwarded again")
        assert order is not None
        assert await store.get("k-2") is None
        await begun(store, "k-3")


@pytest.mark.postgres
async def test_a_commit_that_gets_no_answer_may_have_taken_effect(schema: str) -> None:
    """The path stops forwarding as the batch commits: its connection is broken off in
    bounded time, the outcome cannot be asked (no new connection through the stalled path
    within `timeout`), and the call raises StoreUnavailable that says the batch may have
    taken effect (its COMMIT may yet arrive: so a charge in it is refunded)."""

    from order_pipeline.store.postgres import PostgresStore

    token = trio.lowlevel.current_trio_token()

    class StallsAtCommit(PostgresStore):
        stall = False

        def _commit(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
            if self.stall:
                trio.from_thread.run_sync(proxy.stop, trio_token=token)
            super()._commit(conn)

    async with blackhole() as proxy:
        store = StallsAtCommit(proxy.url(postgres_url(schema=schema)), timeout=0.5)
        async with store:
            store.stall = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_resume_after, proxy, 8.0)  # else today's code waits for ever
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match="while committing") as lost:
                    await store.charge("c-1", "k-1", 70)
                took = time.monotonic() - started
                nursery.cancel_scope.cancel()
            store.stall = False
            proxy.resume()
        assert 1.5 <= took < 5.0, took
        assert lost.value.may_have_taken_effect is True


@pytest.mark.postgres
async def test_a_lost_commit_whose_outcome_finds_no_connection_begins_the_brief_waits(
    schema: str,
) -> None:
    """The connection lost as the batch commits, and the database refusing connections
    since: the look-up of its outcome waits the full `timeout` for one and finds none, so
    the batches after it wait OUTAGE_WAIT_S at most, as after a batch that found none itself
    (before: the next call waited its full `timeout` too, 10 s behind a lost commit)."""

    from order_pipeline.store.postgres import OUTAGE_WAIT_S, PostgresStore

    token = trio.lowlevel.current_trio_token()

    class LosesItsCommit(PostgresStore):
        lose = False

        def _commit(self, conn: psycopg.Connection[tuple[Any, ...]]) -> None:
            if self.lose:
                trio.from_thread.run_sync(proxy.refuse, trio_token=token)
                conn.close()  # lost as COMMIT is sent: its outcome is asked afresh
            super()._commit(conn)

    async with blackhole() as proxy:
        store = LosesItsCommit(proxy.url(postgres_url(schema=schema)), timeout=3.0)
        async with store:
            store.lose = True
            with pytest.raises(StoreUnavailable, match="while committing") as lost:
                await store.charge("c-1", "k-1", 70)
            store.lose = False
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="no connection"):
                await store.charge("c-2", "k-2", 70)
            took = time.monotonic() - started
            proxy.resume()
        assert lost.value.may_have_taken_effect is True
        assert took < OUTAGE_WAIT_S + 1.0 < store.timeout, took


async def _timed(
    http: httpx.AsyncClient, method: str, path: str, replies: list[tuple[int, float]], **kw: Any
) -> None:
    started = time.monotonic()
    status = (await http.request(method, path, **kw)).status_code
    replies.append((status, time.monotonic() - started))


@pytest.mark.postgres
async def test_an_outage_gets_its_503_within_about_the_store_timeout(
    start_server: StartServer, schema: str
) -> None:
    """A server whose database refuses connections answers 503 store_unavailable within
    about its store's timeout (5 s) of a request, not behind a batch already waiting that
    long for a connection (the lease's renewal, recovery's look queue one each second) and
    then a full wait of its own (before: 8 s for an order sent 2 s into the outage, 5 to
    10 s later on); and serves again once the database is back."""
    async with blackhole() as proxy:
        url = proxy.url(postgres_url(schema=schema))
        server = await start_server("--store", url, "--no-access-log")
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            order = {"order_id": "o-1", "amount": 5}
            assert (
                await http.post("/order", json=order, headers={"Idempotency-Key": "k-1"})
            ).status_code == 200
            proxy.refuse()
            await trio.sleep(2)
            replies: list[tuple[int, float]] = []
            await _timed(
                http, "POST", "/order", replies, json=order, headers={"Idempotency-Key": "k-2"}
            )
            async with trio.open_nursery() as nursery:  # the outage known: each at its own phase
                for n in range(5):
                    key = {"Idempotency-Key": f"k-{n + 3}"}
                    nursery.start_soon(
                        partial(_timed, http, "POST", "/order", replies, json=order, headers=key)
                    )
                    await trio.sleep(1.3)
                nursery.start_soon(_timed, http, "GET", "/order/k-1", replies)
            assert [status for status, _ in replies] == [503] * 7
            assert replies[0][1] < 7.0, replies
            assert max(took for _, took in replies[1:]) < 4.0, replies
            proxy.resume()
            with trio.fail_after(15):  # the pool reconnects in the background, with backoff
                for _ in range(30):
                    back = await http.post("/order", json=order, headers={"Idempotency-Key": "k-9"})
                    if back.status_code == 200:
                        break
                    await trio.sleep(0.5)
                else:
                    pytest.fail("the server did not serve again once the database was back")
            assert await server.stop() == 0  # while the proxy forwards: no outage of its own


async def _continue_after(pid: int, seconds: float) -> None:
    await trio.sleep(seconds)
    os.kill(pid, signal.SIGCONT)


@pytest.mark.postgres
async def test_a_store_process_that_answers_nothing_is_taken_for_dead(schema: str) -> None:
    """A store process that answers nothing while a call waits (SIGSTOPped here, which no
    bound of its own can end) is killed after `unresponsive_after`: the call raises
    StoreUnavailable, and the server hears of it through on_store_process_lost, as of a
    store process that died, instead of every caller waiting as long as the stop lasts."""
    lost: list[str] = []
    url = postgres_url(schema=schema)
    async with StoreProcess(url, lost.append, unresponsive_after=1.0) as store:
        await begun(store)
        assert store._process is not None
        pid = store._process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_continue_after, pid, 10.0)  # else today's code waits for ever
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match=r"answered nothing for \d+ s: killed"):
                    await store.get("k-1")
                took = time.monotonic() - started
                nursery.cancel_scope.cancel()
        finally:
            if store._process.returncode is None:
                os.kill(pid, signal.SIGCONT)
        assert 1.0 <= took < 4.0, took
        assert len(lost) == 1
        assert lost[0].startswith("the store process answered nothing for ")
        assert lost[0].endswith(f": killed (exit status {-signal.SIGKILL})")
        assert store._process.returncode == -signal.SIGKILL
        assert not _alive(pid)
        with pytest.raises(StoreUnavailable, match="answered nothing"):
            await store.get("k-1")


async def test_a_store_process_is_not_taken_for_dead_when_the_server_itself_was_paused(
    tmp_path: Path,
) -> None:
    """The server's own loop stops for longer than `unresponsive_after` (SIGSTOP and SIGCONT
    of the server alone, a debugger, a paused container) while the store process's answer
    waits in the socket: once it runs again, the answer is read, and the store process is
    not killed (a first version killed it when the watchdog ran before the reader: Trio
    orders the tasks it wakes together at random, so this pauses five times)."""
    lost: list[str] = []
    paused = 0
    async with StoreProcess(
        f"sqlite:///{tmp_path}/o.db", lost.append, unresponsive_after=1.0
    ) as store:
        await store.get("k-1")  # started, answering
        for _ in range(50):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.get, "k-1")
                await trio.lowlevel.checkpoint()
                if len(store._waiting) == 1:  # sent, its answer not read yet: stop now
                    time.sleep(1.2)  # noqa: ASYNC251 # the Trio thread stops, as the process would
                    paused += 1
            if paused == 5:
                break
    assert paused == 5
    assert lost == []


def test_a_wal_that_cannot_be_opened_is_named_not_the_open_files_limit(tmp_path: Path) -> None:
    """SQLite cannot open a -wal beside the file that is not a file (or another user's, mode
    600): the line names it, not the open-files limit (ample here), nor the directory."""
    path = tmp_path / "orders.db"
    _connect(path, 1.0).close()
    Path(f"{path}-wal").mkdir()
    with pytest.raises(StoreError) as raised:
        _connect(path, 1.0).close()
    assert "ulimit -n" not in str(raised.value), raised.value
    assert f"{path}-wal" in str(raised.value), raised.value
