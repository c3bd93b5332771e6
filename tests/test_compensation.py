"""Compensation (the saga): completed steps are undone when the order fails, exactly once."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from order_pipeline.model import (
    Compensation,
    CompensationStatus,
    OrderRequest,
    OrderResult,
    StepStatus,
)
from order_pipeline.orchestrator import Pipeline, Step
from order_pipeline.server import Settings, assemble

from .conftest import make_order
from .fakes import Instant, Recorder, Sleeps
from .timings import DELAY_MS, UNDO_MS, seconds

UNDONE = {name: Compensation(CompensationStatus.OK, ms) for name, ms in UNDO_MS.items()}


def compensations(result: OrderResult) -> dict[str, Compensation | None]:
    return {s.name: s.compensation for s in result.steps}


async def test_late_failure_undoes_the_completed_steps(autojump_clock: trio.abc.Clock) -> None:
    """A courier failure after payment and vendor succeeded compensates both, not the courier."""
    recorder = Recorder()
    order = make_order(amount=5, fail_step="courier", delay_ms={"courier": 300})

    result = await recorder.pipeline().process(order)

    assert result.kind == "no_courier"
    assert compensations(result) == {
        "payment": UNDONE["payment"],
        "vendor": UNDONE["vendor"],
        "courier": None,
    }
    assert recorder.calls == Counter(payment=1, vendor=1)
    # The compensations run concurrently: the longest ends the order.
    longest = max(UNDO_MS["payment"], UNDO_MS["vendor"])
    assert trio.current_time() == seconds(300, longest)
    assert result.duration_ms == 300 + longest


async def test_failure_before_any_success_undoes_nothing(autojump_clock: trio.abc.Clock) -> None:
    """When no step had completed, nothing is compensated."""
    recorder = Recorder()
    order = make_order(amount=0, delay_ms={"courier": 300})

    result = await recorder.pipeline().process(order)

    assert result.kind == "payment_declined"
    assert set(compensations(result).values()) == {None}
    assert recorder.calls == Counter()
    assert trio.current_time() == seconds(DELAY_MS["payment"])


async def test_timeout_undoes_the_payment(autojump_clock: trio.abc.Clock) -> None:
    """A deadline that passes after the payment succeeded refunds it."""
    recorder = Recorder()
    order = make_order(amount=5, delay_ms={"vendor": 2000, "courier": 2000})

    result = await recorder.pipeline(Settings(request_timeout=1)).process(order)

    assert result.kind == "timeout"
    assert compensations(result) == {"payment": UNDONE["payment"], "vendor": None, "courier": None}
    assert trio.current_time() == seconds(1000, UNDO_MS["payment"])


async def test_failed_compensation_is_compensation_failed(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A compensation that fails makes the order compensation_failed and is logged loudly."""
    recorder = Recorder()
    order = make_order(amount=5, fail_step="vendor", fail_compensation="payment")

    with caplog.at_level(logging.ERROR):
        result = await recorder.pipeline().process(order)

    assert result.kind == "compensation_failed"
    assert compensations(result) == {
        "payment": Compensation(CompensationStatus.ERROR, UNDO_MS["payment"]),
        "vendor": None,
        "courier": UNDONE["courier"],
    }
    assert "order 'o-1' needs manual attention: undoing payment: refund failed" in caplog.text
    (attention,) = [r for r in caplog.records if "needs manual attention" in r.getMessage()]
    assert attention.fields == {  # type: ignore[attr-defined] # set by `extra={"fields": ...}`
        "order_id": "o-1",
        "key": None,
        "step": "payment",
        "compensation": "error",
        "reason": "refund failed",
    }


async def test_stuck_compensation_times_out(autojump_clock: trio.abc.Clock) -> None:
    """A compensation that outlives its own deadline is reported as timeout."""
    recorder = Recorder()
    order = make_order(amount=5, fail_step="vendor", compensation_delay_ms={"courier": 60_000})

    result = await recorder.pipeline(Settings(compensation_timeout=5)).process(order)

    assert result.kind == "compensation_failed"
    assert compensations(result) == {
        "payment": UNDONE["payment"],
        "vendor": None,
        "courier": Compensation(CompensationStatus.TIMEOUT, 5000),
    }
    assert trio.current_time() == seconds(DELAY_MS["vendor"], 5000)


