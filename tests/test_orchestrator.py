"""The orchestrator alone, with inline steps, on Trio's virtual clock."""

from __future__ import annotations

import logging

import attrs
import pytest
import trio

from order_pipeline.model import (
    Attempt,
    Compensation,
    CompensationStatus,
    OrderRequest,
    OrderResult,
    StepError,
    StepResult,
    StepStatus,
    current_attempt,
)
from order_pipeline.orchestrator import Pipeline, Step, StepAction
from order_pipeline.services import StepTracker

from .fakes import FailingReport, Hangs, Instant, Sleeps

OK, ERROR, CANCELED = StepStatus.OK, StepStatus.ERROR, StepStatus.CANCELED


def pipeline(
    *steps: tuple[str, StepAction], timeout: float = 10.0
) -> tuple[Pipeline, list[OrderResult]]:
    finished: list[OrderResult] = []
    return Pipeline(
        [Step(n, r) for n, r in steps], timeout=timeout, on_finish=finished.append
    ), finished


async def test_all_steps_succeed(order: OrderRequest, autojump_clock: trio.abc.Clock) -> None:
    """Every step runs concurrently; the order takes as long as its slowest step."""
    pipe, finished = pipeline(("a", Sleeps(0.15)), ("b", Sleeps(0.2)), ("c", Sleeps(0.1)))

    result = await pipe.process(order)

    assert result == OrderResult(
        "o-1",
        (StepResult("a", OK, 150), StepResult("b", OK, 200), StepResult("c", OK, 100)),
        None,
        200,
    )
    assert result.ok
    assert trio.current_time() == 0.2
    assert finished == [result]


async def test_failure_cancels_siblings_at_once(
    order: OrderRequest, autojump_clock: trio.abc.Clock
) -> None:
    """A failing step cancels the steps still running, at the moment it fails."""
    pipe, _ = pipeline(
        ("payment", Sleeps(0.15, StepError("payment_declined"))),
        ("vendor", Sleeps(0.2)),
        ("courier", Sleeps(0.3)),
    )

    result = await pipe.process(order)

    assert result.kind == "payment_declined"
    assert result.steps == (
        StepResult("payment", ERROR, 150, "payment_declined"),
        StepResult("vendor", CANCELED, 150),
        StepResult("courier", CANCELED, 150),
    )
    assert trio.current_time() == 0.15


async def test_first_failure_in_time_wins(
    order: OrderRequest, autojump_clock: trio.abc.Clock
) -> None:
    """Of two failing steps, the earlier failure decides the kind; the later one is cancelled."""
    pipe, _ = pipeline(
        ("late", Sleeps(0.2, StepError("late_kind"))),
        ("early", Sleeps(0.1, StepError("early_kind"))),
    )

    result = await pipe.process(order)

    assert result.kind == "early_kind"
    assert result.steps == (
        StepResult("late", CANCELED, 100),
        StepResult("early", ERROR, 100, "early_kind"),
    )


async def test_deadline_cancels_running_steps(
    order: OrderRequest, autojump_clock: trio.abc.Clock
) -> None:
    """At the deadline every step still running is cancelled and the kind is timeout."""
    pipe, _ = pipeline(("fast", Sleeps(0.1)), ("slow", Sleeps(5)), timeout=1.0)

    result = await pipe.process(order)

    assert result.kind == "timeout"
    assert result.steps == (StepResult("fast", OK, 100), StepResult("slow", CANCELED, 1000))
    assert result.duration_ms == 1000
    assert trio.current_time() == 1.0


async def test_outer_cancellation_cancels_steps_and_reports_canceled(
    order: OrderRequest, autojump_clock: trio.abc.Clock
) -> None:
    """A caller's cancellation (client gone) stops the steps at once and still reports the order."""
    pipe, finished = pipeline(("a", Sleeps(1)), ("b", Sleeps(2)))

    with trio.move_on_after(0.25) as outer:
        await pipe.process(order)

    assert outer.cancelled_caught
    assert trio.current_time() == 0.25
    assert finished == [
        OrderResult(
            "o-1",
            (StepResult("a", CANCELED, 250), StepResult("b", CANCELED, 250)),
            "canceled",
            250,
            cancelled=True,
        )
    ]


