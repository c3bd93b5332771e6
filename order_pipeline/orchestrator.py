"""Run an order's steps concurrently; the first failure cancels the rest.

The Trio counterpart of Go's `errgroup.WithContext`, plus compensation (the saga
pattern). The cancel-scope tree of one order, as `Pipeline.process` builds it::

    caller's scope (the HTTP request: cancelled on disconnect or shutdown)
      ├─ deadline scope: trio.move_on_after(timeout)         -> kind "timeout"
      │    └─ nursery: cancelled by the first failing step   -> that step's kind
      │         └─ one task per step, named after it
      └─ (order failed) trio.move_on_after(compensation_timeout, shield=True)
           └─ nursery: one task per step that succeeded (or may have), undoing it

This module knows steps only as names and async callables; it imports no
service and no store, and reads a failure's kind structurally (`model.Classified`).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Final

import attrs
import trio

from .kinds import CANCELED, COMPENSATION_FAILED, INTERNAL, TIMEOUT, kind_of
from .model import (
    Compensation,
    CompensationStatus,
    OrderRequest,
    OrderResult,
    StepResult,
    StepStatus,
    current_attempt,
    may_have_taken_effect,
)

__all__ = ["OnFinish", "OnStep", "Pipeline", "Step", "StepAction"]

log = logging.getLogger(__name__)

StepAction = Callable[[OrderRequest], Awaitable[None]]
OnFinish = Callable[[OrderResult], None]
OnStep = Callable[[StepResult], None]


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


def _why(status: CompensationStatus, kind: str, timeout: float) -> str:
    """A failed compensation's reason, as an operator reads it: "refund failed"."""
    if status is CompensationStatus.TIMEOUT:
        return f"timed out after {timeout:g} s"
    if kind == INTERNAL:
        return "raised an unexpected error (its traceback is logged)"
    return kind.replace("_", " ")


# The statuses of a step that may have done its work: undone when its order fails.
_MAY_HAVE_RUN: Final = (StepStatus.OK, StepStatus.UNKNOWN)


@functools.cache
def _not_run(name: str) -> StepResult:
    """A step's result until its task records one: made once per step name, since a result
    is immutable (three objects an order cost 1 % of a request's instructions)."""
    return StepResult(name, StepStatus.CANCELED, 0)


def _caller_cancelled() -> bool:
    """Whether a scope around us was cancelled: its deadline is then minus infinity."""
    return trio.current_effective_deadline() == -math.inf


@attrs.define(eq=False)
class _OrderRun:
    """The mutable record of one order while its steps (and compensations) run."""

    order: OrderRequest
    steps: Sequence[Step]
    on_step: OnStep
    # The run's clock, read directly: `trio.current_time()` looks it up anew each time.
    clock: trio.abc.Clock = attrs.field(factory=trio.lowlevel.current_clock)
    started: float = attrs.field(init=False)
    results: list[StepResult] = attrs.field(init=False)
    failure: str | None = None
    # Steps that failed but may have done their work (`model.may_have_taken_effect`): undone
    # as if they had succeeded, and reported once that is over (until then, unrecorded, they
    # count for recovery as steps that may have run).
    uncertain: set[int] = attrs.field(factory=set)

    @started.default
    def _now(self) -> float:
        return self.clock.current_time()

    @results.default
    def _placeholders(self) -> list[StepResult]:
        # Placeholders keep registration order; every task overwrites its own.
        return [_not_run(s.name) for s in self.steps]

    async def run_step(self, index: int, order_scope: trio.CancelScope) -> None:
        """Run one step; the first step to fail records its kind and cancels `order_scope`."""
        step = self.steps[index]
        started = self.clock.current_time()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("order %r: %s started", self.order.order_id, step.name)
        # Anything but a return or an Exception (that is, trio.Cancelled) leaves it canceled.
        status, detail = StepStatus.CANCELED, None
        try:
            await step.run(self.order)
            status = StepStatus.OK
        except Exception as exc:
            status, detail = StepStatus.ERROR, kind_of(exc)
            if detail == INTERNAL:
                log.error("order %r: step %s raised", self.order.order_id, step.name, exc_info=exc)
            if may_have_taken_effect(exc) and step.compensate is not None:
                self.uncertain.add(index)
            if self.failure is None:
                self.failure = detail
                order_scope.cancel()
        finally:
            duration = _ms(self.clock.current_time() - started)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("order %r: %s ended %s", self.order.order_id, step.name, status)
            result = StepResult(step.name, status, duration, detail)
            self.ended(index, result, report=index not in self.uncertain)

    def ended(self, index: int, result: StepResult, *, report: bool = True) -> None:
        self.results[index] = result
        if not report:
            return
        try:
            self.on_step(result)
        except Exception:
            log.exception("order %r: reporting step %s failed", self.order.order_id, result.name)

    def to_undo(self) -> list[int]:
        """The steps that ran to success, or may have done their work, and can be undone."""
        steps_and_results = zip(self.steps, self.results, strict=True)  # pragma: no mutate
        return [
            index
            for index, (step, result) in enumerate(steps_and_results)
            if (result.status in _MAY_HAVE_RUN or index in self.uncertain)
            and result.compensation is None
            and step.compensate is not None
        ]

    # The deadline is the caller's scope; `timeout` is only what the log line says of it.
    async def undo_step(self, index: int, timeout: float) -> None:  # noqa: ASYNC109
        """Run one step's compensation and record how it ended."""
        step = self.steps[index]
        assert step.compensate is not None
        started = self.clock.current_time()
        # Only the compensation deadline can cancel this task: that is a timeout.
        status, why = CompensationStatus.TIMEOUT, ""  # pragma: no mutate
        try:
            await step.compensate(self.order)
            status = CompensationStatus.OK
        except Exception as exc:
            status, why = CompensationStatus.ERROR, kind_of(exc)
            if why == INTERNAL:
                log.error(
                    "order %r: compensating %s raised", self.order.order_id, step.name, exc_info=exc
                )
        finally:
            compensation = Compensation(status, _ms(self.clock.current_time() - started))
            self.ended(index, attrs.evolve(self.results[index], compensation=compensation))
            if status is not CompensationStatus.OK:
                attempt = current_attempt.get()
                reason = _why(status, why, timeout)
                fields = {
                    "order_id": self.order.order_id,
                    "key": None if attempt is None else attempt.key,
                    "step": step.name,
                    "compensation": str(status),
                    "reason": reason,
                }
                log.error(
                    "order %r needs manual attention: undoing %s: %s",
                    self.order.order_id, step.name, reason, extra={"fields": fields},
                )  # fmt: skip # the arguments on one line read as the sentence

    def all_undone(self, indexes: list[int]) -> bool:
        return all(
            (c := self.results[i].compensation) is not None and c.status is CompensationStatus.OK
            for i in indexes
        )

    def result(
        self, kind: str | None, *, cancelled: bool = False, recovered: bool = False
    ) -> OrderResult:
        duration = _ms(self.clock.current_time() - self.started)
        return OrderResult(
            self.order.order_id, tuple(self.results), kind, duration, cancelled, recovered
        )


