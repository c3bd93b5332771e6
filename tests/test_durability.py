"""Orders that survive a retry and a crash: Idempotency-Key, lookup, recovery, an unwritable store.

In process, through the app's test client, on real SQLite files in tmp_path.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import attrs
import pytest
import trio
import trio.testing
from werkzeug.datastructures import Headers

from order_pipeline import desk
from order_pipeline.desk import OrderDesk, canonical
from order_pipeline.model import (
    STEP_NAMES,
    Compensation,
    CompensationStatus,
    OrderRequest,
    StepError,
    StepResult,
    StepStatus,
)
from order_pipeline.orchestrator import Step
from order_pipeline.reporting import ORDERS_LOGGER, step_record
from order_pipeline.server import Assembly, Settings, assemble
from order_pipeline.services.vendor import VENDOR_CANCEL_FAILED
from order_pipeline.store import (
    FINISHED,
    RUNNING,
    UNKNOWN_OUTCOME,
    Begun,
    Existing,
    FinishedReply,
    MemoryStore,
    OrderStore,
    SqliteStore,
    StepRecord,
    StoredOrder,
    StoreError,
    StoreUnavailable,
    open_store,
)

from . import pg
from .conftest import make_order
from .pg import postgres_url
from .test_openapi import check
from .test_store import BACKENDS, begun, postgres_store

ORDER: dict[str, Any] = {"order_id": "o-1", "amount": 250}
SLOW = {"payment": 1000, "vendor": 1000, "courier": 1000}
DESK_LOGGER = desk.log.name


@pytest.fixture(name="store")
async def _store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(tmp_path / "orders.db", busy_timeout=0.2) as store:
        yield store


@pytest.fixture(name="assembly")
def _assembly(store: SqliteStore) -> Assembly:
    return assemble(Settings(lease_timeout=2.0), store=store)


async def post(assembly: Assembly, body: Any, key: str | None = None) -> tuple[int, bytes, Headers]:
    headers = {} if key is None else {"Idempotency-Key": key}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await assembly.app.test_client().post("/order", data=data, headers=headers)
    return response.status_code, await response.get_data(as_text=False), response.headers


async def get(assembly: Assembly, path: str) -> tuple[int, dict[str, Any]]:
    response = await assembly.app.test_client().get(path)
    return response.status_code, json.loads(await response.get_data())


async def test_a_retry_gets_the_first_reply_and_runs_nothing(
    assembly: Assembly, store: SqliteStore, autojump_clock: trio.abc.Clock
) -> None:
    """The same key and order again: byte for byte the first reply, marked replayed, no step run."""
    status, body, headers = await post(assembly, ORDER, key="k-1")
    ran_until = trio.current_time()
    # The same order, spelled differently: other key order, other spacing.
    again = b'{ "amount": 250,   "order_id": "o-1" }'

    replay_status, replay_body, replay_headers = await post(assembly, again, key="k-1")

    assert (status, replay_status) == (200, 200)
    assert replay_body == body
    assert replay_headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in headers
    assert headers["Content-Location"] == replay_headers["Content-Location"] == "/order/k-1"
    assert trio.current_time() == ran_until  # no step slept
    assert await store.net_charge("k-1") == 250  # charged once


async def test_a_retry_spelling_a_map_s_keys_in_another_order_is_replayed(
    assembly: Assembly, autojump_clock: trio.abc.Clock
) -> None:
    """The order is compared as parsed, maps included: a retry listing `delay_ms`'s steps in
    another order is the same order (replayed), not another one under the key (422)."""
    first = b'{"order_id": "o-1", "amount": 250, "delay_ms": {"payment": 1, "vendor": 2}}'
    again = b'{"order_id": "o-1", "amount": 250, "delay_ms": {"vendor": 2, "payment": 1}}'
    status, body, _ = await post(assembly, first, key="k-1")

    replay_status, replay_body, headers = await post(assembly, again, key="k-1")

    assert (status, replay_status) == (200, 200)
    assert replay_body == body
    assert headers["Idempotent-Replayed"] == "true"


async def test_a_failure_is_replayed_too(
    assembly: Assembly, store: SqliteStore, autojump_clock: trio.abc.Clock
) -> None:
    """A declined order's retry is the same 400, not a second attempt (Stripe's rule)."""
    declined = {"order_id": "o-2", "amount": 0}
    first = await post(assembly, declined, key="k-2")
    second = await post(assembly, declined, key="k-2")

    assert first[:2] == second[:2]
    assert first[0] == 400
    assert second[2]["Idempotent-Replayed"] == "true"
    assert await store.net_charge("k-2") == 0


async def test_the_same_key_while_running_is_409(assembly: Assembly) -> None:
    """While the first order runs, its key answers 409 order_in_progress with Retry-After."""
    slow = {**ORDER, "delay_ms": SLOW}
    # Real time: the store's thread would let an autojump clock skip the first order's steps.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(post, assembly, slow, "k-3")
        with trio.fail_after(10):  # a first order that failed would leave this waiting
            await assembly.tracker.wait_for(lambda n: n == 3)

        status, body, headers = await post(assembly, slow, key="k-3")

        assert status == 409
        assert json.loads(body)["error"]["kind"] == "order_in_progress"
        assert headers["Retry-After"] == "1"
        assert headers["Content-Location"] == "/order/k-3"
        assert assembly.tracker.in_flight == 3  # nothing more started
        nursery.cancel_scope.cancel()


async def test_the_same_key_for_another_order_is_422(
    assembly: Assembly, store: SqliteStore, autojump_clock: trio.abc.Clock
) -> None:
    """A key sent again with a different order is 422 idempotency_key_reused; nothing runs."""
    await post(assembly, ORDER, key="k-4")
    ran_until = trio.current_time()

    status, body, _ = await post(assembly, {**ORDER, "amount": 251}, key="k-4")

    assert status == 422
    assert json.loads(body)["error"]["kind"] == "idempotency_key_reused"
    assert trio.current_time() == ran_until
    assert await store.net_charge("k-4") == 250
    metrics = assembly.metrics.exposition()[0].decode()
    assert 'orders_total{http_status="422",kind="idempotency_key_reused"} 1.0' in metrics


@pytest.mark.parametrize("key", ["", "x" * 256, "a b", "ключ", "a/b", "a?b"])
async def test_a_malformed_key_is_400_naming_the_header(
    assembly: Assembly, store: SqliteStore, key: str
) -> None:
    """A key outside 1-255 characters of A-Za-z0-9._~:- is refused before anything is stored."""
    response = await assembly.app.test_client().post(
        "/order", json=ORDER, headers={"Idempotency-Key": key}
    )
    body = await response.get_json()

    assert response.status_code == 400
    assert body["error"]["kind"] == "bad_request"
    assert "Idempotency-Key" in body["error"]["message"]
    assert await store.list_orders() == []


async def test_without_a_key_the_server_makes_one(
    assembly: Assembly, autojump_clock: trio.abc.Clock
) -> None:
    """An order without a key gets a fresh one, not its request ID, and can be looked up by it."""
    response = await assembly.app.test_client().post(
        "/order", json=ORDER, headers={"X-Request-ID": "trace-1"}
    )
    location = response.headers["Content-Location"]

    assert response.status_code == 200
    assert location.startswith("/order/")
    assert "trace-1" not in location
    assert await get(assembly, location) == (200, await response.get_json())


async def test_two_keys_are_400_naming_the_header(assembly: Assembly, store: SqliteStore) -> None:
    """Two Idempotency-Key lines (which HTTP reads as one "a, b") are refused, not one of them
    taken: a proxy in between might take the other."""
    response = await assembly.app.test_client().post(
        "/order", json=ORDER, headers=[("Idempotency-Key", "k-a"), ("Idempotency-Key", "k-b")]
    )
    body = await response.get_json()

    assert response.status_code == 400
    assert body["error"] == {"kind": "bad_request", "message": "Idempotency-Key must be given once"}
    assert await store.list_orders() == []


@pytest.mark.parametrize("key", ["a:b~c", "A.b_c-d", "1" * 255, ".", ".."])
async def test_content_location_names_the_key(
    assembly: Assembly, autojump_clock: trio.abc.Clock, key: str
) -> None:
    """Every accepted order's reply says where to look it up, and the lookup finds it; a
    client resolving it (dot-segments: the keys `.` and `..`) gets the same path."""
    status, body, headers = await post(assembly, ORDER, key=key)
    location = headers["Content-Location"]

    assert status == 200
    assert urljoin("http://h/a/b", location) == f"http://h{location}"
    assert await get(assembly, location) == (200, json.loads(body))


async def test_lookup_shows_a_running_order_its_steps_so_far(assembly: Assembly) -> None:
    """While an order runs, GET /order/{key} says running, with each step recorded so far."""
    order = {**ORDER, "delay_ms": {"payment": 0, "vendor": 60_000, "courier": 60_000}}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(post, assembly, order, "k-5")
        await assembly.tracker.wait_for(lambda n: n == 3)
        await assembly.tracker.wait_for(lambda n: n == 2)  # the payment has ended

        status, body = await get(assembly, "/order/k-5")

        assert status == 200
        assert body["status"] == "running"
        assert body["order_id"] == "o-1"
        assert [(s["name"], s["status"]) for s in body["steps"]] == [("payment", "ok")]
        nursery.cancel_scope.cancel()
    status, body = await get(assembly, "/order/k-5")
    assert (status, body["status"], body["error"]["kind"]) == (200, "error", "canceled")


async def test_lookup_of_an_unknown_key_is_404(assembly: Assembly) -> None:
    """An unknown key is 404 not_found."""
    status, body = await get(assembly, "/order/nobody")

    assert status == 404
    assert body["error"] == {"kind": "not_found", "message": "no order with this key"}


async def orphan(store: OrderStore, key: str, charged: bool) -> str:
    """An order left running by a process that died after its payment (or before any step)."""
    order = make_order("o-orphan", amount=70)
    body = canonical(order)
    request_hash = hashlib.sha256(body).hexdigest()
    begun = await store.begin(key, order.order_id, request_hash, body, "dead-process")
    assert isinstance(begun, Begun)
    if charged:
        await store.charge(begun.order.attempt_id, key, 70)
        store.record_step(key, begun.order.attempt_id, StepRecord("payment", "ok", None, 150))
    return begun.order.attempt_id


@pytest.mark.parametrize("charged", [True, False])
async def test_an_orphaned_order_is_undone_within_the_lease_and_can_be_sent_again(
    assembly: Assembly, store: SqliteStore, autojump_clock: trio.abc.Clock, charged: bool
) -> None:
    """A dead process's order is claimed, refunded and recorded interrupted; a retry runs it."""
    await orphan(store, "k-6", charged)
    assert await store.net_charge("k-6") == (70 if charged else 0)

    async with trio.open_nursery() as nursery:
        await nursery.start(assembly.desk.maintain)
        await trio.sleep(2)  # its owner never held a lease: the first round claims it
        nursery.cancel_scope.cancel()
    stored = await store.get("k-6")

    assert stored is not None
    assert (stored.state, stored.kind, stored.http_status) == (FINISHED, "interrupted", 503)
    assert await store.net_charge("k-6") == 0
    # Every step is undone: a step with no record may have taken effect.
    assert {s.step: s.compensation for s in stored.steps} == dict.fromkeys(STEP_NAMES, "ok")

    status, body, headers = await post(assembly, make_order_body(), key="k-6")

    assert status == 200
    assert "Idempotent-Replayed" not in headers
    assert json.loads(body)["status"] == "ok"
    assert await store.net_charge("k-6") == 70
    assert (await store.get("k-6")).attempt == 2  # type: ignore[union-attr] # it exists


@pytest.mark.parametrize("fails_again", [False, True])
@pytest.mark.parametrize("paid", ["ok", "error"])
async def test_a_refund_that_failed_before_the_crash_is_tried_again(
    assembly: Assembly,
    store: SqliteStore,
    autojump_clock: trio.abc.Clock,
    fails_again: bool,
    paid: str,
) -> None:
    """A dead process's order whose refund had failed (recorded) is not taken as undone:
    recovery refunds it again; if that fails too, the order is compensation_failed, needs
    attention, and its key replays that (never a second charge). So too for a payment that
    failed but may have charged (its error said so: it is refunded), whose refund failed."""
    order = make_order("o-orphan", amount=70, fail_compensation="payment" if fails_again else None)
    body = canonical(order)
    begun = await store.begin(
        "k-12", order.order_id, hashlib.sha256(body).hexdigest(), body, "dead-process"
    )
    assert isinstance(begun, Begun)
    await store.charge(begun.order.attempt_id, "k-12", 70)
    detail = "store_unavailable" if paid == "error" else None
    failed_refund = StepRecord("payment", paid, detail, 150, "error", 80)
    store.record_step("k-12", begun.order.attempt_id, failed_refund)

    async with trio.open_nursery() as nursery:
        await nursery.start(assembly.desk.maintain)
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    stored = await store.get("k-12")
    status, reply, headers = await post(assembly, body, key="k-12")

    assert stored is not None
    payment = {s.step: s for s in stored.steps}["payment"]
    assert (payment.status, payment.detail) == (paid, detail)  # recorded as it ended
    if fails_again:
        assert (stored.kind, payment.compensation, stored.needs_attention) == (
            "compensation_failed", "error", True
        )  # fmt: skip
        assert await store.net_charge("k-12") == 70  # held, for a person to give back
        assert (status, headers["Idempotent-Replayed"]) == (500, "true")
        assert json.loads(reply)["error"]["kind"] == "compensation_failed"
    else:
        assert (stored.kind, payment.compensation) == ("interrupted", "ok")
        assert (status, json.loads(reply)["status"]) == (200, "ok")  # run again: charged once
        assert await store.net_charge("k-12") == 70


