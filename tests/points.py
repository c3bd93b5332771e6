"""Running one order in process, cancelled (or copied) at one of the points Trio schedules.

Shared by tests/test_cancel_points.py (a cancel at every point) and tests/test_crash_points.py
(a crash, the store's file copied, at every point): the variants of the order, the instrument
that counts and cancels at the points, one run of the order with the desk's maintenance,
the checks of what README's Durability section promises, and SQLite on Trio's virtual clock.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from pathlib import Path
from typing import Self, TypeVar

import attrs
import trio
import trio._core._run
import trio.testing
from typing_extensions import override
from werkzeug.datastructures import Headers

from order_pipeline.desk import Answer, canonical
from order_pipeline.kinds import COMPENSATION_FAILED, INTERRUPTED
from order_pipeline.model import OrderRequest
from order_pipeline.server import Settings, assemble
from order_pipeline.store import (
    FINISHED,
    Begun,
    OrderStore,
    SqliteStore,
    StoredOrder,
)

from .conftest import make_order
from .test_durability import post

T = TypeVar("T")

KEY = "k-1"
AMOUNT = 70
LEASE_S = 2.0
SUBMIT = "the order's submit"
# Steps that end about the lease's second renewal and the recovery's second look (1 s after
# the maintenance starts), so that these run among the order's points; the vendor last, so
# that when it fails the payment and the courier have succeeded and are being undone.
DELAYS = {"payment": 900, "courier": 950, "vendor": 1000}


@attrs.frozen
class Variant:
    """An order, the status it is answered when nothing cancels it, and whether its key
    holds an order a dead process left, recovered `interrupted` before it is sent (it then
    restarts the key, as attempt 2)."""

    order: OrderRequest
    status: int
    restarts: bool = False

    @property
    def refund_fails(self) -> bool:
        return self.order.fail_compensation == "payment"


VARIANTS = {
    "it succeeds": Variant(make_order("o-1", amount=AMOUNT, delay_ms=DELAYS), 200),
    "a step fails": Variant(
        make_order("o-1", amount=AMOUNT, delay_ms=DELAYS, fail_step="vendor"), 503
    ),
    "its refund fails too": Variant(
        make_order(
            "o-1", amount=AMOUNT, delay_ms=DELAYS, fail_step="vendor", fail_compensation="payment"
        ),
        500,
    ),
    "it restarts an interrupted key": Variant(
        make_order("o-1", amount=AMOUNT, delay_ms=DELAYS), 200, restarts=True
    ),
}


class Wall:
    """`time.time` for the store: Trio's clock, from `base`; each new process sets `base` so
    that it starts where the dead one's clock stopped."""

    def __init__(self, clock: trio.testing.MockClock) -> None:
        self.clock = clock
        self.base = time.time()

    def __call__(self) -> float:
        return self.base + self.clock.current_time()


class CancelAt(trio.abc.Instrument):
    """Counts the steps Trio runs while the task named SUBMIT lives (of every task but the
    test's own), and cancels `scope` at the one numbered `at`: as it is about to run
    (`before`), or as it has yielded."""

    def __init__(self, scope: trio.CancelScope, at: int | None, *, before: bool) -> None:
        self.scope, self.at, self.before = scope, at, before
        self.test = trio.lowlevel.current_task()
        self.submit: trio.lowlevel.Task | None = None
        self.points = 0
        self.submit_points = 0  # the steps of the submit's own task
        self.landed_in: str | None = None  # the task whose step the cancel came at

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.submit is None and task.name == SUBMIT:
            self.submit = task
        self.submit_points += task is self.submit
        if self.before and self._counts(task):
            self._point(task)

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if not self.before and self._counts(task):
            self._point(task)

    def task_exited(self, task: trio.lowlevel.Task) -> None:
        if task is self.submit:
            trio.lowlevel.remove_instrument(self)

    def _counts(self, task: trio.lowlevel.Task) -> bool:
        return self.submit is not None and task is not self.test

    def _point(self, task: trio.lowlevel.Task) -> None:
        if self.points == self.at:
            self.scope.cancel()
            self.landed_in = task.name
        self.points += 1


