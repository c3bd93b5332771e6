"""Test doubles: step actions, a processor for the app, a failing reporter, a recording pipeline.

Small attrs classes, so that a failing assertion shows what each double was
(`Sleeps(seconds=0.1, fails_with=None)`), never a function's address.
"""

from __future__ import annotations

from collections import Counter

import attrs
import trio

from order_pipeline.desk import Answer
from order_pipeline.kinds import NOT_FOUND, lookup
from order_pipeline.model import ErrorInfo, OrderRequest, OrderResult, Reply, StepResult, StepStatus
from order_pipeline.orchestrator import Pipeline, Step
from order_pipeline.serialization import dump_reply, encode_result
from order_pipeline.server import Settings, assemble


@attrs.frozen
class Sleeps:
    """A step action that takes `seconds` of (virtual) time, then returns or raises `fails_with`."""

    seconds: float
    fails_with: Exception | None = None

    async def __call__(self, _: OrderRequest) -> None:
        await trio.sleep(self.seconds)
        if self.fails_with is not None:
            raise self.fails_with


@attrs.frozen
class Hangs:
    """A step action that never ends by itself."""

    async def __call__(self, _: OrderRequest) -> None:
        await trio.sleep_forever()


@attrs.frozen
class Instant:
    """A step action that ends at once, without a checkpoint: returns, or raises `fails_with`."""

    fails_with: Exception | None = None

    async def __call__(self, _: OrderRequest) -> None:
        if self.fails_with is not None:
            raise self.fails_with


@attrs.frozen
class FailingReport:
    """An `on_finish` that raises, as reporting to a backend that is down does."""

    def __call__(self, _: OrderResult) -> None:
        raise RuntimeError("the metrics backend is down")


OK_STEPS = (StepResult("payment", StepStatus.OK, 150), StepResult("vendor", StepStatus.OK, 200))


@attrs.define
class StubProcessor:
    """An order desk that records the orders it sees and answers each with `kind` (None:
    success) and `OK_STEPS`; it knows no key."""

    kind: str | None = None
    raises: Exception | None = None
    seen: list[OrderRequest] = attrs.Factory(list)

    async def submit(self, order: OrderRequest, key: str | None) -> Answer:
        self.seen.append(order)
        if self.raises is not None:
            raise self.raises
        status, body = encode_result(OrderResult(order.order_id, OK_STEPS, self.kind))
        return Answer(status, body, retry_after=lookup(self.kind).retry_after)

    async def look_up(self, key: str) -> Answer:
        body = dump_reply(Reply("error", error=ErrorInfo(NOT_FOUND, "no order with this key")))
        return Answer(404, body)


@attrs.define
class Recorder:
    """Collects every finished order and counts every compensation call."""

    finished: list[OrderResult] = attrs.Factory(list)
    calls: Counter[str] = attrs.Factory(Counter)

    def pipeline(self, settings: Settings | None = None) -> Pipeline:
        """The real services' pipeline, reporting to this recorder and counting compensations."""
        real = assemble(settings or Settings()).pipeline

        def counted(step: Step) -> Step:
            assert step.compensate is not None
            undo = step.compensate

            async def compensate(order: OrderRequest) -> None:
                self.calls[step.name] += 1
                await undo(order)

            return Step(step.name, step.run, compensate)

        return attrs.evolve(
            real, steps=[counted(s) for s in real.steps], on_finish=self.finished.append
        )