async def test_outer_cancellation_still_compensates(autojump_clock: trio.abc.Clock) -> None:
    """A client disconnect (outer cancel) cannot skip the compensations: they run to the end."""
    recorder = Recorder()
    tracker = assemble(Settings()).tracker
    pipeline = recorder.pipeline()
    pipeline = attrs.evolve(pipeline, steps=[tracker.track(s) for s in pipeline.steps])

    with trio.move_on_after(0.25) as disconnect:
        await pipeline.process(make_order(amount=5, delay_ms={"vendor": 1000, "courier": 1000}))

    assert disconnect.cancelled_caught
    assert trio.current_time() == seconds(250, UNDO_MS["payment"])
    (result,) = recorder.finished
    assert result.kind == "canceled"
    assert compensations(result) == {"payment": UNDONE["payment"], "vendor": None, "courier": None}
    assert tracker.in_flight == 0


async def test_an_outer_cancellation_whose_undoing_fails_is_still_cancelled(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Cancelled from outside, with a compensation that fails: compensation_failed, and still
    marked cancelled (no reply is sent: the reporter must not log a 500 as sent)."""
    recorder = Recorder()
    pipeline = recorder.pipeline()

    with trio.move_on_after(0.25):
        await pipeline.process(
            make_order(amount=5, delay_ms={"vendor": 1000}, fail_compensation="payment")
        )

    (result,) = recorder.finished
    assert (result.kind, result.cancelled) == ("compensation_failed", True)


async def test_an_order_cancelled_while_it_is_undone_keeps_its_kind_and_is_cancelled(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The vendor failed at 100 ms, and its client left while the payment's refund ran
    (shielded): the refund still ends, the kind stays the vendor's, and the order is marked
    cancelled, since no reply will be sent."""
    recorder = Recorder()
    pipeline = recorder.pipeline()
    order = make_order(amount=5, fail_step="vendor", delay_ms={"payment": 0, "vendor": 100})

    with trio.move_on_after(0.1 + UNDO_MS["payment"] / 2000):
        await pipeline.process(order)

    (result,) = recorder.finished
    assert (result.kind, result.cancelled) == ("vendor_unavailable", True)
    assert compensations(result)["payment"] == UNDONE["payment"]


async def test_an_order_that_fails_by_itself_is_not_cancelled(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A failed step or the deadline ends an order from inside: not marked cancelled."""
    recorder = Recorder()
    pipeline = attrs.evolve(recorder.pipeline(), timeout=0.5)

    await pipeline.process(make_order(amount=5, fail_step="vendor"))
    await pipeline.process(make_order(amount=5, delay_ms={"vendor": 1000}))

    assert [(r.kind, r.cancelled) for r in recorder.finished] == [
        ("vendor_unavailable", False),
        ("timeout", False),
    ]


async def test_success_runs_no_compensation(autojump_clock: trio.abc.Clock) -> None:
    """A successful order is not compensated at all."""
    recorder = Recorder()

    result = await recorder.pipeline().process(make_order(amount=5))

    assert result.ok
    assert recorder.calls == Counter()
    assert trio.current_time() == seconds(max(DELAY_MS.values()))


async def test_compensation_through_http(autojump_clock: trio.abc.Clock) -> None:
    """Over HTTP a failed compensation answers 500 compensation_failed with the records."""
    app = assemble(Settings()).app
    order = {"order_id": "o", "amount": 5, "fail_step": "courier", "fail_compensation": "vendor"}
    order["delay_ms"] = {"courier": 300}
    order["compensation_delay_ms"] = {"payment": 10}

    response = await app.test_client().post("/order", json=order)

    assert response.status_code == 500
    assert await response.get_json() == {
        "status": "error",
        "order_id": "o",
        "steps": [
            {
                "name": "payment",
                "status": "ok",
                "duration_ms": DELAY_MS["payment"],
                "compensation": {"status": "ok", "duration_ms": 10},
            },
            {
                "name": "vendor",
                "status": "ok",
                "duration_ms": DELAY_MS["vendor"],
                "compensation": {"status": "error", "duration_ms": UNDO_MS["vendor"]},
            },
            {"name": "courier", "status": "error", "duration_ms": 300, "detail": "no_courier"},
        ],
        "error": {
            "kind": "compensation_failed",
            "message": "order failed and could not be fully undone",
        },
    }


step_names = st.sampled_from(["payment", "vendor", "courier"])
delays = st.dictionaries(step_names, st.integers(0, 3_000))


@pytest.mark.fuzz
@given(
    fields=st.fixed_dictionaries(
        {
            "amount": st.integers(-2, 2),
            "fail_step": st.none() | step_names,
            "fail_compensation": st.none() | step_names,
            "delay_ms": delays,
            "compensation_delay_ms": delays,
        }
    ),
    cancel_after=st.none() | st.integers(0, 3_000),
)
def test_every_completed_step_of_a_failed_order_is_undone_exactly_once(
    fields: dict[str, Any], cancel_after: int | None
) -> None:
    """For random orders, the ok steps of a failed order each have one compensation; others none."""
    recorder = Recorder()
    pipeline = recorder.pipeline(Settings(request_timeout=2, compensation_timeout=1))

    async def main() -> None:
        with trio.move_on_after(float("inf") if cancel_after is None else cancel_after / 1000):
            await pipeline.process(make_order(**fields))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))

    (result,) = recorder.finished
    completed = {s.name for s in result.steps if s.status is StepStatus.OK}
    undone = {s.name for s in result.steps if s.compensation is not None}
    if result.ok:
        assert undone == set()
        assert recorder.calls == Counter()
    else:
        assert undone == completed
        assert recorder.calls == Counter(completed)
        failed_undo = any(s.compensation.status != "ok" for s in result.steps if s.compensation)
        assert (result.kind == "compensation_failed") == failed_undo


async def test_unexpected_compensation_error_is_logged_with_traceback(
    order: OrderRequest, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A compensation that raises an unclassified exception is an error, traceback in the log."""
    broken_undo = Instant(RuntimeError("undo exploded"))
    pipeline = Pipeline(
        [Step("a", Instant(), broken_undo), Step("b", Sleeps(0.1, RuntimeError("fail")))]
    )

    with caplog.at_level(logging.ERROR):
        result = await pipeline.process(order)

    assert result.kind == "compensation_failed"
    assert result.steps[0].compensation == Compensation(CompensationStatus.ERROR, 0)
    assert "undo exploded" in caplog.text
    assert "needs manual attention: undoing a: raised an unexpected error" in caplog.text


class LostAnswer(Exception):
    """A step's write whose answer was lost: the step may have done its work."""

    kind = "store_unavailable"
    may_have_taken_effect = True


@pytest.mark.parametrize("undo_fails", [False, True])
async def test_a_step_whose_error_may_have_taken_effect_is_undone(
    autojump_clock: trio.abc.Clock, undo_fails: bool
) -> None:
    """A step that raises an error saying it may have done its work (a charge whose COMMIT's
    answer was lost) is compensated as if it had succeeded, and reported once, with how its
    undoing ended; until then it is unrecorded, so recovery would undo it too."""
    undone: list[str] = []
    reported: list[tuple[str, StepStatus, Compensation | None]] = []

    async def charge(_: OrderRequest) -> None:
        await trio.sleep(0.1)
        raise LostAnswer

    async def refund(_: OrderRequest) -> None:
        undone.append("payment")
        if undo_fails:
            raise LostAnswer

    async def notify(_: OrderRequest) -> None:
        await trio.sleep(1)

    pipe = Pipeline(
        [Step("payment", charge, refund), Step("vendor", notify)],
        on_step=lambda r: reported.append((r.name, r.status, r.compensation)),
    )

    result = await pipe.process(make_order())

    status = CompensationStatus.ERROR if undo_fails else CompensationStatus.OK
    assert undone == ["payment"]
    assert result.kind == ("compensation_failed" if undo_fails else "store_unavailable")
    assert compensations(result) == {"payment": Compensation(status, 0), "vendor": None}
    assert result.steps[0].status is StepStatus.ERROR
    assert reported == [
        ("vendor", StepStatus.CANCELED, None),
        ("payment", StepStatus.ERROR, Compensation(status, 0)),
    ]