@attrs.frozen
class Run:
    """One run: the point cancelled at (None: none), how many it had, and the task in whose
    step the cancel landed; the cancelled submit's answer (None:
    it raised Cancelled); after the maintenance, the key's order, every order listed and the
    key's net charge; the retry's answer (status, body, headers); and after it, the key's
    order and net charge."""

    at: int | None
    points: int
    submit_points: int
    landed_in: str | None
    answer: Answer | None
    stored: StoredOrder | None
    listed: list[StoredOrder]
    net: int
    retry: tuple[int, bytes, Headers]
    retried: StoredOrder | None
    net_after: int

    def __str__(self) -> str:
        stored = None if self.stored is None else (self.stored.kind, self.stored.http_status)
        answer = None if self.answer is None else self.answer.status
        cancelled = "not cancelled" if self.at is None else f"cancelled at point {self.at}"
        return (
            f"{cancelled} of {self.points} ({self.submit_points} of the submit's own task), in"
            f" a step of {self.landed_in}: answered {answer},"
            f" stored {stored}, net {self.net}; retried {self.retry[0]}, net {self.net_after}"
        )


@attrs.frozen
class Stores:
    """A new store for each run, numbered; `exact`: each run goes as the uncancelled one did
    up to its cancel (memory). SQLite's thread may take two operations queued one after the
    other into one batch or two, as it comes, each batch one wake-up: a run may then have a
    point more or less than the uncancelled one."""

    open: Callable[[int], AbstractAsyncContextManager[OrderStore]]
    exact: bool


async def left_interrupted(store: OrderStore, order: OrderRequest) -> None:
    """`order` begun and charged under KEY by a process that died (it never held a lease):
    the desk's maintenance recovers it `interrupted` at its first look."""
    body = canonical(order)
    dead = await store.begin(
        KEY, order.order_id, hashlib.sha256(body).hexdigest(), body, "dead-process"
    )
    assert isinstance(dead, Begun)
    await store.charge(dead.order.attempt_id, KEY, order.amount)


async def run_once(
    stores: Stores,
    run: int,
    variant: Variant,
    at: int | None,
    before: bool,
    instrument: Callable[..., CancelAt] = CancelAt,
) -> Run:
    """The order submitted as the desk's maintenance starts (or, restarting its key, once
    the maintenance has recovered it), cancelled at point `at`; the maintenance run past a
    lease and two looks at the orders left running; then the key retried, over HTTP.
    `instrument` counts the points (a CancelAt that does more at each: test_crash_points)."""
    # Trio runs each batch of runnable tasks in an order of its random generator's; seeded
    # alike, each run goes as the uncancelled one did up to its cancel (on SQLite, as far as
    # its thread's batches fall alike). A private name, but pytest-trio's too: it hands the
    # same generator to Hypothesis.
    trio._core._run._r.seed(0)
    order = variant.order
    async with stores.open(run) as store:
        assembly = assemble(Settings(lease_timeout=LEASE_S), store=store)
        request = trio.CancelScope()  # the HTTP request's
        answers: list[Answer] = []
        ended = trio.Event()

        async def client() -> None:
            try:
                with request:
                    answers.append(await assembly.desk.submit(order, KEY))
            finally:
                ended.set()

        async with trio.open_nursery() as nursery:
            if variant.restarts:
                await left_interrupted(store, order)
            await nursery.start(assembly.desk.maintain)
            if variant.restarts:
                await trio.sleep(0.5)
                recovered = await store.get(KEY)
                assert recovered is not None
                assert recovered.kind == INTERRUPTED
            counter = instrument(request, at, before=before)
            trio.lowlevel.add_instrument(counter)
            nursery.start_soon(client, name=SUBMIT)
            await ended.wait()
            await trio.sleep(LEASE_S + 3)
            stored = await store.get(KEY)
            listed = [listed for listed, _ in await store.list_orders()]
            net = await store.net_charge(KEY)
            retry = await post(assembly, canonical(order), KEY)
            retried = await store.get(KEY)
            net_after = await store.net_charge(KEY)
            nursery.cancel_scope.cancel()
    answer = answers[0] if answers else None
    return Run(
        at,
        counter.points, counter.submit_points, counter.landed_in, answer, stored, listed, net,
        retry, retried, net_after,
    )  # fmt: skip # Run's fields in their order


