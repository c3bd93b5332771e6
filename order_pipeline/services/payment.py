"""The simulated payment step."""

from __future__ import annotations

from typing import Final

import attrs
import trio

from ..model import OrderRequest, StepError

PAYMENT_DECLINED: Final = "payment_declined"


@attrs.frozen
class PaymentService:
    """Charges the order's amount; declines a non-positive amount, after the delay."""

    delay_ms: int = 150

    async def charge(self, order: OrderRequest) -> None:
        await trio.sleep(order.delay_ms.get("payment", self.delay_ms) / 1000)
        if order.fail_step == "payment" or order.amount <= 0:
            raise StepError(PAYMENT_DECLINED)
