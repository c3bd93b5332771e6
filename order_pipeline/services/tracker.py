"""Counts steps in flight, so tests and operators can see that none outlives its order."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio

from ..model import OrderRequest
from ..orchestrator import Step, StepAction


@attrs.define(eq=False)
class StepTracker:
    """Wraps steps so that `in_flight` counts the actions (and compensations) running now."""

    in_flight: int = 0
    # Made only while someone waits, so counting costs no allocation on every step.
    _changed: trio.Event | None = attrs.field(default=None, init=False)

    async def wait_for(self, condition: Callable[[int], bool]) -> None:
        """Return as soon as `condition(in_flight)` holds: an event, not a polling loop."""
        while not condition(self.in_flight):
            if self._changed is None:
                self._changed = trio.Event()
            await self._changed.wait()
        await trio.lowlevel.checkpoint()

    def _set(self, in_flight: int) -> None:
        self.in_flight = in_flight
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def track(self, step: Step) -> Step:
        compensate = None if step.compensate is None else self._counted(step.compensate)
        return Step(step.name, self._counted(step.run), compensate)

    def _counted(self, action: StepAction) -> StepAction:
        async def run(order: OrderRequest) -> None:
            self._set(self.in_flight + 1)
            try:
                await action(order)
            finally:
                self._set(self.in_flight - 1)

        return run
