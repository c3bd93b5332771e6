"""Each domain service alone: success, its failure, cancellation; the pool and the tracker."""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing

from order_pipeline.model import OrderRequest, StepError
from order_pipeline.orchestrator import Step, StepAction
from order_pipeline.services import (
    CourierPool,
    CourierService,
    PaymentService,
    StepTracker,
    VendorService,
)

from .conftest import make_order
from .timings import DELAY_MS, seconds


async def test_payment_charges_after_its_delay(autojump_clock: trio.abc.Clock) -> None:
    """A positive amount is charged after the default delay."""
    await PaymentService().charge(make_order(amount=1))
    assert trio.current_time() == seconds(DELAY_MS["payment"])


@pytest.mark.parametrize(
    "order",
    [make_order(amount=5, fail_step="payment"), make_order(amount=0), make_order(amount=-1)],
)
async def test_payment_declines_after_its_delay(
    order: OrderRequest, autojump_clock: trio.abc.Clock
) -> None:
    """fail_step=payment or an amount <= 0 declines, once the delay has passed."""
    with pytest.raises(StepError) as caught:
        await PaymentService().charge(order)
    assert caught.value.kind == "payment_declined"
    assert trio.current_time() == seconds(DELAY_MS["payment"])


async def test_vendor_notifies_after_its_delay(autojump_clock: trio.abc.Clock) -> None:
    """The vendor answers after the default delay."""
    await VendorService().notify(make_order())
    assert trio.current_time() == seconds(DELAY_MS["vendor"])


async def test_vendor_unavailable(autojump_clock: trio.abc.Clock) -> None:
    """fail_step=vendor fails with vendor_unavailable."""
    with pytest.raises(StepError) as caught:
        await VendorService().notify(make_order(fail_step="vendor"))
    assert caught.value.kind == "vendor_unavailable"


async def test_delay_override_and_zero(autojump_clock: trio.abc.Clock) -> None:
    """delay_ms overrides a step's delay, and 0 means no delay."""
    await PaymentService().charge(make_order(amount=1, delay_ms={"payment": 0}))
    assert trio.current_time() == 0
    await VendorService().notify(make_order(delay_ms={"vendor": 1234}))
    assert trio.current_time() == 1.234


@pytest.mark.parametrize(
    "step",
    [
        PaymentService().charge,
        VendorService().notify,
        CourierService(CourierPool(1)).assign,
    ],
)
async def test_cancelled_while_delayed(step: StepAction, autojump_clock: trio.abc.Clock) -> None:
    """Every service stops at once when cancelled during its delay."""
    with trio.move_on_after(0.05) as scope:
        await step(make_order(amount=1))
    assert scope.cancelled_caught
    assert trio.current_time() == 0.05


async def test_courier_assigns_holding_a_slot(autojump_clock: trio.abc.Clock) -> None:
    """The courier holds one pool slot for its default delay and gives it back."""
    pool = CourierPool(2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(CourierService(pool).assign, make_order())
        await trio.testing.wait_all_tasks_blocked()
        assert pool.in_use == 1
    assert trio.current_time() == seconds(DELAY_MS["courier"])
    assert pool.in_use == 0


async def test_no_courier_releases_its_slot(autojump_clock: trio.abc.Clock) -> None:
    """fail_step=courier fails with no_courier and the slot is released."""
    pool = CourierPool(1)
    with pytest.raises(StepError) as caught:
        await CourierService(pool).assign(make_order(fail_step="courier"))
    assert caught.value.kind == "no_courier"
    assert pool.in_use == 0


async def test_courier_waits_for_a_slot_and_counts_the_wait(autojump_clock: trio.abc.Clock) -> None:
    """With the pool full, a second courier waits for the slot, then runs its own delay."""
    pool = CourierPool(1)
    courier = CourierService(pool)
    done: list[float] = []

    async def assign() -> None:
        await courier.assign(make_order())
        done.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(assign)
        nursery.start_soon(assign)
        await trio.testing.wait_all_tasks_blocked()
        assert (pool.in_use, pool.waiting) == (1, 1)
    assert done == [seconds(DELAY_MS["courier"]), seconds(DELAY_MS["courier"], DELAY_MS["courier"])]


async def test_courier_cancelled_while_waiting_for_a_slot(autojump_clock: trio.abc.Clock) -> None:
    """Waiting for a slot respects cancellation, and no slot is lost."""
    pool = CourierPool(1)
    courier = CourierService(pool)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(courier.assign, make_order(delay_ms={"courier": 1000}))
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.3) as scope:
            await courier.assign(make_order())
        assert scope.cancelled_caught
        assert (pool.in_use, pool.waiting) == (1, 0)
    assert pool.in_use == 0
    assert trio.current_time() == 1.0


@pytest.mark.parametrize(
    ("asked", "size"), [(-5, 1), (0, 1), (1, 1), (5, 5), (128, 128), (129, 128), (10_000, 128)]
)
def test_pool_size_is_clamped(asked: int, size: int) -> None:
    """The pool size is clamped to 1..128."""
    assert CourierPool(asked).size == size


async def test_pool_blocks_when_full_and_releases(autojump_clock: trio.abc.Clock) -> None:
    """The (capacity+1)-th slot waits until one is released."""
    pool = CourierPool(2)
    order: list[str] = []

    async def hold(name: str, seconds: float) -> None:
        async with pool.slot():
            order.append(name)
            await trio.sleep(seconds)

    async with trio.open_nursery() as nursery:
        for name, seconds in [("a", 1), ("b", 2), ("c", 1)]:
            nursery.start_soon(hold, name, seconds)
            await trio.testing.wait_all_tasks_blocked()
        assert (order, pool.in_use, pool.waiting) == (["a", "b"], 2, 1)
        await trio.sleep(1)
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["a", "b", "c"]
    assert (pool.in_use, pool.waiting) == (0, 0)


async def test_pool_slot_released_on_error() -> None:
    """A slot is given back when the holder raises."""
    pool = CourierPool(1)
    with pytest.raises(ValueError, match="x"):
        async with pool.slot():
            raise ValueError("x")
    assert pool.in_use == 0


@pytest.mark.parametrize("outcome", ["ok", "error", "cancel"])
async def test_tracker_counts_steps_in_flight(outcome: str, autojump_clock: trio.abc.Clock) -> None:
    """The tracker counts a running step and forgets it however it ends."""
    tracker = StepTracker()

    async def run(_: OrderRequest) -> None:
        await trio.sleep(1)
        if outcome == "error":
            raise StepError("x")

    step = tracker.track(Step("s", run))
    assert step.name == "s"
    async with trio.open_nursery() as nursery:

        async def go() -> None:
            with contextlib.suppress(StepError):
                await step.run(make_order())

        nursery.start_soon(go)
        nursery.start_soon(go)
        await trio.testing.wait_all_tasks_blocked()
        assert tracker.in_flight == 2
        if outcome == "cancel":
            nursery.cancel_scope.cancel()
    assert tracker.in_flight == 0
