"""The simulated vendor-notification step."""

from __future__ import annotations

from typing import Final

import attrs
import trio

from ..model import OrderRequest, StepError

VENDOR_UNAVAILABLE: Final = "vendor_unavailable"


@attrs.frozen
class VendorService:
    """Tells the vendor to start preparing the order."""

    delay_ms: int = 200

    async def notify(self, order: OrderRequest) -> None:
        await trio.sleep(order.delay_ms.get("vendor", self.delay_ms) / 1000)
        if order.fail_step == "vendor":
            raise StepError(VENDOR_UNAVAILABLE)