@attrs.frozen
class Pipeline:
    """Runs every order through `steps`, each order bounded by `timeout` seconds.

    When an order fails for any reason, including cancellation from outside,
    the steps that had succeeded are compensated (and any whose error says it may
    have taken effect: `model.may_have_taken_effect`), concurrently and within
    `compensation_timeout` seconds, before `process` ends. `on_finish` hears
    every order's result exactly once, including orders cancelled from outside
    (which then re-raise `trio.Cancelled`); an error it raises is logged and
    changes nothing about the order. `on_step` hears each step's and each
    compensation's outcome as it ends, under the same rule.
    """

    steps: Sequence[Step]
    timeout: float = attrs.field(default=10.0, kw_only=True)
    compensation_timeout: float = attrs.field(default=5.0, kw_only=True)
    on_finish: OnFinish = attrs.field(default=lambda _: None, kw_only=True)
    on_step: OnStep = attrs.field(default=lambda _: None, kw_only=True)

    async def process(self, order: OrderRequest) -> OrderResult:
        run = _OrderRun(order, self.steps, self.on_step)
        deadline = trio.move_on_after(self.timeout)
        try:
            with deadline:
                async with trio.open_nursery() as nursery:
                    for index, step in enumerate(self.steps):
                        nursery.start_soon(
                            run.run_step, index, nursery.cancel_scope, name=step.name
                        )
        finally:
            cancelled = _caller_cancelled()
            if cancelled:
                kind: str | None = CANCELED
            else:
                kind = run.failure or (TIMEOUT if deadline.cancelled_caught else None)
            if kind is not None and not await self._compensate(run):
                kind = COMPENSATION_FAILED
            # Cancelled while the (shielded) compensations ran: no reply will be sent either.
            cancelled = cancelled or _caller_cancelled()
            result = run.result(kind, cancelled=cancelled)
            self.report(result)
        return result

    async def undo(
        self, order: OrderRequest, known: Sequence[StepResult], kind: str, *, report: bool = True
    ) -> OrderResult:
        """Compensate an order whose run was interrupted elsewhere (recovery); report it as `kind`
        (`report=False`: to `on_step` only, for a run whose result was reported already).

        `known` is what was recorded of each step, in step order. Each step
        given as ok or unknown and not yet compensated is undone: give a step
        whose outcome nobody recorded as unknown, since it may have taken effect. A
        compensation given as not ok is tried again (compensations are
        idempotent, and the money it should have given back may still be held),
        also of a step given as failed: such a step was compensated only
        because its error said it may have taken effect.
        """
        run = _OrderRun(order, self.steps, self.on_step)
        run.results[:] = known
        for index, step in enumerate(known):
            undone = step.compensation
            if undone is not None and undone.status is not CompensationStatus.OK:
                if step.status is StepStatus.ERROR:
                    run.uncertain.add(index)
                run.results[index] = attrs.evolve(step, compensation=None)
        if not await self._compensate(run):
            kind = COMPENSATION_FAILED
        result = run.result(kind, recovered=True)
        if report:
            self.report(result)
        return result

    async def _compensate(self, run: _OrderRun) -> bool:
        """Undo every step that succeeded (or may have); True if all were undone.

        Shielded, so the cancellation that ended the order cannot skip it, and
        bounded, so a stuck compensation cannot hold the order.
        """
        undo = run.to_undo()
        if not undo:
            return True
        with trio.move_on_after(self.compensation_timeout, shield=True):
            async with trio.open_nursery() as nursery:
                for index in undo:
                    name = f"undo {run.steps[index].name}"
                    nursery.start_soon(run.undo_step, index, self.compensation_timeout, name=name)
        return run.all_undone(undo)

    def report(self, result: OrderResult) -> None:
        """Hand `result` to `on_finish`, which may not fail the order."""
        try:
            self.on_finish(result)
        except Exception:
            log.exception("order %r: reporting its result failed", result.order_id)