async def test_a_charge_whose_outcome_is_unknown_is_refunded(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """The ledger's charge committed but its caller was told the store failed, not knowing
    whether it had (a PostgreSQL COMMIT whose answer was lost): the order fails as
    store_unavailable and the payment is refunded, so no money is held for a failed order."""
    async with SqliteStore(tmp_path / "orders.db") as store:
        charge = store.charge

        async def charged_but_answer_lost(charge_id: str, key: str, amount: int) -> None:
            await charge(charge_id, key, amount)
            lost = StoreUnavailable("connection lost while committing (unknown: a test's)")
            lost.may_have_taken_effect = True
            raise lost

        store.charge = charged_but_answer_lost  # type: ignore[method-assign] # the ledger's
        assembly = assemble(Settings(), store=store)

        status, body, _ = await post(assembly, ORDER, key="k-lost")

        reply = json.loads(body)
        assert (status, reply["error"]["kind"]) == (503, "store_unavailable")
        payment = {s["name"]: s for s in reply["steps"]}["payment"]
        assert payment["status"] == "error"
        assert payment["compensation"]["status"] == "ok"
        assert await store.net_charge("k-lost") == 0


def make_order_body() -> bytes:
    return canonical(make_order("o-orphan", amount=70))


async def test_a_live_process_s_orders_are_not_claimed(
    assembly: Assembly, store: SqliteStore, autojump_clock: trio.abc.Clock
) -> None:
    """A running order whose owner renews its lease is left alone by other processes."""
    await orphan(store, "k-7", charged=True)
    await store.renew_lease("dead-process", 3600)  # not dead after all

    async with trio.open_nursery() as nursery:
        await nursery.start(assembly.desk.maintain)
        await trio.sleep(5)
        nursery.cancel_scope.cancel()

    stored = await store.get("k-7")
    assert stored is not None
    assert (stored.state, stored.owner) == (RUNNING, "dead-process")
    assert await store.net_charge("k-7") == 70


async def test_an_unwritable_store_refuses_new_orders_and_recovers(
    assembly: Assembly, store: SqliteStore, tmp_path: Path
) -> None:
    """While another writer holds the file, new orders get 503 store_unavailable; then they run."""
    fast = {**ORDER, "delay_ms": dict.fromkeys(STEP_NAMES, 0)}
    blocker = sqlite3.connect(tmp_path / "orders.db", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        status, body, headers = await post(assembly, fast, key="k-8")
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()

    assert status == 503
    assert json.loads(body)["error"]["kind"] == "store_unavailable"
    assert headers["Retry-After"] == "1"

    status, body, _ = await post(assembly, fast, key="k-8")

    assert status == 200
    assert await store.net_charge("k-8") == 250


async def test_finished_orders_are_forgotten_after_the_retention(store: SqliteStore) -> None:
    """Past `--retention`, a finished order is deleted and its key runs a new order."""
    assembly = assemble(Settings(retention=0.05), store=store)
    fast = {**ORDER, "delay_ms": dict.fromkeys(STEP_NAMES, 0)}
    assert (await post(assembly, fast, key="k-9"))[0] == 200

    async with trio.open_nursery() as nursery:
        await nursery.start(assembly.desk.maintain)
        with trio.fail_after(5):
            while await store.get("k-9") is not None:  # noqa: ASYNC110 # the purge is a loop of its own
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()

    status, _, headers = await post(assembly, {**fast, "amount": 9}, key="k-9")
    assert status == 200
    assert "Idempotent-Replayed" not in headers
    assert await store.net_charge("k-9") == 9


async def post_holding_the_file(
    assembly: Assembly,
    tmp_path: Path,
    order: dict[str, Any],
    key: str,
    ready: Callable[[], Awaitable[None]],
) -> tuple[int, bytes, Headers]:
    """POST `order` under `key`; once `ready()` returns, another writer holds the store's file
    until the reply has come. Real time: the store's thread would let an autojump clock skip
    the order's steps."""
    answers: list[tuple[int, bytes, Headers]] = []

    async def first_post() -> None:
        answers.append(await post(assembly, order, key=key))

    blocker = sqlite3.connect(tmp_path / "orders.db", isolation_level=None)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first_post)
            await ready()
            blocker.execute("BEGIN IMMEDIATE")
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()
    [answer] = answers
    return answer


async def test_a_reply_the_store_could_not_take_is_refused_then_recorded(
    assembly: Assembly, store: SqliteStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An order whose final record cannot be committed is answered 503 store_unavailable,
    never with a reply its retry would not find; the store keeps the record, the next commit
    carries it once the store takes writes again, and the retry replays it: charged once.
    The order has its one line (and count), not a second one as if refused."""
    order = {**ORDER, "delay_ms": {"payment": 0, "vendor": 0, "courier": 300}}

    async def charged() -> None:  # then the courier runs
        with trio.fail_after(5):
            while await store.net_charge("k-10") == 0:  # noqa: ASYNC110 # another thread's
                await trio.sleep(0.01)

    with caplog.at_level(logging.INFO, logger=ORDERS_LOGGER):
        status, body, headers = await post_holding_the_file(
            assembly, tmp_path, order, "k-10", charged
        )

    lines = [r.getMessage() for r in caplog.records if r.name == ORDERS_LOGGER]
    assert len(lines) == 1, lines
    assert lines[0].startswith("order o-1 ok 200 in ")
    assert status == 503
    assert json.loads(body)["error"]["kind"] == "store_unavailable"
    assert headers["Retry-After"] == "1"
    stored = await store.get("k-10")  # the first call since: it carries the record
    assert stored is not None
    assert (stored.state, stored.http_status) == (FINISHED, 200)

    status, body, headers = await post(assembly, order, key="k-10")

    assert status == 200
    assert headers["Idempotent-Replayed"] == "true"
    assert json.loads(body)["status"] == "ok"
    assert await store.net_charge("k-10") == 250


async def test_retries_of_an_interrupted_order_at_once_run_it_once(
    assembly: Assembly, store: SqliteStore, autojump_clock: trio.abc.Clock
) -> None:
    """Eight retries of an interrupted order's key at the same moment: one new attempt runs;
    the others are told it is in progress (or replayed its reply, once it finished)."""
    await orphan(store, "k-11", charged=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(assembly.desk.maintain)
        await trio.sleep(2)  # recovered: interrupted, refunded
        nursery.cancel_scope.cancel()
    answers: list[tuple[int, bytes, Headers]] = []

    async def retry() -> None:
        answers.append(await post(assembly, make_order_body(), key="k-11"))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(retry)

    ran = [a for a in answers if a[0] == 200 and "Idempotent-Replayed" not in a[2]]
    others = sorted(
        "replayed" if a[0] == 200 else json.loads(a[1])["error"]["kind"]
        for a in answers
        if a not in ran
    )
    assert len(ran) == 1
    assert set(others) <= {"order_in_progress", "replayed"}
    assert len(others) == 7
    assert await store.net_charge("k-11") == 70
    assert (await store.get("k-11")).attempt == 2  # type: ignore[union-attr] # it exists


class _RacedStore(SqliteStore):
    """A real SQLite store where, each time this process goes to restart an interrupted key,
    another process has just restarted it, been interrupted again and been undone; the third
    time, the order was then forgotten (retention) too, so the key is new again."""

    races = 0
    forgotten_at = desk.RESTART_TRIES  # the race after which the key is forgotten

    async def restart(self, key: str, owner: str, expected_attempt: int) -> StoredOrder | None:
        self.races += 1
        other = await super().restart(key, "other", expected_attempt)
        assert other is not None
        await self.finish(key, other.attempt_id, 503, b"{}", "interrupted")
        if self.races == self.forgotten_at:
            assert await self.purge(-1.0, 10) == 1
        return await super().restart(key, owner, expected_attempt)  # None: the attempt moved


async def test_a_key_freed_as_the_last_restart_try_loses_its_race_is_run(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """The last of the desk's tries to restart an interrupted key finds it forgotten, and
    begins it anew: that order runs (it was begun, then left running unrun, answered 409,
    until this process's recovery undid it seconds later)."""
    async with _RacedStore(tmp_path / "orders.db") as store:
        attempt_id = await orphan(store, "k-1", charged=False)
        await store.finish("k-1", attempt_id, 503, b"{}", "interrupted")
        assembly = assemble(Settings(), store=store)

        status, body, _ = await post(assembly, make_order_body(), key="k-1")

        assert store.races == desk.RESTART_TRIES
        assert (status, json.loads(body)["status"]) == (200, "ok")
        assert await store.net_charge("k-1") == 70
        stored = await store.get("k-1")
        assert stored is not None
        assert (stored.state, stored.attempt) == (FINISHED, 1)


class _AlwaysRaced(_RacedStore):
    """As _RacedStore, but the key is never forgotten: every restart loses its race."""

    forgotten_at = 0


async def test_an_interrupted_key_whose_every_restart_loses_its_race_is_409(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """Each of the desk's tries to restart an interrupted key finds another process restarted
    it first (and was interrupted again): after the last, the retry is told the order is in
    progress (409, Retry-After, naming the order), and runs nothing."""
    async with _AlwaysRaced(tmp_path / "orders.db") as store:
        attempt_id = await orphan(store, "k-1", charged=False)
        await store.finish("k-1", attempt_id, 503, b"{}", "interrupted")
        assembly = assemble(Settings(), store=store)

        status, body, headers = await post(assembly, make_order_body(), key="k-1")

        assert store.races == desk.RESTART_TRIES
        assert (status, json.loads(body)["error"]["kind"]) == (409, "order_in_progress")
        assert json.loads(body)["order_id"] == "o-orphan"
        assert headers["Retry-After"] == "1"
        assert headers["Content-Location"] == "/order/k-1"
        assert await store.net_charge("k-1") == 0


async def test_a_cancelled_order_s_record_survives_a_moment_s_outage(
    assembly: Assembly, store: SqliteStore, tmp_path: Path
) -> None:
    """A client leaves while another writer holds the file: the order's final record (which
    rides on the next commit, the lease renewal's) cannot be committed then, and is held
    again until it can; the order does not stay running under this live process's lease."""
    order = make_order("o-c", amount=70, delay_ms=dict.fromkeys(STEP_NAMES, 1000))
    blocker = sqlite3.connect(tmp_path / "orders.db", isolation_level=None)
    try:
        # Real time: the store's thread would let an autojump clock skip the steps.
        async with trio.open_nursery() as nursery:
            await nursery.start(assembly.desk.maintain)
            request = trio.CancelScope()  # the HTTP request's
            ended = trio.Event()

            async def client() -> None:
                with request:
                    await assembly.desk.submit(order, "k-13")
                ended.set()

            nursery.start_soon(client)
            await assembly.tracker.wait_for(lambda n: n == 3)
            blocker.execute("BEGIN IMMEDIATE")
            request.cancel()  # the client leaves
            await ended.wait()  # undone: the record queued
            with pytest.raises(StoreUnavailable):  # a commit carries it (a renewal's, or this)
                await store.get("k-13")
            blocker.execute("ROLLBACK")
            with trio.fail_after(5):
                while (await store.get("k-13")).state == RUNNING:  # type: ignore[union-attr] # noqa: ASYNC110
                    await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    finally:
        blocker.close()
    stored = await store.get("k-13")

    assert stored is not None
    assert (stored.state, stored.kind) == (FINISHED, "canceled")
    assert await store.net_charge("k-13") == 0


async def test_a_store_outage_during_the_payment_is_503_store_unavailable(
    assembly: Assembly, store: SqliteStore, tmp_path: Path
) -> None:
    """The payment's ledger (in the store) cannot be written when the charge is made: the order
    fails as 503 store_unavailable (not as a bug of ours, a 500 with a traceback), undone, and
    its key replays that, as every failure (the charge may have committed unbeknown: run
    again, it could be taken twice)."""
    order = {**ORDER, "delay_ms": {"payment": 300, "vendor": 0, "courier": 0}}

    async def begun() -> None:  # the steps run: the payment charges at 300 ms
        await assembly.tracker.wait_for(lambda n: n > 0)

    status, body, headers = await post_holding_the_file(assembly, tmp_path, order, "k-14", begun)

    assert (status, json.loads(body)["error"]["kind"]) == (503, "store_unavailable")
    assert headers["Retry-After"] == "1"
    stored = await store.get("k-14")  # carries the order's final record
    assert stored is not None
    assert (stored.state, stored.kind) == (FINISHED, "store_unavailable")
    assert await store.net_charge("k-14") == 0

    status, body, headers = await post(assembly, order, key="k-14")

    assert (status, json.loads(body)["error"]["kind"]) == (503, "store_unavailable")
    assert headers["Idempotent-Replayed"] == "true"
    assert await store.net_charge("k-14") == 0


async def test_an_interrupted_order_this_version_cannot_read_is_left_for_an_operator(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An interrupted order whose body this version cannot parse (a newer version's field, a
    damaged record) is recorded compensation_failed for an operator; recovery, the lease and
    the other orders' recovery go on (it ended the process before, in every restart). Its
    lookup, with no step known, is an answer the OpenAPI document allows. The error logged
    names its key and why, without a traceback (the record's fault, not a bug)."""
    store = MemoryStore()
    await store.begin("k-new", "o-1", "h", b'{"order_id": "o-1", "amount": 5, "tip": 1}', "gone")
    body = canonical(make_order("o-2", amount=5))
    await store.begin("k-old", "o-2", "h", body, "gone")
    assembly = assemble(Settings(), store=store)
    desk = assembly.desk

    with caplog.at_level(logging.ERROR, logger=DESK_LOGGER):
        async with trio.open_nursery() as nursery:
            await nursery.start(desk.maintain)
            await trio.sleep(5)
            nursery.cancel_scope.cancel()

    [error] = [r for r in caplog.records if r.name == DESK_LOGGER]
    assert error.getMessage() == (
        "interrupted order 'k-new' cannot be undone by this process: unknown field(s): 'tip' @ $"
    )
    assert not error.exc_info
    unreadable, undone = await store.get("k-new"), await store.get("k-old")
    assert unreadable is not None
    assert undone is not None
    assert (unreadable.state, unreadable.kind) == (FINISHED, "compensation_failed")
    assert (undone.state, undone.kind) == (FINISHED, "interrupted")
    attention = await store.list_orders(needs_attention=True)
    assert [o.key for o, _ in attention] == ["k-new"]
    response = await assembly.app.test_client().get("/order/k-new")
    reply = await response.get_data(as_text=False)
    check("GET", "/order/{key}", response.status_code, reply, response.content_type)
    assert json.loads(reply)["steps"] == []


async def test_an_interrupted_order_that_meets_a_bug_is_logged_with_its_traceback(
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unlike a record this version cannot read, a bug met while reading an interrupted order
    is logged with its traceback, for the one who fixes it; the order is still left for an
    operator, and recovery goes on."""

    def broken(body: bytes) -> OrderRequest:
        raise RuntimeError("a bug")

    monkeypatch.setattr(desk, "parse_order", broken)
    store = MemoryStore()
    await store.begin("k-1", "o-1", "h", canonical(make_order("o-1", amount=5)), "gone")
    recovering = assemble(Settings(), store=store).desk

    with caplog.at_level(logging.ERROR, logger=DESK_LOGGER):
        async with trio.open_nursery() as nursery:
            await nursery.start(recovering.maintain)
            await trio.sleep(5)
            nursery.cancel_scope.cancel()

    [error] = [r for r in caplog.records if r.name == DESK_LOGGER]
    assert error.getMessage() == "interrupted order 'k-1' cannot be undone by this process: a bug"
    assert error.exc_info is not None
    assert error.exc_info[0] is RuntimeError
    stored = await store.get("k-1")
    assert stored is not None
    assert (stored.state, stored.kind) == (FINISHED, "compensation_failed")


def _noting(desk: OrderDesk, events: list[tuple[str, str]]) -> OrderDesk:
    """`desk` with each step and compensation of its pipeline noting when it took effect."""

    def noted(action: Callable[[OrderRequest], Awaitable[None]], name: str, what: str) -> Any:
        async def run(order: OrderRequest) -> None:
            await action(order)
            events.append((name, what))

        return run

    steps = [
        Step(
            s.name,
            noted(s.run, s.name, "done"),
            s.compensate and noted(s.compensate, s.name, "undone"),
        )
        for s in desk.pipeline.steps
    ]
    return attrs.evolve(desk, pipeline=attrs.evolve(desk.pipeline, steps=steps))


async def test_an_order_taken_over_while_it_runs_is_undone_by_its_first_process_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A process whose lease lapsed while it still ran an order (a stall, an outage) has the
    order claimed and undone by another; a step of its own run that took effect after that
    (the vendor, here) is undone by it before it answers: nothing stays in effect."""
    store = MemoryStore()
    events: list[tuple[str, str]] = []
    first = _noting(assemble(Settings(), store=store).desk, events)  # it holds no lease
    claimer = _noting(assemble(Settings(), store=store).desk, events)
    order = make_order("o-1", amount=70, delay_ms={"vendor": 3000})
    answers: list[desk.Answer] = []

    async def send() -> None:
        answers.append(await first.submit(order, "k-1"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        await trio.sleep(0.5)  # payment and courier done, the vendor not yet
        await nursery.start(claimer.maintain)
        while not answers:  # noqa: ASYNC110 # the first process's own end, at 3 s
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()

    assert ("vendor", "done") in events
    last = dict(events)  # what each step was left at, the last word for each
    assert last == dict.fromkeys(STEP_NAMES, "undone")
    assert answers[0].status in (409, 503)
    assert await store.net_charge("k-1") == 0


async def test_a_taken_over_order_retried_meanwhile_is_left_to_its_retry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Taken over and undone, the order is retried (attempt 2, on the claimer) before the first
    process's run ends: that process undoes nothing then, since the vendor's and the courier's
    compensations act on the order, and would undo the retry's, answered 200."""
    store = MemoryStore()
    events: list[tuple[str, str]] = []
    first = _noting(assemble(Settings(), store=store).desk, events)  # it holds no lease
    claimer = _noting(assemble(Settings(), store=store).desk, events)
    order = make_order("o-1", amount=70, delay_ms={"vendor": 3000})
    answers: dict[str, desk.Answer] = {}

    async def send(desk: OrderDesk, who: str) -> None:
        answers[who] = await desk.submit(order, "k-1")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, first, "first")
        await trio.sleep(0.5)
        await nursery.start(claimer.maintain)  # claims and undoes k-1 at once
        while (await store.get("k-1")).kind != "interrupted":  # type: ignore[union-attr] # noqa: ASYNC110
            await trio.sleep(0.05)
        nursery.start_soon(send, claimer, "retry")
        while len(answers) < 2:  # noqa: ASYNC110 # the first's run ends at 3 s, the retry's at 3.5
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()

    assert answers["retry"].status == 200
    assert dict(events) == dict.fromkeys(STEP_NAMES, "done")  # the retry's steps stand
    assert await store.net_charge("k-1") == 70


async def claimed_partly_undone_and_left(store: OrderStore, key: str, claimer: str) -> None:
    """`claimer` claims `key`'s order, refunds its payment, records that, and dies (it never
    held a lease): the order is left running under a dead owner, partly undone."""
    (claimed,) = await store.claim_interrupted(claimer, 10)
    assert claimed.key == key
    await store.refund(claimed.attempt_id, key)
    refunded = StepResult(
        "payment", StepStatus.OK, 150, None, Compensation(CompensationStatus.OK, 80)
    )
    store.record_step(key, claimed.attempt_id, step_record(refunded), owner=claimer)


@pytest.mark.parametrize(
    "vendor_ms",
    [
        2000,  # the run ends while the recovery undoes: its `ok` would land, and be answered
        6000,  # the run ends after the recovery: its vendor step would stay in effect
    ],
)
async def test_an_order_its_own_run_still_runs_is_not_claimed_back_under_it(
    autojump_clock: trio.testing.MockClock, vendor_ms: int
) -> None:
    """A process's lease lapses (an outage) while it runs an order; another claims the order,
    refunds its payment and dies. Back, the first process's recovery must not claim the order
    back while its own run goes on: it would undo it under the run, whose later steps then
    stay in effect, and whose final record (its owner the run's own again) would land. The
    run ends taken over (409) and undoes its steps; the recovery then claims the order and
    records it interrupted: every step undone, no money taken, no ok answered."""
    store = MemoryStore()
    events: list[tuple[str, str]] = []
    first = _noting(assemble(Settings(lease_timeout=2.0), store=store).desk, events)
    order = make_order(
        "o-1",
        amount=70,
        delay_ms={"vendor": vendor_ms},
        compensation_delay_ms={"vendor": 3000},
    )
    answers: list[desk.Answer] = []

    async def send() -> None:
        answers.append(await first.submit(order, "k-1"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)  # the first process holds no lease yet: its outage
        await trio.sleep(0.5)  # payment and courier done, the vendor not yet
        await claimed_partly_undone_and_left(store, "k-1", "dead-claimer")
        await nursery.start(first.maintain)  # the outage is over; its run goes on
        while not answers or (await store.get("k-1")).state == RUNNING:  # type: ignore[union-attr] # noqa: ASYNC110
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    stored = await store.get("k-1")

    assert stored is not None
    assert (stored.kind, stored.owner) == ("interrupted", first.owner)
    assert ("vendor", "done") in events
    assert dict(events) == dict.fromkeys(STEP_NAMES, "undone")  # the last word for each
    assert await store.net_charge("k-1") == 0
    [answer] = answers
    assert (answer.status, json.loads(answer.body)["error"]["kind"]) == (409, "order_in_progress")


class _SlowBegin(MemoryStore):
    """The memory store, whose `begin` answers after `delay` s (50 ms: a busy database's)."""

    def __init__(self, delay: float = 0.05) -> None:
        super().__init__()
        self.delay = delay

    async def begin(
        self, key: str, order_id: str, request_hash: str, body: bytes, owner: str
    ) -> Begun | Existing:
        await trio.sleep(self.delay)
        return await super().begin(key, order_id, request_hash, body, owner)


async def test_a_dead_process_order_whose_client_keeps_retrying_is_recovered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A process died running an order; its client retries the key at another process as soon
    as each 409 comes back. A retry in flight (its `begin` under way) is no run of the order:
    the recovery claims the order all the same, undoes it, and a retry then runs it again."""
    store = _SlowBegin()
    order = make_order("o-1", amount=70)
    body = canonical(order)
    dead = await store.begin("k-1", "o-1", hashlib.sha256(body).hexdigest(), body, "dead")
    assert isinstance(dead, Begun)
    live = assemble(Settings(lease_timeout=2.0), store=store).desk
    statuses: list[int] = []

    async def retry_until_answered() -> None:
        while not statuses or statuses[-1] == 409:
            statuses.append((await live.submit(order, "k-1")).status)

    async with trio.open_nursery() as nursery:
        await nursery.start(live.maintain)
        with trio.move_on_after(30):
            await retry_until_answered()
        nursery.cancel_scope.cancel()

    assert statuses[-1] == 200, f"{statuses.count(409)} answers 409 in 30 s, never run"
    stored = await store.get("k-1")
    assert stored is not None
    assert (stored.state, stored.http_status, stored.attempt) == (FINISHED, 200, 2)


async def test_a_backlog_of_expired_orders_is_forgotten_a_batch_at_a_time(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many orders expired, each purge deletes a batch (one short transaction, so the
    commits of the orders being served are not held behind it), until none is left."""
    monkeypatch.setattr(desk, "PURGE_BATCH", 2)
    assembly = assemble(Settings(retention=0.05), store=store)
    fast = {**ORDER, "delay_ms": dict.fromkeys(STEP_NAMES, 0)}
    for n in range(5):
        assert (await post(assembly, fast, key=f"k-{n}"))[0] == 200
    batches: list[int] = []
    purge = store.purge

    async def counted_purge(older_than: float, limit: int) -> int:
        batches.append(await purge(older_than, limit))
        return batches[-1]

    monkeypatch.setattr(store, "purge", counted_purge)
    await trio.sleep(0.1)  # ages are on the store's clock: real time, past the 0.05 s retention

    with trio.fail_after(5):  # real time: a wrong pause between batches would never end
        assert await assembly.desk.forget_expired() == 5
    assert batches == [2, 2, 1]
    assert await store.list_orders() == []


async def five_finished_orders() -> MemoryStore:
    """A store of five orders finished a minute ago (keys k-0 to k-4), to be purged in
    batches: expired under a shorter retention with no wait, whatever the clock (the store's
    is the wall clock, which an autojump clock does not move)."""
    store = MemoryStore()
    for n in range(5):
        order = await begun(store, f"k-{n}")
        await store.finish(f"k-{n}", order.attempt_id, 200, b"{}", None)
        done = store._orders[f"k-{n}"]
        assert done.finished_at is not None
        store._orders[f"k-{n}"] = attrs.evolve(done, finished_at=done.finished_at - 60)
    return store


async def test_a_backlog_leaves_the_store_to_the_orders_half_the_time(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between two batches of a backlog the purge waits as long as the last batch took, so
    the orders being served have the store's writer at least half the time. Back to back,
    a backlog of 958,000 orders (a retention shortened on a store of a million) held the
    SQLite writer for 75 s, the orders' median 6 ms to 220-370 ms meanwhile."""
    monkeypatch.setattr(desk, "PURGE_BATCH", 2)
    store = await five_finished_orders()
    purge = store.purge
    batches: list[tuple[float, float]] = []

    async def slow_purge(older_than: float, limit: int) -> int:
        started = trio.current_time()
        await trio.sleep(0.07 * (len(batches) + 1))  # a batch's cost, each longer
        batches.append((started, trio.current_time()))
        return await purge(older_than, limit)

    monkeypatch.setattr(store, "purge", slow_purge)
    forgetting = assemble(Settings(retention=0.001), store=store).desk

    assert await forgetting.forget_expired() == 5
    assert len(batches) == 3
    for (started, ended), (next_started, _) in itertools.pairwise(batches):
        assert next_started - ended == pytest.approx(ended - started)


async def test_a_tiny_retention_purges_once_a_second(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retention of a microsecond forgets orders at once, not in a loop that keeps the
    store busy: the purge runs at most once a second."""
    store = MemoryStore()
    purges = 0
    purge = store.purge

    async def counted_purge(older_than: float, limit: int) -> int:
        nonlocal purges
        purges += 1
        assert purges < 100, "the purge spins"
        return await purge(older_than, limit)

    monkeypatch.setattr(store, "purge", counted_purge)
    assembly = assemble(Settings(retention=1e-6), store=store)
    async with trio.open_nursery() as nursery:
        await nursery.start(assembly.desk.maintain)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()

    assert 10 <= purges <= 11


async def test_an_order_this_process_left_running_is_recovered_by_it(
    store: SqliteStore, tmp_path: Path
) -> None:
    """An order committed under this process although its call was told it failed (a COMMIT
    whose answer was lost): nothing here runs it, and its owner's lease is alive, so no other
    process recovers it. Its own process does (seen twice, a second apart), while an order
    it does run, as old, is left alone."""
    assembly = assemble(Settings(lease_timeout=0.6), store=store)
    left = make_order("o-left", amount=70)
    body = canonical(left)
    begun = await store.begin(
        "k-15", left.order_id, hashlib.sha256(body).hexdigest(), body, assembly.desk.owner
    )
    assert isinstance(begun, Begun)
    await store.charge(begun.order.attempt_id, "k-15", 70)
    slow = {**ORDER, "delay_ms": {"payment": 0, "vendor": 0, "courier": 3000}}
    answers: list[tuple[int, bytes, Headers]] = []

    async def slow_order() -> None:
        answers.append(await post(assembly, slow, key="k-16"))

    # Real time: the store's clock is.
    async with trio.open_nursery() as nursery:
        await nursery.start(assembly.desk.maintain)
        nursery.start_soon(slow_order)
        with trio.fail_after(10):
            while (await store.get("k-15")).state == RUNNING:  # type: ignore[union-attr] # noqa: ASYNC110
                await trio.sleep(0.1)
            while not answers:  # noqa: ASYNC110 # the slow order's own end
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    stored = await store.get("k-15")

    assert stored is not None
    assert (stored.kind, stored.owner) == ("interrupted", assembly.desk.owner)
    assert await store.net_charge("k-15") == 0
    [(status, reply, _)] = answers
    assert (status, json.loads(reply)["status"]) == (200, "ok")
    assert await store.net_charge("k-16") == 250


async def left_running(store: MemoryStore, owner: str, key: str) -> None:
    """An order of `owner`'s under `key`, charged 70, begun a minute ago, that nothing runs
    (its process left it: its task gone, its final record lost)."""
    left = make_order("o-left", amount=70)
    body = canonical(left)
    begun = await store.begin(key, left.order_id, hashlib.sha256(body).hexdigest(), body, owner)
    assert isinstance(begun, Begun)
    await store.charge(begun.order.attempt_id, key, 70)
    store._orders[key] = attrs.evolve(begun.order, started_at=begun.order.started_at - 60)


async def test_an_order_of_its_own_left_running_is_recovered_only_when_seen_twice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An order of this process's, running, old, that nothing here runs: seen once, it may be
    one whose final record is on its way to the store, so it is left; seen again a second
    later, it is undone."""
    store = MemoryStore()
    desk = assemble(Settings(lease_timeout=2.0), store=store).desk
    await left_running(store, desk.owner, "k-1")

    async with trio.open_nursery() as nursery:
        await nursery.start(desk.maintain)  # its first look at once
        await trio.sleep(0.5)
        seen_once = await store.get("k-1")
        charged_then = await store.net_charge("k-1")
        await trio.sleep(1.0)  # its second look, a second after the first
        seen_twice = await store.get("k-1")
        nursery.cancel_scope.cancel()

    assert seen_once is not None
    assert (seen_once.state, charged_then) == (RUNNING, 70)
    assert seen_twice is not None
    assert seen_twice.kind == "interrupted"
    assert await store.net_charge("k-1") == 0


@pytest.mark.parametrize(
    ("begin_delay", "retrying_for"),
    [(0.05, 5.0), (2.5, 30.0)],
    ids=["begin in 50 ms", "begin outlasting a look"],
)
async def test_an_order_of_its_own_left_running_whose_client_keeps_retrying_is_recovered(
    autojump_clock: trio.testing.MockClock, begin_delay: float, retrying_for: float
) -> None:
    """An order of this process's left running (a begin whose COMMIT answer was lost), its
    client retrying the key as soon as each 409 comes back. A retry in flight (its `begin`
    under way) only reads an order begun before it: this process recovers the order all the
    same, within its two looks, and a retry then runs it again, charged once. Also where
    each `begin` answers in 2.5 s (one waiting for a row lock), longer than the time between
    two looks: some retry is under way at every look, begun before the one before, but none
    began before the order existed, so none can be its submit."""
    store = _SlowBegin(begin_delay)
    live = assemble(Settings(lease_timeout=2.0), store=store).desk
    await left_running(store, live.owner, "k-1")
    order = make_order("o-left", amount=70)
    statuses: list[int] = []

    async def retry_until_answered() -> None:
        while not statuses or statuses[-1] == 409:
            statuses.append((await live.submit(order, "k-1")).status)

    async with trio.open_nursery() as nursery:
        await nursery.start(live.maintain)
        with trio.move_on_after(retrying_for):
            await retry_until_answered()
        nursery.cancel_scope.cancel()

    assert statuses[-1] == 200, (
        f"{statuses.count(409)} answers 409 in {retrying_for:g} s, never run"
    )
    stored = await store.get("k-1")
    assert stored is not None
    assert (stored.state, stored.http_status, stored.attempt) == (FINISHED, 200, 2)
    assert await store.net_charge("k-1") == 70


class _BeginAnsweredLate(MemoryStore):
    """The memory store, whose `begin` of a new order commits at once, the order begun a
    minute ago as far as the store's clock goes (the autojump clock is not it), and answers
    `answered_in` (3 s) later; of an order there already, `existing_in` (at once) later."""

    answered_in = 3.0
    existing_in = 0.0

    async def begin(
        self, key: str, order_id: str, request_hash: str, body: bytes, owner: str
    ) -> Begun | Existing:
        answer = await super().begin(key, order_id, request_hash, body, owner)
        if isinstance(answer, Begun):
            self._orders[key] = attrs.evolve(answer.order, started_at=answer.order.started_at - 60)
            await trio.sleep(self.answered_in)
        elif self.existing_in:
            await trio.sleep(self.existing_in)
        return answer


@pytest.mark.parametrize("sent_after", [0.0, 0.5])
async def test_an_order_whose_begin_answers_late_is_left_to_its_submit(
    autojump_clock: trio.testing.MockClock, sent_after: float
) -> None:
    """An order whose begin committed but has not answered yet, for three looks at the orders
    this process left running, while its client's retries are answered 409: its submit may
    still run it, so it is not recovered under it; it runs ok, charged once. Its submit sent
    with the first look, or between two (begun after one, the order read by the next)."""
    store = _BeginAnsweredLate()
    serving = assemble(Settings(lease_timeout=2.0), store=store).desk
    order = make_order("o-1", amount=70, delay_ms=dict.fromkeys(STEP_NAMES, 0))
    answers: list[desk.Answer] = []

    async def send() -> None:
        answers.append(await serving.submit(order, "k-1"))

    async with trio.open_nursery() as nursery:
        await nursery.start(serving.maintain)
        await trio.sleep(sent_after)
        nursery.start_soon(send)
        retries: set[int] = set()
        with trio.move_on_after(2.5):  # the begin answers at 3 s
            while True:
                await trio.sleep(0.1)
                retries.add((await serving.submit(order, "k-1")).status)
        while not answers:  # noqa: ASYNC110
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()

    assert retries == {409}
    [answer] = answers
    assert (answer.status, json.loads(answer.body)["status"]) == (200, "ok")
    stored = await store.get("k-1")
    assert stored is not None
    assert (stored.kind, stored.http_status, stored.attempt) == (None, 200, 1)
    assert await store.net_charge("k-1") == 70


async def test_an_order_whose_begin_answers_late_is_left_to_it_while_a_later_retry_waits_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """As above, with a retry of the key under way across two looks (its begin waiting 3 s,
    as on a row lock), begun after the look that first read the order: the submit that
    counts is the earliest under way, which may still run the order, not the latest; so the
    order is not recovered under it, and runs ok, charged once."""
    store = _BeginAnsweredLate()
    store.answered_in, store.existing_in = 5.0, 3.0
    serving = assemble(Settings(lease_timeout=2.0), store=store).desk
    order = make_order("o-1", amount=70, delay_ms=dict.fromkeys(STEP_NAMES, 0))
    answers: list[desk.Answer] = []

    async def send() -> None:
        answers.append(await serving.submit(order, "k-1"))

    with trio.fail_after(20):  # virtual time: a run that never ends fails the test
        async with trio.open_nursery() as nursery:
            await nursery.start(serving.maintain)
            nursery.start_soon(send)
            await trio.sleep(1.5)  # the order read by the look at 1 s
            retry = await serving.submit(order, "k-1")  # under way through the looks at 2 and 3 s
            while not answers:  # noqa: ASYNC110 # the first begin answers at 5 s
                await trio.sleep(0.1)
            nursery.cancel_scope.cancel()

    assert retry.status == 409
    [answer] = answers
    assert (answer.status, json.loads(answer.body)["status"]) == (200, "ok")
    stored = await store.get("k-1")
    assert stored is not None
    assert (stored.kind, stored.http_status, stored.attempt) == (None, 200, 1)
    assert await store.net_charge("k-1") == 70


async def test_a_process_that_ends_cleanly_gives_up_its_lease(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """At a clean exit the lease is released, so an order the process left running (its final
    record lost) is claimed by another process at once, not a lease later."""
    store = MemoryStore()
    desk = assemble(Settings(lease_timeout=60.0), store=store).desk
    order = await begun(store, "k-1", desk.owner)
    async with trio.open_nursery() as nursery:
        await nursery.start(desk.maintain)  # holds its lease
        nursery.cancel_scope.cancel()
    assert await store.claim_interrupted("other", 10) == []  # the lease is alive

    await desk.release()

    assert [o.attempt_id for o in await store.claim_interrupted("other", 10)] == [order.attempt_id]


class RenewalTimes(MemoryStore):
    """The memory store, noting when each lease renewal comes."""

    def __init__(self) -> None:
        super().__init__()
        self.renewed: list[float] = []

    async def renew_lease(self, owner: str, timeout: float) -> None:  # noqa: ASYNC109 # a lease's length
        self.renewed.append(trio.current_time())
        await super().renew_lease(owner, timeout)


async def test_a_short_lease_is_renewed_three_times_within_its_length(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A lease under 3 s is renewed every third of it (not every second), so a missed renewal
    or two do not let it lapse, and other processes do not undo a live process's orders."""
    store = RenewalTimes()
    desk = assemble(Settings(lease_timeout=0.6), store=store).desk

    async with trio.open_nursery() as nursery:
        await nursery.start(desk.maintain)
        await trio.sleep(3)
        nursery.cancel_scope.cancel()

    gaps = [later - earlier for earlier, later in itertools.pairwise(store.renewed)]
    assert len(gaps) >= 10
    assert max(gaps) == pytest.approx(0.2)


@pytest.mark.postgres
async def test_an_order_whose_final_record_meets_a_lock_is_503_and_keeps_its_charge(
    schema: str,
) -> None:
    """An order that succeeded, whose final record met a row lock held past lock_timeout
    (a frozen host's transaction, an operator's SELECT ... FOR UPDATE): the record is held
    for the next commit, the client gets 503 store_unavailable, and nothing is undone, not
    even by this process's recovery rounds while the lock lasts (the order is its own, old,
    running); a retry replays the 200 and the charge stands. (The desk once took the missing
    reply for a takeover: it refunded the order, answered 409, and the held record then said
    ok; its recovery did the same a few seconds later.)"""
    from .pg import postgres_url
    from .test_store import postgres_stores, row_locked

    async with postgres_stores(postgres_url(schema=schema), 1, timeout=0.3) as (store,):
        settings = Settings(
            payment_delay_ms=0, vendor_delay_ms=0, courier_delay_ms=1000, lease_timeout=2.5
        )
        assembly = assemble(settings, store=store)
        first: list[tuple[int, bytes, Headers]] = []

        async def send() -> None:
            first.append(await post(assembly, ORDER, key="k-1"))

        async with trio.open_nursery() as nursery:
            await nursery.start(assembly.desk.maintain)  # recovery rounds a second apart
            nursery.start_soon(send)
            with trio.fail_after(5):
                while await store.get("k-1") is None:  # noqa: ASYNC110 # begun; courier takes 1 s
                    await trio.sleep(0.01)
            async with row_locked(schema, "k-1"):
                with trio.fail_after(10):
                    while not first:  # noqa: ASYNC110 # the order's own end
                        await trio.sleep(0.05)
                # Answered at about 1.3 s: younger than a lease then, over a lease old and
                # seen running by two recovery rounds (a second apart) before the lock ends.
                # Time must pass: only then can the charge standing show nothing was undone.
                await trio.sleep(4.5)
                charged_meanwhile = await store.net_charge("k-1")
            nursery.cancel_scope.cancel()
        status, body, _ = first[0]
        assert (status, json.loads(body)["error"]["kind"]) == (503, "store_unavailable")
        assert charged_meanwhile == ORDER["amount"]
        status, body, headers = await post(assembly, ORDER, key="k-1")  # carries the record
        assert (status, json.loads(body)["status"]) == (200, "ok")
        assert headers["Idempotent-Replayed"] == "true"
        assert await store.net_charge("k-1") == ORDER["amount"]


@pytest.mark.postgres
async def test_an_order_whose_held_final_record_lands_before_the_desk_looks_again_is_not_undone(
    schema: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An order that succeeded, whose final record met a row lock held past lock_timeout (held
    for the next commit) and whose reply was not there to read, the lock gone before the desk
    looks at the order again: that look carries the held record, so the order is finished,
    under this process. The desk took that for another process's takeover and undid the
    order (refunded, its compensations recorded) while its record said ok: the client got
    409, then 200 ok on its retry, and its money back. Seen at 30 orders a second under a
    LOCK TABLE of 4 s (1 of 420 orders). It is this process's record: its reply is sent."""
    from .pg import postgres_url
    from .test_store import postgres_stores, row_locked

    async with postgres_stores(postgres_url(schema=schema), 1, timeout=0.3) as (store,):
        settings = Settings(payment_delay_ms=0, vendor_delay_ms=0, courier_delay_ms=500)
        assembly = assemble(settings, store=store)
        release, released = trio.Event(), trio.Event()
        read_reply = store.finished_reply

        async def finished_reply(key: str, attempt_id: str) -> FinishedReply | None:
            reply = await read_reply(key, attempt_id)
            release.set()  # the lock ends before the desk looks at the order again
            await released.wait()
            return reply

        monkeypatch.setattr(store, "finished_reply", finished_reply)
        answers: list[tuple[int, bytes, Headers]] = []

        async def lock_until_released() -> None:
            async with row_locked(schema, "k-1"):
                await release.wait()
            released.set()

        async def send() -> None:
            answers.append(await post(assembly, ORDER, key="k-1"))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                while await store.get("k-1") is None:  # noqa: ASYNC110 # begun; courier takes 0.5 s
                    await trio.sleep(0.01)
                nursery.start_soon(lock_until_released)
        stored = await store.get("k-1")
        charged = await store.net_charge("k-1")

    assert stored is not None
    status, body, _ = answers[0]
    assert (status, json.loads(body)["status"]) == (200, "ok")
    assert (stored.state, stored.kind) == (FINISHED, None)
    assert [step.compensation for step in stored.steps] == [None, None, None]
    assert charged == ORDER["amount"]
    assert "taken over" not in caplog.text


async def looked(serving: OrderDesk, times: int) -> None:
    """Wait until `serving` has looked at the orders it left running `times` more times."""
    until = serving._looks + times
    with trio.fail_after(10):
        while serving._looks < until:  # noqa: ASYNC110 # no event tells a look
            await trio.sleep(0.05)


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("fields", "in_flight", "kind"),
    [
        ({"delay_ms": {"payment": 0, "vendor": 0, "courier": 60_000}}, [1], "canceled"),
        (
            {
                "delay_ms": {"payment": 0, "vendor": 0, "courier": 100},
                "fail_step": "courier",
                "compensation_delay_ms": {"payment": 1000, "vendor": 1000},
            },
            [1, 2],
            "no_courier",
        ),
    ],
    ids=["while its steps run", "while it is undone"],
)
async def test_an_order_whose_client_left_and_whose_final_record_meets_a_lock_is_not_recovered(
    schema: str,
    caplog: pytest.LogCaptureFixture,
    fields: dict[str, Any],
    in_flight: list[int],
    kind: str,
) -> None:
    """A client leaves (its order undone, no reply sent) while the order's final record meets
    a row lock held past lock_timeout: the record is held for the next commit, and the order
    stays running, over a lease old, under this process's live lease. Its process took it for
    one it left running (its run over, no reply read back) and recovered it at every look
    while the lock lasted: undone again and reported again, `interrupted`, each time (the
    held record, first in line, still landed first). It is left to its held record, which
    lands once the lock is gone: reported once. The client left while the steps ran (the
    order `canceled`), or while a failed order was undone (its kind stands; the desk's read
    of the reply is what is cancelled)."""
    from .test_store import postgres_stores, row_locked

    async with postgres_stores(postgres_url(schema=schema), 1, timeout=0.3) as (store,):
        assembly = assemble(Settings(lease_timeout=1.0), store=store)
        order = make_order("o-c", amount=70, **fields)
        request = trio.CancelScope()  # the HTTP request's

        async def client() -> None:
            with request:
                await assembly.desk.submit(order, "k-1")

        with caplog.at_level(logging.INFO):
            async with trio.open_nursery() as nursery:
                await nursery.start(assembly.desk.maintain)  # looks a second apart
                nursery.start_soon(client)
                with trio.fail_after(5):
                    for count in in_flight:  # charged; the courier's, or the undoing
                        await assembly.tracker.wait_for(count.__eq__)
                async with row_locked(schema, "k-1"):
                    request.cancel()  # the client leaves
                    with trio.fail_after(5):
                        await assembly.tracker.wait_for(lambda n: n == 0)  # undone
                    await looked(assembly.desk, 4)  # over a lease old at two looks
                    meanwhile = await store.get("k-1")
                await store.renew_lease(assembly.desk.owner, 1.0)  # carries the held record
                nursery.cancel_scope.cancel()
        stored = await store.get("k-1")
        charged = await store.net_charge("k-1")

    assert meanwhile is not None
    assert meanwhile.state == RUNNING
    assert stored is not None
    assert (stored.state, stored.kind) == (FINISHED, kind)
    assert charged == 0
    lines = [r.getMessage() for r in caplog.records if r.name == ORDERS_LOGGER]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"order o-c {kind} ")
    assert "left running" not in caplog.text


@pytest.mark.parametrize("path", ["/order/%00", "/order/k%00-1", "/order/a%20b", "/order/%C3%A9"])
async def test_lookup_of_a_key_no_order_can_hold_is_404(assembly: Assembly, path: str) -> None:
    """A key that is no Idempotency-Key (nor a server-made one) is 404, not looked up."""
    status, body = await get(assembly, path)

    assert status == 404
    assert body["error"] == {"kind": "not_found", "message": "no order with this key"}


@pytest.mark.postgres
async def test_lookup_of_a_key_with_a_nul_is_404_on_postgres(schema: str) -> None:
    """PostgreSQL's text cannot hold a NUL: looking such a key up was a 500 with a traceback
    logged (anyone could flood the error log) and a pooled connection replaced."""
    async with postgres_store(postgres_url(schema=schema)) as store:
        assembly = assemble(Settings(), store=store)
        status, body = await get(assembly, "/order/k%00-1")

    assert status == 404
    assert body["error"] == {"kind": "not_found", "message": "no order with this key"}


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("encoding", "client_encoding"), [("SQL_ASCII", None), ("UTF8", "LATIN1")], ids=str
)
async def test_every_order_id_is_kept_whatever_the_encodings(
    encoding: str, client_encoding: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database made without ENCODING 'UTF8' under the C locale is SQL_ASCII (initdb's
    default there), whose text psycopg read back as bytes: every order was charged, then
    answered 500 and left running for ever (its final record and recovery failing on the
    bytes). With PGCLIENTENCODING=LATIN1, an order_id of other characters was a 500 and a
    traceback. The store now speaks UTF-8 to the database, whatever either says."""
    if client_encoding is not None:
        monkeypatch.setenv("PGCLIENTENCODING", client_encoding)
    async with postgres_store(pg.new_database(encoding)) as store:
        assembly = assemble(Settings(), store=store)
        order = {"order_id": "caf\u00e9 \u20ac \U0001f600", "amount": 250}
        first = await post(assembly, order, key="k-1")
        again = await post(assembly, order, key="k-1")
        status, shown = await get(assembly, "/order/k-1")
        net = await store.net_charge("k-1")

    assert first[:2] == (200, again[1])
    assert (again[0], again[2]["Idempotent-Replayed"]) == (200, "true")
    assert (status, shown) == (200, json.loads(first[1]))
    assert shown["order_id"] == order["order_id"]
    assert net == 250


@pytest.mark.postgres
async def test_a_database_that_cannot_hold_every_order_id_is_refused_at_open() -> None:
    """A LATIN1 database cannot hold an order_id of other characters: they were a 500 and a
    traceback each (the other stores take them); now the store is refused as it opens."""
    with pytest.raises(StoreError, match=r"encoding is LATIN1.*UTF8"):
        async with postgres_store(pg.new_database("LATIN1")):
            pass


async def test_a_refused_order_s_line_says_why(
    assembly: Assembly, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """An order answered without running (its key taken by another order) has its one line
    in the orders log, giving the reason its reply gives."""
    await post(assembly, ORDER, key="k-1")

    with caplog.at_level(logging.INFO, logger=ORDERS_LOGGER):
        status, body, _ = await post(assembly, {**ORDER, "amount": 251}, key="k-1")

    message = json.loads(body)["error"]["message"]
    assert (status, message) == (422, "this key was used for a different order")
    lines = [r.getMessage() for r in caplog.records if r.name == ORDERS_LOGGER]
    assert lines == [f"order o-1 refused 422 idempotency_key_reused: {message}"]


async def test_lookup_of_an_orphaned_order_shows_its_failed_step_s_detail(
    assembly: Assembly, store: SqliteStore
) -> None:
    """A dead process's order whose payment failed (recorded) before it died: until it is
    recovered, GET /order/{key} says running, and the failed step carries its kind."""
    attempt_id = await orphan(store, "k-1", charged=False)
    store.record_step("k-1", attempt_id, StepRecord("payment", "error", "payment_declined", 150))

    status, body = await get(assembly, "/order/k-1")

    assert status == 200
    assert body["status"] == "running"
    assert body["steps"] == [
        {"name": "payment", "status": "error", "duration_ms": 150, "detail": "payment_declined"}
    ]


async def test_recovery_keeps_the_compensations_done_before_the_crash(
    store: SqliteStore, autojump_clock: trio.abc.Clock
) -> None:
    """A dead process had refunded the payment and cancelled the vendor (recorded), not yet
    released the courier (no record: it may have run). Recovery undoes only the courier; the
    order's reply shows the two earlier compensations as recorded, and the courier's step,
    of which nothing is known, as unknown, timed by nobody (it was "ok" in 0 ms: a claim that
    it had succeeded, and at once)."""
    events: list[tuple[str, str]] = []
    desk = _noting(assemble(Settings(lease_timeout=2.0), store=store).desk, events)
    attempt_id = await orphan(store, "k-1", charged=True)
    await store.refund(attempt_id, "k-1")
    store.record_step("k-1", attempt_id, StepRecord("payment", "ok", None, 150, "ok", 33))
    store.record_step("k-1", attempt_id, StepRecord("vendor", "ok", None, 200, "ok", 0))

    async with trio.open_nursery() as nursery:
        await nursery.start(desk.maintain)
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    stored = await store.get("k-1")

    assert stored is not None
    assert (stored.state, stored.kind) == (FINISHED, "interrupted")
    assert events == [("courier", "undone")]
    assert stored.reply is not None
    steps = {s["name"]: s for s in json.loads(stored.reply)["steps"]}
    assert steps["payment"]["compensation"] == {"status": "ok", "duration_ms": 33}
    assert steps["vendor"]["compensation"] == {"status": "ok", "duration_ms": 0}
    assert (steps["courier"]["status"], steps["courier"]["duration_ms"]) == ("unknown", None)
    assert steps["courier"]["compensation"]["status"] == "ok"
    assert await store.net_charge("k-1") == 0


async def test_a_step_of_unknown_outcome_undone_before_the_crash_is_not_undone_again(
    store: SqliteStore, autojump_clock: trio.abc.Clock
) -> None:
    """A recovery that died had undone the payment, of unknown outcome (recorded so, its
    refund ok in 33 ms), not yet the vendor and the courier. The next recovery undoes only
    those two: the payment's refund is kept as recorded, not made again."""
    events: list[tuple[str, str]] = []
    desk = _noting(assemble(Settings(lease_timeout=2.0), store=store).desk, events)
    attempt_id = await orphan(store, "k-1", charged=True)
    await store.refund(attempt_id, "k-1")
    refunded = Compensation(CompensationStatus.OK, 33)
    payment = StepResult("payment", StepStatus.UNKNOWN, None, None, refunded)
    store.record_step("k-1", attempt_id, step_record(payment))

    async with trio.open_nursery() as nursery:
        await nursery.start(desk.maintain)
        await trio.sleep(2)
        nursery.cancel_scope.cancel()
    stored = await store.get("k-1")

    assert stored is not None
    assert (stored.state, stored.kind) == (FINISHED, "interrupted")
    assert sorted(events) == [("courier", "undone"), ("vendor", "undone")]
    assert stored.reply is not None
    [payment_shown, *_] = json.loads(stored.reply)["steps"]
    assert payment_shown == {
        "name": "payment",
        "status": "unknown",
        "duration_ms": None,
        "compensation": {"status": "ok", "duration_ms": 33},
    }
    assert await store.net_charge("k-1") == 0


# The backends a server runs on; each keeps a step record's status as it was written.
STORES = ["memory", "sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
# The step statuses a version from before `unknown` reads. One meeting another in a step record
# (a newer version's recovery died after undoing such a step: a rolling upgrade) gave the order
# up as compensation_failed, undoing nothing more: the charge held.
OLDER_STATUSES = ("ok", "error", "canceled")


@pytest.mark.parametrize("backend", STORES)
async def test_a_step_of_unknown_outcome_is_shown_unknown_wherever_the_order_is(
    tmp_path: Path,
    autojump_clock: trio.abc.Clock,
    caplog: pytest.LogCaptureFixture,
    backend: str,
) -> None:
    """A dead process's order whose payment was recorded, its vendor and courier not (they may
    have run): recovery undoes all three, and shows the two it knows nothing of as
    `unknown`, with no duration, in its reply (as GET /order/{key} shows it, in a shape the
    OpenAPI document allows) and in its log line: not as "ok" in 0 ms, which said they had
    succeeded, and at once. Their step records say "ok" in 0 ms marked `UNKNOWN_OUTCOME`:
    a status an older version can read."""
    async with open_store(BACKENDS[backend](tmp_path)) as store:
        assembly = assemble(Settings(lease_timeout=2.0), store=store)
        attempt_id = await orphan(store, "k-1", charged=True)

        with caplog.at_level(logging.INFO, logger=ORDERS_LOGGER):
            async with trio.open_nursery() as nursery:
                await nursery.start(assembly.desk.maintain)
                await trio.sleep(2)
                nursery.cancel_scope.cancel()
        stored = await store.get("k-1")
        response = await assembly.app.test_client().get("/order/k-1")
        reply = await response.get_data(as_text=False)
        net = await store.net_charge("k-1")

    assert stored is not None
    assert (stored.attempt_id, stored.kind, net) == (attempt_id, "interrupted", 0)
    assert {s.step: (s.status, s.detail, s.duration_ms, s.compensation) for s in stored.steps} == {
        "payment": ("ok", None, 150, "ok"),
        "vendor": ("ok", UNKNOWN_OUTCOME, 0, "ok"),  # nobody timed it: the detail says so
        "courier": ("ok", UNKNOWN_OUTCOME, 0, "ok"),
    }
    assert all(s.status in OLDER_STATUSES for s in stored.steps)
    check("GET", "/order/{key}", response.status_code, reply, response.content_type)
    assert reply == stored.reply
    steps = json.loads(reply)["steps"]
    # The refund's time is the mock clock's jumps while a SQL store's thread refunds it.
    assert steps[0].pop("compensation")["status"] == "ok"
    assert steps == [
        {"name": "payment", "status": "ok", "duration_ms": 150},
        {"name": "vendor", "status": "unknown", "duration_ms": None,
         "compensation": {"status": "ok", "duration_ms": 50}},
        {"name": "courier", "status": "unknown", "duration_ms": None,
         "compensation": {"status": "ok", "duration_ms": 30}},
    ]  # fmt: skip # one step a line
    [line] = [r for r in caplog.records if r.name == ORDERS_LOGGER]
    assert re.fullmatch(
        r"order o-orphan interrupted 503 in \d+ ms: payment ok 150 ms \(undone ok \d+ ms\),"
        r" vendor unknown \(undone ok 50 ms\), courier unknown \(undone ok 30 ms\)",
        line.getMessage(),
    )
    assert line.fields["steps"] == json.loads(reply)["steps"]  # type: ignore[attr-defined] # set by `extra`


# A payment of unknown outcome whose refund failed, recorded as this version records it, and
# with the status "unknown" (as bd09489 recorded it, before any release).
_FAILED_REFUND = Compensation(CompensationStatus.ERROR, 80)
FAILED_REFUNDS = {
    "recorded": step_record(StepResult("payment", StepStatus.UNKNOWN, None, None, _FAILED_REFUND)),
    "recorded-unknown": StepRecord("payment", "unknown", None, 0, "error", 80),
}


@pytest.mark.parametrize("backend", STORES)
@pytest.mark.parametrize("fails_again", [False, True])
@pytest.mark.parametrize("failed_refund", FAILED_REFUNDS.values(), ids=FAILED_REFUNDS.keys())
async def test_a_step_recorded_unknown_by_a_recovery_that_died_is_undone_again(
    tmp_path: Path,
    autojump_clock: trio.abc.Clock,
    backend: str,
    fails_again: bool,
    failed_refund: StepRecord,
) -> None:
    """A recovery records a step of unknown outcome when it has undone it; one that died after
    its refund failed left that record, and the order running (GET /order/{key} shows the step
    unknown). The next recovery reads it back: it refunds again (the charge may be held) and
    shows the step as unknown still; if the refund fails again, the order is
    compensation_failed with the charge held."""
    order = make_order("o-orphan", amount=70, fail_compensation="payment" if fails_again else None)
    body = canonical(order)
    async with open_store(BACKENDS[backend](tmp_path)) as store:
        assembly = assemble(Settings(lease_timeout=2.0), store=store)
        begun = await store.begin(
            "k-1", order.order_id, hashlib.sha256(body).hexdigest(), body, "dead-recovery"
        )
        assert isinstance(begun, Begun)
        await store.charge(begun.order.attempt_id, "k-1", 70)
        store.record_step("k-1", begun.order.attempt_id, failed_refund)
        running = await assembly.app.test_client().get("/order/k-1")

        async with trio.open_nursery() as nursery:
            await nursery.start(assembly.desk.maintain)
            await trio.sleep(2)
            nursery.cancel_scope.cancel()
        stored = await store.get("k-1")
        net = await store.net_charge("k-1")

    assert running.status_code == 200
    assert json.loads(await running.get_data())["steps"] == [
        {"name": "payment", "status": "unknown", "duration_ms": None}
    ]
    assert stored is not None
    assert stored.reply is not None
    payment = json.loads(stored.reply)["steps"][0]
    assert (payment["status"], payment["duration_ms"]) == ("unknown", None)
    record = {s.step: s for s in stored.steps}["payment"]
    assert (record.status, record.detail) == ("ok", UNKNOWN_OUTCOME)
    if fails_again:
        assert (stored.kind, record.compensation, net) == ("compensation_failed", "error", 70)
        assert payment["compensation"]["status"] == "error"
    else:
        assert (stored.kind, record.compensation, net) == ("interrupted", "ok", 0)
        assert payment["compensation"]["status"] == "ok"


class _ReplyReadBeforeItLands(MemoryStore):
    """The memory store, where the first read of a final reply finds none: the record was
    held for the next commit, which lands before the desk reads the order again."""

    read = False

    async def finished_reply(self, key: str, attempt_id: str) -> Any:
        if not self.read:
            self.read = True
            return None
        return await super().finished_reply(key, attempt_id)


async def test_a_final_record_that_lands_as_the_desk_reads_it_again_is_answered_as_recorded(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An order that failed (no courier) whose final record was not there when its reply was
    read back, and is when the desk reads the order again: the desk answers the record as it
    is, 503 no_courier with Retry-After, not as a success; the order is neither undone
    again nor taken for one taken over."""
    store = _ReplyReadBeforeItLands()
    serving = assemble(Settings(lease_timeout=2.0), store=store).desk
    order = make_order("o-1", amount=70, fail_step="courier")

    with caplog.at_level(logging.WARNING, logger=DESK_LOGGER):
        answer = await serving.submit(order, "k-1")
    stored = await store.get("k-1")

    assert store.read  # the reply was read back, and found missing, once
    assert stored is not None
    assert (stored.state, stored.kind, stored.http_status) == (FINISHED, "no_courier", 503)
    assert (answer.status, answer.body, answer.key) == (503, stored.reply, "k-1")
    assert answer.retry_after
    assert (answer.replayed, answer.refused) == (False, None)
    assert [r for r in caplog.records if r.name == DESK_LOGGER] == []
    assert await store.net_charge("k-1") == 0


class _OneLostReply(MemoryStore):
    """The memory store, where reading back the final reply of `lost` fails once (its commit
    failed: the record is held for the next one, which here lands at once)."""

    lost = "k-held"

    async def finished_reply(self, key: str, attempt_id: str) -> Any:
        if key == self.lost:
            self.lost = ""
            raise StoreUnavailable("the commit failed (a test's)")
        return await super().finished_reply(key, attempt_id)


async def test_an_order_left_running_is_recovered_while_another_s_reply_was_not_read_back(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An order whose reply could not be read back is answered 503, logged naming it, and its
    key is left alone by this process's recovery only while it runs; it does not shield this
    process's other orders: one left running (a begin whose COMMIT answer was lost) is still
    recovered, seen twice, and refunded."""
    store = _OneLostReply()
    desk = assemble(Settings(lease_timeout=2.0), store=store).desk
    fast = make_order("o-held", amount=5, delay_ms=dict.fromkeys(STEP_NAMES, 0))
    with caplog.at_level(logging.WARNING, logger=DESK_LOGGER):
        answer = await desk.submit(fast, "k-held")
    warnings = [r.getMessage() for r in caplog.records if r.name == DESK_LOGGER]
    assert (answer.status, json.loads(answer.body)["error"]["kind"]) == (503, "store_unavailable")
    assert warnings == ["order 'o-held': its result could not be recorded yet"]
    await left_running(store, desk.owner, "k-left")

    async with trio.open_nursery() as nursery:
        await nursery.start(desk.maintain)
        await trio.sleep(3)
        nursery.cancel_scope.cancel()

    held, recovered = await store.get("k-held"), await store.get("k-left")
    assert held is not None
    assert (held.state, held.http_status) == (FINISHED, 200)
    assert recovered is not None
    assert (recovered.state, recovered.kind) == (FINISHED, "interrupted")
    assert await store.net_charge("k-left") == 0
    assert await store.net_charge("k-held") == 5


async def test_a_key_this_process_recovered_is_recovered_by_it_again(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Once this process has answered a retry of a dead process's order (409) and recovered
    it, the key is no longer one it works on: when its own retry of the key is left running
    (a restart whose COMMIT answer was lost), its recovery undoes that attempt too, and says
    so."""
    store = MemoryStore()
    desk = assemble(Settings(lease_timeout=2.0), store=store).desk
    await orphan(store, "k-1", charged=True)
    assert (await desk.submit(make_order("o-orphan", amount=70), "k-1")).status == 409

    with caplog.at_level(logging.WARNING, logger=DESK_LOGGER):
        async with trio.open_nursery() as nursery:
            await nursery.start(desk.maintain)
            await trio.sleep(0.5)
            first = await store.get("k-1")
            assert first is not None
            assert (first.kind, await store.net_charge("k-1")) == ("interrupted", 0)
            again = await store.restart("k-1", desk.owner, first.attempt)
            assert again is not None
            await store.charge(again.attempt_id, "k-1", 70)
            store._orders["k-1"] = attrs.evolve(again, started_at=again.started_at - 60)
            await trio.sleep(3)
            nursery.cancel_scope.cancel()

    second = await store.get("k-1")

    assert second is not None
    assert (second.attempt, second.state, second.kind) == (2, FINISHED, "interrupted")
    assert await store.net_charge("k-1") == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == DESK_LOGGER]
    assert warnings == [
        "recovering 1 interrupted order(s)",
        "recovering 1 order(s) this process left running",
    ]


async def test_a_process_s_first_lease_keeps_its_orders_and_one_not_taken_stops_it() -> None:
    """Before it serves, a process takes its lease: its orders are then no other's to
    claim. A store that cannot take it is a start-up error saying so (one line, status 2)."""
    store = MemoryStore()
    serving = assemble(Settings(), store=store).desk
    await serving.take_lease()
    await store.begin("k-1", "o-1", "h", b"{}", serving.owner)
    assert await store.claim_interrupted("another", 10) == []

    class Unwritable(MemoryStore):
        async def renew_lease(self, owner: str, timeout: float) -> None:  # noqa: ASYNC109
            raise StoreUnavailable("the store is gone (a test's)")

    with pytest.raises(StoreError) as raised:
        await assemble(Settings(), store=Unwritable()).desk.take_lease()
    assert str(raised.value) == "cannot take this process's lease: the store is gone (a test's)"


async def test_a_lease_that_cannot_be_released_is_a_warning_naming_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exit whose lease release fails is not an error (the lease expires by itself); a
    warning names the lease, so an operator knows why its orders wait for the lease timeout."""

    class Unreleasable(MemoryStore):
        async def release_lease(self, owner: str) -> None:
            raise StoreUnavailable("the store is gone (a test's)")

    desk = assemble(Settings(), store=Unreleasable()).desk
    with caplog.at_level(logging.WARNING, logger=DESK_LOGGER):
        await desk.release()

    warnings = [r.getMessage() for r in caplog.records if r.name == DESK_LOGGER]
    assert warnings == [f"could not release the lease of {desk.owner}"]


async def test_a_backlog_of_interrupted_orders_is_recovered_a_batch_after_another(
    autojump_clock: trio.testing.MockClock,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A dead process's orders, more than a batch: a batch that comes back full is followed
    by the next at once, not a second later, and each batch is a warning counting it."""
    monkeypatch.setattr(desk, "RECOVERY_BATCH", 2)
    store = MemoryStore()
    for n in range(5):
        await orphan(store, f"k-{n}", charged=True)
    recovering = assemble(Settings(lease_timeout=2.0), store=store).desk

    with caplog.at_level(logging.WARNING, logger=DESK_LOGGER):
        async with trio.open_nursery() as nursery:
            await nursery.start(recovering.maintain)
            await trio.sleep(0.9)  # each batch's refunds take 80 ms
            recovered = [await store.get(f"k-{n}") for n in range(5)]
            nursery.cancel_scope.cancel()

    assert [o.kind for o in recovered if o is not None] == ["interrupted"] * 5
    assert [await store.net_charge(f"k-{n}") for n in range(5)] == [0] * 5
    warnings = [r.getMessage() for r in caplog.records if r.name == DESK_LOGGER]
    assert warnings == [
        "recovering 2 interrupted order(s)",
        "recovering 2 interrupted order(s)",
        "recovering 1 interrupted order(s)",
    ]


class _Outage(MemoryStore):
    """The memory store, which refuses the lease's renewal (but a process's first, taken at
    its start) and the recovery's calls while `down`, and reading an order back while
    `reads_down`."""

    down = False
    reads_down = False
    leases = 0

    async def get(self, key: str) -> StoredOrder | None:
        if self.reads_down:
            raise StoreUnavailable("the store is down (a test's)")
        return await super().get(key)

    def _refuse(self) -> None:
        if self.down:
            raise StoreUnavailable("the store is down (a test's)")

    async def renew_lease(self, owner: str, timeout: float) -> None:  # noqa: ASYNC109 # a lease's length
        self.leases += 1
        if self.leases > 1:
            self._refuse()
        await super().renew_lease(owner, timeout)

    async def claim_interrupted(
        self, owner: str, limit: int, *, busy: Collection[str] = ()
    ) -> list[StoredOrder]:
        self._refuse()
        return await super().claim_interrupted(owner, limit, busy=busy)

    async def running_of(self, owner: str, older_than: float) -> list[StoredOrder]:
        self._refuse()
        return await super().running_of(owner, older_than)


async def test_recovery_pauses_through_an_outage_saying_why_and_goes_on_after_it(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """While the store refuses the lease's renewal and the recovery's calls, each failure is a
    warning saying why, and the process goes on trying; once the store is back, a dead
    process's order is recovered."""
    store = _Outage()
    await orphan(store, "k-1", charged=True)
    recovering = assemble(Settings(lease_timeout=2.0), store=store).desk
    store.down = True

    with caplog.at_level(logging.WARNING, logger=DESK_LOGGER):
        async with trio.open_nursery() as nursery:
            await nursery.start(recovering.maintain)
            await trio.sleep(1.5)
            during = await store.get("k-1")
            store.down = False
            await trio.sleep(1.5)
            nursery.cancel_scope.cancel()

    assert during is not None
    assert during.state == RUNNING
    recovered = await store.get("k-1")
    assert recovered is not None
    assert recovered.kind == "interrupted"
    assert await store.net_charge("k-1") == 0
    warnings = {r.getMessage() for r in caplog.records if r.name == DESK_LOGGER}
    assert warnings == {
        "could not renew this process's lease: the store is down (a test's)",
        "recovery paused: the store is down (a test's)",
        "recovering 1 interrupted order(s)",
    }


async def test_a_long_retention_purges_once_a_minute(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retention of a day looks for expired orders once a minute, not once a day."""
    store = MemoryStore()
    purges: list[float] = []
    purge = store.purge

    async def noted_purge(older_than: float, limit: int) -> int:
        purges.append(trio.current_time())
        return await purge(older_than, limit)

    monkeypatch.setattr(store, "purge", noted_purge)
    assembly = assemble(Settings(retention=86_400.0), store=store)
    async with trio.open_nursery() as nursery:
        await nursery.start(assembly.desk.maintain)
        await trio.sleep(630)
        nursery.cancel_scope.cancel()

    assert [later - earlier for earlier, later in itertools.pairwise(purges)] == [60.0] * 10


async def test_recovered_orders_whose_records_cannot_be_read_back_are_a_warning(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Recovery reads the last order of a batch back to wait for the commit of their final
    records; if that fails, a warning says the records are not committed yet, and the
    recovery goes on."""
    store = _Outage()
    await orphan(store, "k-1", charged=True)
    recovering = assemble(Settings(lease_timeout=2.0), store=store).desk
    store.reads_down = True

    with caplog.at_level(logging.WARNING, logger=DESK_LOGGER):
        async with trio.open_nursery() as nursery:
            await nursery.start(recovering.maintain)
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()

    store.reads_down = False
    warnings = [r.getMessage() for r in caplog.records if r.name == DESK_LOGGER]
    assert warnings == [
        "recovering 1 interrupted order(s)",
        "recovered orders could not be recorded yet",
    ]
    recovered = await store.get("k-1")
    assert recovered is not None
    assert recovered.kind == "interrupted"


async def test_a_purge_cut_short_by_an_outage_counts_what_it_forgot_and_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The store fails after a batch of expired orders was deleted: the purge stops with a
    warning saying why, and counts (and logs) the orders it did forget."""
    monkeypatch.setattr(desk, "PURGE_BATCH", 2)
    store = await five_finished_orders()
    purge = store.purge
    batches = 0

    async def failing_purge(older_than: float, limit: int) -> int:
        nonlocal batches
        batches += 1
        if batches > 1:
            raise StoreUnavailable("the store is down (a test's)")
        return await purge(older_than, limit)

    monkeypatch.setattr(store, "purge", failing_purge)
    forgetting = assemble(Settings(retention=0.001), store=store).desk

    with caplog.at_level(logging.INFO, logger=DESK_LOGGER), trio.fail_after(5):  # real time
        assert await forgetting.forget_expired() == 2

    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == DESK_LOGGER]
    assert lines == [
        ("WARNING", "could not forget expired orders: the store is down (a test's)"),
        ("INFO", "forgot 2 order(s) finished over 0.001 s ago"),
    ]
    assert len(await store.list_orders()) == 3


async def test_a_recovery_taken_over_leaves_the_claimant_s_records_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A process recovering a dead process's order stalls (its vendor compensation hangs) and
    its lease lapses: another process claims the order, undoes it and records it. When the
    first one's compensation ends after that (failed, here), its outcome is not recorded
    over the claimant's: the record of each step is the claimant's."""
    store = MemoryStore()
    await orphan(store, "k-1", charged=True)
    stalled = trio.Event()
    first = assemble(Settings(lease_timeout=2.0), store=store).desk

    async def stuck_cancel(order: OrderRequest) -> None:
        await stalled.wait()
        raise StepError(VENDOR_CANCEL_FAILED)

    steps = [
        attrs.evolve(s, compensate=stuck_cancel) if s.name == "vendor" else s
        for s in first.pipeline.steps
    ]
    first = attrs.evolve(first, pipeline=attrs.evolve(first.pipeline, steps=steps))
    claimant = assemble(Settings(lease_timeout=2.0), store=store).desk

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first.maintain)
        await trio.sleep(0.5)  # claimed by the first; its vendor compensation hangs
        assert (await store.get("k-1")).owner == first.owner  # type: ignore[union-attr] # it exists
        await store.release_lease(first.owner)  # its lease lapsed (a stall)
        await nursery.start(claimant.maintain)
        with trio.fail_after(10):
            while (await store.get("k-1")).state == RUNNING:  # type: ignore[union-attr] # noqa: ASYNC110
                await trio.sleep(0.1)
        stalled.set()  # the first one's compensation ends, failed
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    stored = await store.get("k-1")

    assert stored is not None
    assert (stored.owner, stored.kind) == (claimant.owner, "interrupted")
    assert {s.step: s.compensation for s in stored.steps} == dict.fromkeys(STEP_NAMES, "ok")
    assert await store.net_charge("k-1") == 0


async def test_a_recovery_taken_over_does_not_finish_the_order_under_its_claimant(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """As above, but the claimant's undoing is the slower one (its vendor compensation takes
    a while): the first recovery's compensation fails and it ends while the claimant still
    works on the order. The first one's final record (compensation_failed) does not land on
    the order the claimant runs; the claimant records it, interrupted, every step undone."""
    store = MemoryStore()
    await orphan(store, "k-1", charged=True)
    stalled, claimant_goes_on = trio.Event(), trio.Event()

    def vendor_compensated(desk: OrderDesk, compensate: Any) -> OrderDesk:
        steps = [
            attrs.evolve(s, compensate=compensate) if s.name == "vendor" else s
            for s in desk.pipeline.steps
        ]
        return attrs.evolve(desk, pipeline=attrs.evolve(desk.pipeline, steps=steps))

    async def stuck_cancel(order: OrderRequest) -> None:
        await stalled.wait()
        raise StepError(VENDOR_CANCEL_FAILED)

    async def slow_cancel(order: OrderRequest) -> None:
        await claimant_goes_on.wait()

    first = vendor_compensated(
        assemble(Settings(lease_timeout=2.0), store=store).desk, stuck_cancel
    )
    claimant = vendor_compensated(
        assemble(Settings(lease_timeout=2.0), store=store).desk, slow_cancel
    )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first.maintain)
        await trio.sleep(0.5)  # claimed by the first; its vendor compensation hangs
        claimed = await store.get("k-1")
        assert claimed is not None
        assert claimed.owner == first.owner
        await store.release_lease(first.owner)  # its lease lapsed (a stall)
        await nursery.start(claimant.maintain)
        with trio.fail_after(10):
            while (await store.get("k-1")).owner != claimant.owner:  # type: ignore[union-attr] # noqa: ASYNC110
                await trio.sleep(0.1)
        stalled.set()  # the first one's compensation ends, failed, the claimant's not yet
        await trio.sleep(1)
        under_the_claimant = await store.get("k-1")
        claimant_goes_on.set()
        with trio.fail_after(10):
            while (await store.get("k-1")).state == RUNNING:  # type: ignore[union-attr] # noqa: ASYNC110
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    stored = await store.get("k-1")

    assert under_the_claimant is not None
    assert (under_the_claimant.state, under_the_claimant.owner) == (RUNNING, claimant.owner)
    assert stored is not None
    assert (stored.owner, stored.kind) == (claimant.owner, "interrupted")
    assert {s.step: s.compensation for s in stored.steps} == dict.fromkeys(STEP_NAMES, "ok")
    assert await store.net_charge("k-1") == 0


async def test_an_order_taken_over_is_recorded_by_its_claimant_not_by_its_first_run(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A process whose lease lapsed runs on while another claims its order and undoes it
    slowly (a 2 s refund). The first run ends ok meanwhile: its final record must not land
    over the claimant's (the key would replay ok with the money refunded). It answers 409
    (the claimant's record not there yet) naming the order, undoes its steps, says so, and
    has its one order line, not a second one as if refused; the key ends interrupted, by the
    claimant, and a retry runs it again."""
    store = MemoryStore()
    first = assemble(Settings(), store=store).desk  # it holds no lease
    claimant = assemble(Settings(), store=store).desk
    order = make_order(
        "o-1", amount=70, delay_ms={"vendor": 1000}, compensation_delay_ms={"payment": 2000}
    )
    answers: list[desk.Answer] = []

    async def send() -> None:
        answers.append(await first.submit(order, "k-1"))

    with caplog.at_level(logging.INFO):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await trio.sleep(0.5)  # payment and courier done, the vendor not yet
            await nursery.start(claimant.maintain)  # claims k-1; its refund takes 2 s
            while not answers:  # noqa: ASYNC110 # the first run ends at 1 s
                await trio.sleep(0.1)
            while (await store.get("k-1")).state == RUNNING:  # type: ignore[union-attr] # noqa: ASYNC110
                await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    stored = await store.get("k-1")

    assert stored is not None
    assert (stored.kind, stored.owner) == ("interrupted", claimant.owner)
    [answer] = answers
    assert (answer.status, json.loads(answer.body)["error"]["kind"]) == (409, "order_in_progress")
    assert json.loads(answer.body)["order_id"] == "o-1"
    assert answer.key == "k-1"  # its Content-Location
    assert await store.net_charge("k-1") == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == DESK_LOGGER]
    assert "order 'o-1' was taken over by another process: undoing it" in warnings
    lines = [r.getMessage() for r in caplog.records if r.name == ORDERS_LOGGER]
    assert [line.split(" in ")[0] for line in lines] == [
        "order o-1 ok 200",  # the first run's
        "order o-1 interrupted 503",  # the claimant's recovery
    ], lines

    retry = await claimant.submit(order, "k-1")

    assert retry.status == 200
    assert await store.net_charge("k-1") == 70


async def test_an_order_taken_over_and_recorded_by_its_claimant_is_answered_its_record(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """As above, but the claimant's undoing is quick: its record (interrupted) is there when
    the first run ends. The first run undoes its own steps and answers that record, 503
    interrupted with Retry-After, as a retry of the key would read it; not 409."""
    store = MemoryStore()
    first = assemble(Settings(), store=store).desk  # it holds no lease
    claimant = assemble(Settings(), store=store).desk
    order = make_order("o-1", amount=70, delay_ms={"vendor": 1000})
    answers: list[desk.Answer] = []

    async def send() -> None:
        answers.append(await first.submit(order, "k-1"))

    with caplog.at_level(logging.WARNING, logger=DESK_LOGGER), trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            await trio.sleep(0.5)  # payment and courier done, the vendor not yet
            await nursery.start(claimant.maintain)  # claims k-1 and undoes it at once
            while (await store.get("k-1")).state == RUNNING:  # type: ignore[union-attr] # noqa: ASYNC110
                await trio.sleep(0.1)
            recorded = await store.get("k-1")
            while not answers:  # noqa: ASYNC110 # the first run ends at 1 s
                await trio.sleep(0.1)
            nursery.cancel_scope.cancel()

    assert recorded is not None
    assert (recorded.kind, recorded.owner) == ("interrupted", claimant.owner)
    [answer] = answers
    assert (answer.status, answer.body, answer.key) == (503, recorded.reply, "k-1")
    assert json.loads(answer.body)["error"]["kind"] == "interrupted"
    assert answer.retry_after
    assert answer.refused is None
    warnings = [r.getMessage() for r in caplog.records if r.name == DESK_LOGGER]
    assert "order 'o-1' was taken over by another process: undoing it" in warnings
    assert await store.net_charge("k-1") == 0


async def test_a_retry_of_an_order_still_running_leaves_it_to_its_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An order that runs longer than a lease, retried meanwhile (409): the retry's end does
    not make this process take the order for one it left running, which its recovery would
    undo under its run; the run ends ok, charged once."""
    store = MemoryStore()
    serving = assemble(Settings(lease_timeout=2.0), store=store).desk
    order = make_order("o-1", amount=70, delay_ms={"vendor": 5000})
    answers: list[desk.Answer] = []

    async def send() -> None:
        answers.append(await serving.submit(order, "k-1"))

    async with trio.open_nursery() as nursery:
        await nursery.start(serving.maintain)
        nursery.start_soon(send)
        await trio.sleep(0.2)
        running = await store.get("k-1")
        assert running is not None
        # Begun a minute ago, as far as the store's clock goes (the autojump clock is not it).
        store._orders["k-1"] = attrs.evolve(running, started_at=running.started_at - 60)
        assert (await serving.submit(order, "k-1")).status == 409
        while not answers:  # noqa: ASYNC110 # the run ends at 5 s
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()

    [answer] = answers
    assert (answer.status, json.loads(answer.body)["status"]) == (200, "ok")
    stored = await store.get("k-1")
    assert stored is not None
    assert (stored.kind, stored.http_status) == (None, 200)
    assert await store.net_charge("k-1") == 70


class _HeldRecord(MemoryStore):
    """The memory store, where an order's final record is held (its commit failed: a row
    locked past the lock timeout) until `land()`, and the first read of an order after that
    fails too."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[Any, ...]] = []
        self.reads_down = False

    def finish_soon(self, *args: Any, **kwargs: Any) -> None:
        self.held.append((args, kwargs))
        self.reads_down = True

    async def get(self, key: str) -> StoredOrder | None:
        if self.reads_down:
            self.reads_down = False
            raise StoreUnavailable("the store is down (a test's)")
        return await super().get(key)

    def land(self) -> None:
        for args, kwargs in self.held:
            super().finish_soon(*args, **kwargs)


async def test_an_order_whose_record_is_held_and_unread_is_not_recovered_by_its_process(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An order ran ok, but its final record is held for a later commit and the store could
    not be read to tell whether another process took it over (answered 409). Its process's
    recovery must leave it alone while it stays running (the held record, ok, would land
    after the refund, and a retry replay ok with the money back); once the record lands, the
    charge stands and a retry replays it."""
    store = _HeldRecord()
    serving = assemble(Settings(lease_timeout=2.0), store=store).desk
    order = make_order("o-1", amount=70, delay_ms=dict.fromkeys(STEP_NAMES, 0))

    async with trio.open_nursery() as nursery:
        await nursery.start(serving.maintain)
        answer = await serving.submit(order, "k-1")
        running = await store.get("k-1")
        assert running is not None
        # Begun a minute ago, as far as the store's clock goes (the autojump clock is not it).
        store._orders["k-1"] = attrs.evolve(running, started_at=running.started_at - 60)
        await trio.sleep(3)  # three recovery rounds
        still = await store.get("k-1")
        store.land()
        nursery.cancel_scope.cancel()

    assert (answer.status, json.loads(answer.body)["error"]["kind"]) == (409, "order_in_progress")
    assert still is not None
    assert still.state == RUNNING
    assert await store.net_charge("k-1") == 70
    replay = await serving.submit(order, "k-1")
    assert (replay.status, replay.replayed) == (200, True)


async def test_an_order_the_store_cannot_begin_is_a_warning_naming_it_and_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An order refused because the store cannot record it (503) is a warning naming the
    order and the store's error, besides its refused line."""

    class Unwritable(MemoryStore):
        async def begin(self, *args: Any) -> Any:
            raise StoreUnavailable("database is locked (a test's)")

    refusing = assemble(Settings(), store=Unwritable()).desk
    with caplog.at_level(logging.WARNING, logger=DESK_LOGGER):
        answer = await refusing.submit(make_order("o-1", amount=5), "k-1")

    assert (answer.status, answer.refused) == (503, "store_unavailable")
    warnings = [r.getMessage() for r in caplog.records if r.name == DESK_LOGGER]
    assert warnings == [
        "order 'o-1' refused: the store is unavailable (database is locked (a test's))"
    ]


async def test_orders_an_outage_refuses_are_a_line_a_second_that_counts_them_all(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    """Each order refused for an outage (503) was a warning of the desk's, besides its own
    line on the orders' logger: 30 a second at 30 orders/s, the same words. Now the first is
    said at once, then one a second at most, the latest, with how many like it went unsaid;
    the store beginning orders again says those left unsaid, then that it does."""

    class Down(MemoryStore):
        down = True

        async def begin(self, *args: Any) -> Any:
            if self.down:
                raise StoreUnavailable("database is locked (a test's)")
            return await super().begin(*args)

    store = Down()
    refusing = assemble(Settings(), store=store).desk
    with caplog.at_level(logging.WARNING, logger=DESK_LOGGER):
        for n in range(60):
            if n == 30:
                await trio.sleep(1)
            answer = await refusing.submit(make_order(f"o-{n}", amount=5), f"k-{n}")
            assert answer.status == 503
        await trio.sleep(1)
        store.down = False
        answer = await refusing.submit(make_order("o-60", amount=5), "k-60")

    assert answer.status == 200
    unavailable = "refused: the store is unavailable (database is locked (a test's))"
    assert [r.getMessage() for r in caplog.records if r.name == DESK_LOGGER] == [
        f"order 'o-0' {unavailable}",
        f"order 'o-30' {unavailable} (and 29 more like it since the last such line)",
        f"order 'o-59' {unavailable} (and 28 more like it since the last such line)",
        "the store begins orders again, after 60 order(s) refused as unavailable",
    ]


class _DownAtFirst(MemoryStore):
    """A store whose `begin` fails as unavailable while `down`: the desk refuses orders."""

    down = True

    async def begin(self, *args: Any) -> Any:
        if self.down:
            raise StoreUnavailable("database is locked (a test's)")
        return await super().begin(*args)


async def test_an_outage_s_refusals_are_said_whole_with_no_order_after_it(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    """The refusals' end waited for an order begun a second after the last line, and the
    line left unsaid with it: an order begun sooner (the clients' retry) and then none, and
    neither came, for as long as no order came, nor at all if the process then exited (the
    lines counted 1 of 3 refusals). The lease's renewal says the end once it is due, and
    the lease's release the line left unsaid."""
    refusing = assemble(Settings(), store=(store := _DownAtFirst())).desk
    unavailable = "refused: the store is unavailable (database is locked (a test's))"
    with caplog.at_level(logging.WARNING, logger=DESK_LOGGER):
        for n in range(3):
            assert (await refusing.submit(make_order(f"o-{n}", amount=5), f"k-{n}")).status == 503
        store.down = False
        assert (await refusing.submit(make_order("o-3", amount=5), "k-3")).status == 200
        async with trio.open_nursery() as nursery:
            await nursery.start(refusing.maintain)
            await trio.sleep(2)
            nursery.cancel_scope.cancel()
    assert [r.getMessage() for r in caplog.records if r.name == DESK_LOGGER] == [
        f"order 'o-0' {unavailable}",
        f"order 'o-2' {unavailable} (and 1 more like it since the last such line)",
        "the store begins orders again, after 3 order(s) refused as unavailable",
    ]
    caplog.clear()

    still_down = assemble(Settings(), store=_DownAtFirst()).desk
    with caplog.at_level(logging.WARNING, logger=DESK_LOGGER):
        for n in range(3):
            assert (await still_down.submit(make_order(f"o-{n}", amount=5), f"k-{n}")).status == 503
        await still_down.release()  # the process exits: no later line can say the others
    assert [r.getMessage() for r in caplog.records if r.name == DESK_LOGGER] == [
        f"order 'o-0' {unavailable}",
        f"order 'o-2' {unavailable} (and 1 more like it since the last such line)",
    ]
