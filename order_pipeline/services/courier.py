"""The simulated courier-assignment step and its compensation, the release."""

from __future__ import annotations

from typing import Final

import attrs
import trio

from ..kinds import NO_COURIER
from ..model import OrderRequest, StepError
from .pool import CourierPool, PoolFull

COURIER_RELEASE_FAILED: Final = "courier_release_failed"


@attrs.frozen
class CourierService:
    """Assigns a courier from the shared pool; the delay runs while holding a slot."""

    pool: CourierPool
    delay_ms: int = 100
    release_delay_ms: int = 30

    async def assign(self, order: OrderRequest) -> None:
        try:
            async with self.pool.slot():
                await trio.sleep(order.delay_ms.get("courier", self.delay_ms) / 1000)
        except PoolFull:
            raise StepError(NO_COURIER) from None  # shed: no courier soon enough
        if order.fail_step == "courier":
            raise StepError(NO_COURIER)

    async def unassign(self, order: OrderRequest) -> None:
        """Tell the assigned courier the order is off (no pool slot is needed for that)."""
        await trio.sleep(order.compensation_delay_ms.get("courier", self.release_delay_ms) / 1000)
        if order.fail_compensation == "courier":
            raise StepError(COURIER_RELEASE_FAILED)