async def test_exception_without_kind_is_internal(
    order: OrderRequest, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception is kind internal, cancels siblings, and its traceback is logged."""
    pipe, _ = pipeline(("broken", Sleeps(0.05, ZeroDivisionError("boom"))), ("other", Sleeps(1)))

    with caplog.at_level(logging.ERROR):
        result = await pipe.process(order)

    assert result.kind == "internal"
    assert result.steps == (
        StepResult("broken", ERROR, 50, "internal"),
        StepResult("other", CANCELED, 50),
    )
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)


async def test_kind_is_read_structurally(
    order: OrderRequest, autojump_clock: trio.abc.Clock
) -> None:
    """An exception with a string `kind` is classified by it; any other kind is internal."""

    class CustomError(Exception):
        kind = "custom_kind"

    class BadKind(Exception):
        kind = 42

    custom, _ = pipeline(("a", Sleeps(0, CustomError())))
    bad, _ = pipeline(("a", Sleeps(0, BadKind())))

    assert (await custom.process(order)).kind == "custom_kind"
    assert (await bad.process(order)).kind == "internal"


async def test_results_keep_registration_order(
    order: OrderRequest, autojump_clock: trio.abc.Clock
) -> None:
    """Results come back in the order steps were registered, not the order they finished."""
    pipe, _ = pipeline(("first", Sleeps(0.3)), ("second", Sleeps(0.2)), ("third", Sleeps(0.1)))

    result = await pipe.process(order)

    assert [s.name for s in result.steps] == ["first", "second", "third"]
    assert [s.duration_ms for s in result.steps] == [300, 200, 100]


async def test_zero_delay_steps_finish_without_virtual_time(
    order: OrderRequest, autojump_clock: trio.abc.Clock
) -> None:
    """Steps that do not wait finish at time zero with duration 0."""
    pipe, _ = pipeline(("a", Sleeps(0)), ("b", Sleeps(0)))

    result = await pipe.process(order)

    assert result == OrderResult("o-1", (StepResult("a", OK, 0), StepResult("b", OK, 0)), None, 0)


@pytest.mark.parametrize(
    ("steps", "timeout", "kind"),
    [
        ([("fail", Sleeps(0.1, StepError("x"))), ("hang", Hangs())], 10.0, "x"),
        ([("hang", Hangs()), ("ok", Sleeps(0.1))], 1.0, "timeout"),
    ],
)
async def test_no_task_outlives_its_order(
    order: OrderRequest,
    autojump_clock: trio.abc.Clock,
    steps: list[tuple[str, StepAction]],
    timeout: float,  # noqa: ASYNC109  # a test parameter, not an API that should take a scope
    kind: str,
) -> None:
    """Even a step that would never end is gone when process() returns."""
    tracker = StepTracker()
    pipe = Pipeline([tracker.track(Step(n, r)) for n, r in steps], timeout=timeout)

    result = await pipe.process(order)

    assert result.kind == kind
    assert tracker.in_flight == 0


async def test_a_failing_report_does_not_turn_a_cancellation_into_an_error(
    order: OrderRequest, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """If reporting raises while the caller cancels the order, Cancelled still propagates."""
    pipe = Pipeline([Step("a", Sleeps(1))], on_finish=FailingReport())

    with trio.move_on_after(0.25) as outer:
        await pipe.process(order)

    assert outer.cancelled_caught
    assert "reporting its result failed" in caplog.text


async def test_a_failing_report_does_not_change_a_compensated_order(
    order: OrderRequest, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed, compensated order is returned as it ended, even if reporting it raises."""
    undone: list[str] = []

    async def undo(_: OrderRequest) -> None:
        undone.append("a")

    pipe = Pipeline(
        [Step("a", Sleeps(0.1), undo), Step("b", Sleeps(0.2, StepError("b_failed")))],
        on_finish=FailingReport(),
    )

    result = await pipe.process(order)

    assert result.kind == "b_failed"
    assert undone == ["a"]
    assert any(r.exc_info and r.exc_info[0] is RuntimeError for r in caplog.records)


async def test_durations_count_from_each_order_start(
    order: OrderRequest, autojump_clock: trio.abc.Clock
) -> None:
    """An order that starts late on the clock still reports its own durations, not the clock's."""
    pipe, finished = pipeline(("a", Sleeps(0.1)), ("b", Sleeps(0.3, StepError("x"))))
    await trio.sleep(7)

    result = await pipe.process(order)

    assert result.steps == (StepResult("a", OK, 100), StepResult("b", ERROR, 300, "x"))
    assert result.duration_ms == 300
    assert finished == [result]


async def test_step_tasks_are_named_after_their_steps(
    order: OrderRequest, autojump_clock: trio.abc.Clock
) -> None:
    """Each step runs in a task of its own, named after the step (as a debugger shows it)."""
    names: list[str] = []

    async def record(_: OrderRequest) -> None:
        names.append(trio.lowlevel.current_task().name)

    pipe, _ = pipeline(("payment", record), ("vendor", record))

    await pipe.process(order)

    assert sorted(names) == ["payment", "vendor"]


LOGGER = "order_pipeline.orchestrator"


def logged(caplog: pytest.LogCaptureFixture) -> list[tuple[str, type[BaseException] | None]]:
    """The orchestrator's log records: each message as formatted, and its traceback's type."""
    return [
        (r.getMessage(), r.exc_info[0] if r.exc_info else None)
        for r in caplog.records
        if r.name == LOGGER
    ]


async def test_an_internal_step_error_is_logged_naming_the_order_and_the_step(
    order: OrderRequest, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A step that raised unexpectedly is logged naming order and step, with its traceback."""
    pipe, _ = pipeline(("broken", Sleeps(0.05, ZeroDivisionError("boom"))), ("other", Sleeps(1)))

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        await pipe.process(order)

    assert logged(caplog) == [("order 'o-1': step broken raised", ZeroDivisionError)]


async def test_a_failing_step_report_is_logged_and_changes_nothing(
    order: OrderRequest, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """An `on_step` that raises is logged, naming order and step, and the order ends as it would."""

    def broken(_: StepResult) -> None:
        raise RuntimeError("the store is down")

    finished: list[OrderResult] = []
    pipe = Pipeline(
        [Step("a", Sleeps(0.1)), Step("b", Sleeps(0.2))], on_step=broken, on_finish=finished.append
    )

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        result = await pipe.process(order)

    assert result == OrderResult(
        "o-1", (StepResult("a", OK, 100), StepResult("b", OK, 200)), None, 200
    )
    assert finished == [result]
    assert logged(caplog) == [
        ("order 'o-1': reporting step a failed", RuntimeError),
        ("order 'o-1': reporting step b failed", RuntimeError),
    ]


async def test_a_failing_result_report_is_logged_naming_the_order(
    order: OrderRequest, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """An `on_finish` that raises is logged with its traceback, naming the order."""
    pipe = Pipeline([Step("a", Sleeps(0.1))], on_finish=FailingReport())

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        result = await pipe.process(order)

    assert result.ok
    assert logged(caplog) == [("order 'o-1': reporting its result failed", RuntimeError)]


async def test_failed_compensations_are_logged_naming_the_order_the_step_and_why(
    order: OrderRequest, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Each compensation that raises or overruns is logged for an operator: order, step and why."""
    pipe = Pipeline(
        [
            Step("refund", Instant(), Instant(RuntimeError("undo exploded"))),
            Step("release", Instant(), Hangs()),
            Step("ship", Sleeps(0.1, StepError("no_courier"))),
        ],
        compensation_timeout=1.0,
    )

    with caplog.at_level(logging.ERROR, logger=LOGGER):
        result = await pipe.process(order)

    assert result.kind == "compensation_failed"
    assert logged(caplog) == [
        ("order 'o-1': compensating refund raised", RuntimeError),
        (
            "order 'o-1' needs manual attention: undoing refund: raised an unexpected error"
            " (its traceback is logged)",
            None,
        ),
        ("order 'o-1' needs manual attention: undoing release: timed out after 1 s", None),
    ]


async def test_compensation_tasks_are_named_after_their_steps(
    order: OrderRequest, autojump_clock: trio.abc.Clock
) -> None:
    """Each compensation runs in a task of its own, named "undo <step>" (as a debugger shows it)."""
    names: list[str] = []

    async def record(_: OrderRequest) -> None:
        names.append(trio.lowlevel.current_task().name)

    pipe = Pipeline(
        [
            Step("payment", Sleeps(0.1), record),
            Step("vendor", Sleeps(0.1), record),
            Step("courier", Sleeps(0.2, StepError("no_courier")), record),
        ]
    )

    await pipe.process(order)

    assert sorted(names) == ["undo payment", "undo vendor"]


async def test_undo_reports_its_kind_or_compensation_failed(
    order: OrderRequest, autojump_clock: trio.abc.Clock
) -> None:
    """`undo` reports the order as the kind it is given, or compensation_failed if an undo fails."""

    async def refund(_: OrderRequest) -> None:
        pass

    async def release(_: OrderRequest) -> None:
        raise StepError("release_failed")

    finished: list[OrderResult] = []
    paid = StepResult("payment", OK, 150)
    refunding = Pipeline([Step("payment", Hangs(), refund)], on_finish=finished.append)
    both = Pipeline(
        [Step("payment", Hangs(), refund), Step("courier", Hangs(), release)],
        on_finish=finished.append,
    )

    undone = await refunding.undo(order, [paid], "interrupted")
    not_undone = await both.undo(order, [paid, StepResult("courier", OK, 100)], "interrupted")

    refunded = Compensation(CompensationStatus.OK, 0)
    assert undone == OrderResult(
        "o-1", (attrs.evolve(paid, compensation=refunded),), "interrupted", recovered=True
    )
    assert not_undone.kind == "compensation_failed"
    assert [s.compensation for s in not_undone.steps] == [
        refunded,
        Compensation(CompensationStatus.ERROR, 0),
    ]
    assert finished == [undone, not_undone]


async def test_undo_tries_again_a_compensation_that_had_failed(
    order: OrderRequest, autojump_clock: trio.abc.Clock
) -> None:
    """`undo` runs again a compensation recorded as failed, also of a step that had failed
    (it was compensated because it may have taken effect); one that succeeded is not run
    again. Each step keeps how it ended."""
    undone: list[str] = []

    def undo(name: str) -> StepAction:
        async def compensate(_: OrderRequest) -> None:
            undone.append(name)

        return compensate

    pipe = Pipeline([Step(name, Hangs(), undo(name)) for name in ("payment", "vendor", "courier")])
    failed, done = (
        Compensation(CompensationStatus.ERROR, 80),
        Compensation(CompensationStatus.OK, 0),
    )
    known = [
        StepResult("payment", ERROR, 150, "store_unavailable", failed),
        StepResult("vendor", OK, 200, None, failed),
        StepResult("courier", OK, 100, None, done),
    ]

    result = await pipe.undo(order, known, "interrupted")

    assert sorted(undone) == ["payment", "vendor"]
    assert result.kind == "interrupted"
    assert result.steps == (
        StepResult("payment", ERROR, 150, "store_unavailable", done),
        StepResult("vendor", OK, 200, None, done),
        StepResult("courier", OK, 100, None, done),
    )


async def test_the_attention_line_names_the_order_s_key(
    order: OrderRequest, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Run under a stored attempt, a failed compensation's line carries the idempotency key."""
    pipe = Pipeline(
        [
            Step("refund", Instant(), Instant(StepError("refund_failed"))),
            Step("ship", Instant(StepError("x"))),
        ]
    )
    current_attempt.set(Attempt("key-7", "attempt-1", "me"))

    with caplog.at_level(logging.ERROR):
        await pipe.process(order)

    (line,) = [r for r in caplog.records if "needs manual attention" in r.getMessage()]
    assert line.fields["key"] == "key-7"  # type: ignore[attr-defined] # set by `extra`
    assert line.fields["reason"] == "refund failed"  # type: ignore[attr-defined] # set by `extra`
