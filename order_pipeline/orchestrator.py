"""Run an order's steps concurrently; the first failure cancels the rest.

The Trio counterpart of Go's `errgroup.WithContext`. The cancel-scope tree of
one order is::

    caller's scope (the HTTP request: cancelled on disconnect or shutdown)
      └─ deadline scope: trio.move_on_after(timeout)   -> kind "timeout"
           └─ nursery: cancelled by the first failing step -> that step's kind
                └─ one task per step

This module knows steps only as a name and an async callable; it imports no
service, and reads a failure's kind structurally (`model.Classified`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from .model import (
    CANCELED,
    INTERNAL,
    TIMEOUT,
    Classified,
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
    """One unit of an order's work: it returns on success and raises on failure."""

    name: str
    run: StepAction


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _kind_of(exc: Exception) -> str:
    kind = exc.kind if isinstance(exc, Classified) else None
    return kind if isinstance(kind, str) else INTERNAL


@attrs.define(eq=False)
class _OrderRun:
    """The mutable record of one order while its steps run."""

    order: OrderRequest
    steps: Sequence[Step]
    started: float = attrs.field(factory=trio.current_time)
    results: list[StepResult | None] = attrs.field(init=False)
    failure: str | None = None

    def __attrs_post_init__(self) -> None:
        self.results = [None] * len(self.steps)

    async def run_step(self, index: int, nursery: trio.Nursery) -> None:
        step = self.steps[index]
        started = trio.current_time()

        def finish(status: StepStatus, detail: str | None = None) -> None:
            duration = _ms(trio.current_time() - started)
            self.results[index] = StepResult(step.name, status, duration, detail)

        try:
            await step.run(self.order)
        except trio.Cancelled:
            finish(StepStatus.CANCELED)
            raise
        except Exception as exc:
            kind = _kind_of(exc)
            finish(StepStatus.ERROR, kind)
            if kind == INTERNAL:
                log.error(
                    "step %s of order %r raised", step.name, self.order.order_id, exc_info=exc
                )
            if self.failure is None:
                self.failure = kind
                nursery.cancel_scope.cancel()
        else:
            finish(StepStatus.OK)

    def result(self, kind: str | None) -> OrderResult:
        steps = tuple(r for r in self.results if r is not None)
        return OrderResult(
            self.order.order_id, steps, kind, _ms(trio.current_time() - self.started)
        )


def log_result(result: OrderResult) -> None:
    """The default `on_finish`: one log line per order, whatever its outcome."""
    steps = " ".join(f"{s.name}={s.status}/{s.duration_ms}ms" for s in result.steps)
    log.info(
        "order %r finished kind=%s duration_ms=%d %s",
        result.order_id,
        result.kind or "ok",
        result.duration_ms,
        steps,
    )


@attrs.frozen
class Pipeline:
    """Runs every order through `steps`, each order bounded by `timeout` seconds.

    `on_finish` sees every order's result exactly once, including orders
    cancelled from outside (which then re-raise `trio.Cancelled`).
    """

    steps: Sequence[Step]
    timeout: float = 10.0
    on_finish: Callable[[OrderResult], None] = log_result

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
            if finished:
                kind = run.failure or (TIMEOUT if deadline.cancelled_caught else None)
            else:
                kind = CANCELED
            result = run.result(kind)
            self.on_finish(result)
        return result
