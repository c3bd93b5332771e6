"""The simulated vendor-notification step and its compensation, the cancellation."""

from __future__ import annotations

from typing import Final

import attrs
import trio

from ..kinds import VENDOR_UNAVAILABLE
from ..model import OrderRequest, StepError

VENDOR_CANCEL_FAILED: Final = "vendor_cancel_failed"


@attrs.frozen
class VendorService:
    """Tells the vendor to start preparing the order, or to stop."""

    delay_ms: int = 200
    cancel_delay_ms: int = 50

    async def notify(self, order: OrderRequest) -> None:
        await trio.sleep(order.delay_ms.get("vendor", self.delay_ms) / 1000)
        if order.fail_step == "vendor":
            raise StepError(VENDOR_UNAVAILABLE)

    async def cancel(self, order: OrderRequest) -> None:
        await trio.sleep(order.compensation_delay_ms.get("vendor", self.cancel_delay_ms) / 1000)
        if order.fail_compensation == "vendor":
            raise StepError(VENDOR_CANCEL_FAILED)