def check(run: Run, variant: Variant) -> None:
    """What README's Durability section promises of the key, its ledger and its retry."""
    stored, where = run.stored, str(run)
    if stored is None or (variant.restarts and stored.attempt == 1):
        # Cancelled before its begin (or restart) committed: it did not run. The key holds
        # what it held, a retry runs it (a restart's charge refunded by the recovery).
        assert run.answer is None, where
        assert run.net == 0, where
        assert run.listed == ([] if stored is None else [stored]), where
        assert stored is None or (stored.state, stored.kind) == (FINISHED, INTERRUPTED), where
    else:
        # One order under the key, finished: its own record landed (no outage here), so it
        # is what the order ended as, never `interrupted` (a process's orders recovered).
        assert run.listed == [stored], where
        assert stored.state == FINISHED, where
        assert stored.kind != INTERRUPTED, where
        # The money held if it ended ok; and if its refund failed, then for a person.
        kept = stored.kind in (None, COMPENSATION_FAILED)
        assert run.net == (AMOUNT if kept else 0), where
        assert stored.needs_attention == (stored.kind == COMPENSATION_FAILED), where
        assert variant.refund_fails or stored.kind != COMPENSATION_FAILED, where
        if run.answer is not None:  # the cancel came too late to stop its answer
            assert (run.answer.status, run.answer.body) == (stored.http_status, stored.reply), where
    check_retry(run.retry, run.retried, stored, variant, run.net, run.net_after, where)


def check_retry(
    retry: tuple[int, bytes, Headers],
    retried: StoredOrder | None,
    stored: StoredOrder | None,
    variant: Variant,
    net: int,
    net_after: int,
    where: str,
) -> None:
    """The key retried, `stored` what it held before: run again (never begun, or
    interrupted) as normal, the ledger then the amount iff its answer keeps the money; or
    replayed byte for byte, the ledger as it was (`net`). Either way the key holds the
    answer, finished."""
    status, body, headers = retry
    if stored is None or stored.kind == INTERRUPTED:
        assert "Idempotent-Replayed" not in headers, where
        assert status == variant.status, where
        kept = status == 200 or json.loads(body)["error"]["kind"] == COMPENSATION_FAILED
        assert net_after == (AMOUNT if kept else 0), where
    else:
        assert headers.get("Idempotent-Replayed") == "true", where
        assert (status, body) == (stored.http_status, stored.reply), where
        assert net_after == net, where
    assert retried is not None, where
    assert (retried.state, retried.http_status, retried.reply) == (FINISHED, status, body), where


class VirtualSqlite(SqliteStore):
    """SQLite on Trio's virtual clock. It keeps the autojump clock still while Trio waits for
    its thread (a call, the open, the close): Trio sees no task runnable then, and would jump
    to the next deadline (a lease's renewal, a step's end, the purge's minute), again and
    again until the thread answers (a run took six minutes of virtual time), or, with none,
    poll at once, again and again (a run took 0.1 s of CPU); so the clock jumps only after an
    hour of real time without an event, and the thread's answer is one. And its monotonic
    clock is its wall clock (`ClockWatch`): both follow the virtual time here, as both follow
    real time on a host, so the seconds the autojump skips are not a step of the wall clock
    (after which its claims would wait two real seconds for the owners to renew)."""

    def __init__(self, path: Path, clock: trio.testing.MockClock) -> None:
        super().__init__(path)
        self.clock = clock
        self.waiting = 0

    @contextmanager
    def _still(self) -> Iterator[None]:
        self.waiting += 1
        self.clock.autojump_threshold = 3600
        try:
            yield
        finally:
            self.waiting -= 1
            if not self.waiting:
                self.clock.autojump_threshold = 0

    @override
    async def __aenter__(self) -> Self:
        with self._still():
            return await super().__aenter__()

    @override
    async def aclose(self) -> None:
        with self._still():
            await super().aclose()

    @override
    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._still():
            return await super()._call(fn)

    @override
    def _now(self) -> float:
        now = time.time()
        self._clock.observe(now, now)
        return now
