"""Property tests: the courier pool as a state machine, and orders against a simple model."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from order_pipeline.kinds import lookup
from order_pipeline.server import Settings, assemble
from order_pipeline.services import CourierPool

from .conftest import examples
from .timings import DELAY_MS, UNDO_MS


class CourierPoolMachine(RuleBasedStateMachine):
    """Acquire, release and cancel-while-waiting against a model of a FIFO pool.

    A Trio run lives in a thread for the whole example; each rule steps it with
    `trio.from_thread.run` and waits until every task is blocked, so the pool is
    checked in a settled state after each rule.
    """

    def __init__(self) -> None:
        super().__init__()
        self.holding: list[int] = []  # model: who has a slot, in order granted
        self.waiting: list[int] = []  # model: who waits, first in first out
        self.entered: set[int] = set()  # what the tasks themselves report
        self.releases: dict[int, trio.Event] = {}
        self.scopes: dict[int, trio.CancelScope] = {}
        self.next_id = 0
        started = threading.Event()
        self.thread = threading.Thread(target=trio.run, args=(self._main, started), daemon=True)
        self.thread.start()
        started.wait()

    async def _main(self, started: threading.Event) -> None:
        self.token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            started.set()
            await trio.sleep_forever()

    def _step(self, action: Callable[[], None]) -> None:
        async def run() -> None:
            action()
            await trio.testing.wait_all_tasks_blocked()

        trio.from_thread.run(run, trio_token=self.token)

    @initialize(capacity=st.integers(1, 4))
    def make_pool(self, capacity: int) -> None:
        self.pool = CourierPool(capacity)

    async def _hold(self, ident: int, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self.scopes[ident] = scope
            async with self.pool.slot():
                self.entered.add(ident)
                await self.releases[ident].wait()
            self.entered.discard(ident)

    @rule()
    def acquire(self) -> None:
        ident, self.next_id = self.next_id, self.next_id + 1
        self.releases[ident] = trio.Event()
        self._step(lambda: self.nursery.start_soon(self._hold, ident))
        if len(self.holding) < self.pool.size:
            self.holding.append(ident)
        else:
            self.waiting.append(ident)

    @precondition(lambda self: self.holding)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        ident = data.draw(st.sampled_from(self.holding))
        self._step(self.releases[ident].set)
        self.holding.remove(ident)
        if self.waiting:
            self.holding.append(self.waiting.pop(0))

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def cancel_waiting(self, data: st.DataObject) -> None:
        ident = data.draw(st.sampled_from(self.waiting))
        self._step(self.scopes[ident].cancel)
        self.waiting.remove(ident)

    @invariant()
    def slots_match_the_model(self) -> None:
        if not hasattr(self, "pool"):
            return
        assert self.pool.in_use <= self.pool.size
        assert self.entered == set(self.holding)
        assert (self.pool.in_use, self.pool.waiting) == (len(self.holding), len(self.waiting))
        # No slot lost: nobody waits while a slot is free.
        assert not self.waiting or self.pool.in_use == self.pool.size

    def teardown(self) -> None:
        trio.from_thread.run_sync(self.nursery.cancel_scope.cancel, trio_token=self.token)
        self.thread.join(timeout=10)


TestCourierPool = pytest.mark.fuzz(CourierPoolMachine.TestCase)
TestCourierPool.settings = settings(
    max_examples=examples(60), stateful_step_count=30, deadline=None
)


# --- orders against a model ------------------------------------------------------

TIMEOUT_MS = 2000
UNDO_TIMEOUT_MS = 1000
STEPS = ("payment", "vendor", "courier")
FAIL_KIND = {"payment": "payment_declined", "vendor": "vendor_unavailable", "courier": "no_courier"}


@attrs.frozen
class Expected:
    http_status: int
    kind: str | None
    steps: list[dict[str, Any]]


def model(order: dict[str, Any]) -> Expected:
    """What the service must answer, worked out without Trio: times are exact and distinct."""
    delay = {s: order["delay_ms"].get(s, DELAY_MS[s]) for s in STEPS}
    fails = {s for s in STEPS if order.get("fail_step") == s}
    if order["amount"] <= 0:
        fails.add("payment")
    first = min(fails, key=delay.__getitem__, default=None)
    if first is not None and delay[first] < TIMEOUT_MS:
        kind, end = FAIL_KIND[first], delay[first]
    elif max(delay.values()) > TIMEOUT_MS:
        kind, end = "timeout", TIMEOUT_MS
    else:
        kind, end = None, max(delay.values())
    steps = []
    undo_failed = False
    for s in STEPS:
        if s == first and kind == FAIL_KIND[s]:
            steps.append({"name": s, "status": "error", "duration_ms": delay[s], "detail": kind})
        elif delay[s] < end or (kind is None):
            step: dict[str, Any] = {"name": s, "status": "ok", "duration_ms": delay[s]}
            if kind is not None:
                undo = order["compensation_delay_ms"].get(s, UNDO_MS[s])
                if undo > UNDO_TIMEOUT_MS:
                    step["compensation"] = {"status": "timeout", "duration_ms": UNDO_TIMEOUT_MS}
                    undo_failed = True
                elif order.get("fail_compensation") == s:
                    step["compensation"] = {"status": "error", "duration_ms": undo}
                    undo_failed = True
                else:
                    step["compensation"] = {"status": "ok", "duration_ms": undo}
            steps.append(step)
        else:
            steps.append({"name": s, "status": "canceled", "duration_ms": end})
    if undo_failed:
        kind = "compensation_failed"
    return Expected(lookup(kind).status, kind, steps)


delays = st.dictionaries(st.sampled_from(STEPS), st.integers(0, 300).map(lambda n: n * 10))
orders = st.fixed_dictionaries(
    {
        "order_id": st.text(
            st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=20
        ).filter(str.strip),
        "amount": st.integers(-3, 3),
        "delay_ms": delays,
        "compensation_delay_ms": st.dictionaries(
            st.sampled_from(STEPS), st.integers(0, 150).map(lambda n: n * 10)
        ),
    },
    optional={"fail_step": st.sampled_from(STEPS), "fail_compensation": st.sampled_from(STEPS)},
)


@pytest.mark.fuzz
@settings(max_examples=examples(150), deadline=None)
@given(order=orders)
def test_orders_match_the_model(order: dict[str, Any]) -> None:
    """Random valid orders: status, step statuses, durations, compensations, order of results."""
    times = [order["delay_ms"].get(s, DELAY_MS[s]) for s in STEPS] + [TIMEOUT_MS]
    assume(len(set(times)) == len(times))  # ties between steps are a coin toss in any scheduler
    assume(UNDO_TIMEOUT_MS not in order["compensation_delay_ms"].values())
    service = assemble(
        Settings(
            request_timeout=TIMEOUT_MS / 1000,
            compensation_timeout=UNDO_TIMEOUT_MS / 1000,
            courier_pool_size=128,
        )
    )
    expected = model(order)

    async def main() -> tuple[int, Any]:
        response = await service.app.test_client().post("/order", json=order)
        return response.status_code, await response.get_json()

    status, body = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    assert status == expected.http_status
    assert body["steps"] == expected.steps
    assert body.get("error", {}).get("kind") == expected.kind
    assert service.tracker.in_flight == 0
