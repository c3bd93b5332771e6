"""Counts steps in flight, so tests and operators can see that none outlives its order."""

from __future__ import annotations

import attrs

from ..model import OrderRequest
from ..orchestrator import Step, StepAction


@attrs.define(eq=False)
class StepTracker:
    """Wraps steps so that `in_flight` counts the actions (and compensations) running now."""

    in_flight: int = 0

    def track(self, step: Step) -> Step:
        compensate = None if step.compensate is None else self._counted(step.compensate)
        return Step(step.name, self._counted(step.run), compensate)

    def _counted(self, action: StepAction) -> StepAction:
        async def run(order: OrderRequest) -> None:
            self.in_flight += 1
            try:
                await action(order)
            finally:
                self.in_flight -= 1

        return run
