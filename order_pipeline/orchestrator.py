"""Run an order's steps concurrently; the first failure cancels the rest.

The Trio counterpart of Go's `errgroup.WithContext`, plus compensation (the saga
pattern). The cancel-scope tree of one order is::

    caller's scope (the HTTP request: cancelled on disconnect or shutdown)
      ├─ deadline scope: trio.move_on_after(timeout)       -> kind "timeout"
      │    └─ nursery: cancelled by the first failing step -> that step's kind
      │         └─ one task per step
      └─ (order failed) shielded scope: CancelScope(shield=True)
           └─ compensation deadline: move_on_after(compensation_timeout)
                └─ nursery: one task per step that succeeded, undoing it

This module knows steps only as names and async callables; it imports no
service, and reads a failure's kind structurally (`model.Classified`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from .model import (
    CANCELED,
    COMPENSATION_FAILED,
    INTERNAL,
    TIMEOUT,
    Classified,
    Compensation,
    CompensationStatus,
    OrderRequest,
    OrderResult,
    StepResult,
    StepStatus,
)

__all__ = ["Pipeline", "Step", "StepAction", "log_result"]

log = logging.getLogger(__name__)

StepAction = Callable[[OrderRequest], Awaitable[None]]


@attrs.frozen
class Step:
    """One unit of an order's work: `run` returns on success and raises on failure.

    `compensate`, if given, undoes a `run` that succeeded, when the order as a
    whole fails.
    """

    name: str
    run: StepAction
    compensate: StepAction | None = None


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _kind_of(exc: Exception) -> str:
    kind = exc.kind if isinstance(exc, Classified) else None
    return kind if isinstance(kind, str) else INTERNAL


@attrs.define(eq=False)
class _OrderRun:
    """The mutable record of one order while its steps (and compensations) run."""

    order: OrderRequest
    steps: Sequence[Step]
    started: float = attrs.field(factory=trio.current_time)
    results: list[StepResult] = attrs.field(init=False)
    failure: str | None = None

    @results.default
    def _placeholders(self) -> list[StepResult]:
        # Placeholders keep registration order; every task overwrites its own.
        return [StepResult(s.name, StepStatus.CANCELED, 0) for s in self.steps]

    async def run_step(self, index: int, nursery: trio.Nursery) -> None:
        step = self.steps[index]
        started = trio.current_time()
        # Anything but a return or an Exception (that is, trio.Cancelled) leaves it canceled.
        status, detail = StepStatus.CANCELED, None
        try:
            await step.run(self.order)
            status = StepStatus.OK
        except Exception as exc:
            status, detail = StepStatus.ERROR, _kind_of(exc)
            if detail == INTERNAL:
                log.error("order %r: step %s raised", self.order.order_id, step.name, exc_info=exc)
            if self.failure is None:
                self.failure = detail
                nursery.cancel_scope.cancel()
        finally:
            duration = _ms(trio.current_time() - started)
            self.results[index] = StepResult(step.name, status, duration, detail)

    # The deadline must sit inside the shield, where a caller's scope cannot reach.
    async def compensate(self, timeout: float) -> bool:  # noqa: ASYNC109
        """Undo every step that succeeded, concurrently; True if all were undone.

        Shielded, so the cancellation that ended the order cannot skip it, and
        bounded by `timeout`, so a stuck compensation cannot hold the order.
        """
        undo = [
            (index, step.compensate)
            for index, (step, result) in enumerate(zip(self.steps, self.results, strict=True))
            if result.status is StepStatus.OK and step.compensate is not None
        ]
        if not undo:
            return True
        with trio.CancelScope(shield=True), trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for index, action in undo:
                    nursery.start_soon(self._compensate_step, index, action)
        return all(self._undone(index) for index, _ in undo)

    def _undone(self, index: int) -> bool:
        compensation = self.results[index].compensation
        return compensation is not None and compensation.status is CompensationStatus.OK

    async def _compensate_step(self, index: int, action: StepAction) -> None:
        name = self.steps[index].name
        started = trio.current_time()
        # Only the compensation deadline can cancel this task: that is a timeout.
        status, why = CompensationStatus.TIMEOUT, "its deadline passed"
        try:
            await action(self.order)
            status = CompensationStatus.OK
        except Exception as exc:
            status, why = CompensationStatus.ERROR, _kind_of(exc)
            if why == INTERNAL:
                log.error(
                    "order %r: compensating %s raised", self.order.order_id, name, exc_info=exc
                )
        finally:
            compensation = Compensation(status, _ms(trio.current_time() - started))
            self.results[index] = attrs.evolve(self.results[index], compensation=compensation)
            if status is not CompensationStatus.OK:
                log.error(
                    "order %r: compensation of %s ended %s (%s); it needs manual attention",
                    self.order.order_id, name, status, why,
                )  # fmt: skip

    def result(self, kind: str | None) -> OrderResult:
        duration = _ms(trio.current_time() - self.started)
        return OrderResult(self.order.order_id, tuple(self.results), kind, duration)


def log_result(result: OrderResult) -> None:
    """The default `on_finish`: one log line per order, whatever its outcome."""
    steps = " ".join(
        f"{s.name}={s.status}/{s.duration_ms}ms"
        + (
            f"(compensation={s.compensation.status}/{s.compensation.duration_ms}ms)"
            if s.compensation
            else ""
        )
        for s in result.steps
    )
    log.info(
        "order %r finished kind=%s duration_ms=%d %s",
        result.order_id, result.kind or "ok", result.duration_ms, steps,
    )  # fmt: skip


@attrs.frozen
class Pipeline:
    """Runs every order through `steps`, each order bounded by `timeout` seconds.

    When an order fails for any reason, including cancellation from outside,
    the steps that had succeeded are compensated before `process` ends.
    `on_finish` sees every order's result exactly once, including orders
    cancelled from outside (which then re-raise `trio.Cancelled`).
    """

    steps: Sequence[Step]
    timeout: float = attrs.field(default=10.0, kw_only=True)
    compensation_timeout: float = attrs.field(default=5.0, kw_only=True)
    on_finish: Callable[[OrderResult], None] = attrs.field(default=log_result, kw_only=True)

    async def process(self, order: OrderRequest) -> OrderResult:
        run = _OrderRun(order, self.steps)
        deadline = trio.move_on_after(self.timeout)
        finished = False
        try:
            with deadline:
                async with trio.open_nursery() as nursery:
                    for index in range(len(self.steps)):
                        nursery.start_soon(run.run_step, index, nursery)
            finished = True
        finally:
            if not finished:
                kind: str | None = CANCELED
            else:
                kind = run.failure or (TIMEOUT if deadline.cancelled_caught else None)
            if kind is not None and not await run.compensate(self.compensation_timeout):
                kind = COMPENSATION_FAILED
            result = run.result(kind)
            self.on_finish(result)
        return result
