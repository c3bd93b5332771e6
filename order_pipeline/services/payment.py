"""The simulated payment step and its compensation, the refund."""

from __future__ import annotations

from typing import Final

import attrs
import trio

from ..kinds import PAYMENT_DECLINED
from ..model import OrderRequest, StepError

REFUND_FAILED: Final = "refund_failed"


@attrs.frozen
class PaymentService:
    """Charges the order's amount; declines a non-positive amount, after the delay."""

    delay_ms: int = 150
    refund_delay_ms: int = 80

    async def charge(self, order: OrderRequest) -> None:
        await trio.sleep(order.delay_ms.get("payment", self.delay_ms) / 1000)
        if order.fail_step == "payment" or order.amount <= 0:
            raise StepError(PAYMENT_DECLINED)

    async def refund(self, order: OrderRequest) -> None:
        await trio.sleep(order.compensation_delay_ms.get("payment", self.refund_delay_ms) / 1000)
        if order.fail_compensation == "payment":
            raise StepError(REFUND_FAILED)
