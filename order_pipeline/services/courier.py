"""The simulated courier-assignment step."""

from __future__ import annotations

from typing import Final

import attrs
import trio

from ..model import OrderRequest, StepError
from .pool import CourierPool

NO_COURIER: Final = "no_courier"


@attrs.frozen
class CourierService:
    """Assigns a courier from the shared pool; the delay runs while holding a slot."""

    pool: CourierPool
    delay_ms: int = 100

    async def assign(self, order: OrderRequest) -> None:
        async with self.pool.slot():
            await trio.sleep(order.delay_ms.get("courier", self.delay_ms) / 1000)
            if order.fail_step == "courier":
                raise StepError(NO_COURIER)
