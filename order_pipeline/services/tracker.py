"""Counts steps in flight, so tests and operators can see that none outlives its order."""

from __future__ import annotations

import attrs

from ..model import OrderRequest
from ..orchestrator import Step


@attrs.define(eq=False)
class StepTracker:
    """Wraps steps so that `in_flight` counts those running right now."""

    in_flight: int = 0

    def track(self, step: Step) -> Step:
        async def run(order: OrderRequest) -> None:
            self.in_flight += 1
            try:
                await step.run(order)
            finally:
                self.in_flight -= 1

        return Step(step.name, run)
