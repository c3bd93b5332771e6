"""The simulated payment step and its compensation, the refund, against the provider's ledger."""

from __future__ import annotations

from typing import Final, Protocol

import attrs
import trio

from ..kinds import PAYMENT_DECLINED
from ..model import OrderRequest, StepError, current_attempt

REFUND_FAILED: Final = "refund_failed"


class Ledger(Protocol):
    """The payment provider's own record of money taken and given back (the store keeps one)."""

    async def charge(self, charge_id: str, key: str, amount: int) -> None: ...

    async def refund(self, charge_id: str, key: str) -> None: ...


@attrs.frozen
class PaymentService:
    """Charges the order's amount; declines a non-positive amount, after the delay.

    With a `ledger`, a charge is written there under the current attempt's id
    before the step succeeds, and a refund is written there before the
    compensation succeeds: the ledger is what shows that no money is lost or
    taken twice. A refund is idempotent, so recovery may refund a charge whose
    outcome it never saw.
    """

    delay_ms: int = 150
    refund_delay_ms: int = 80
    ledger: Ledger | None = None

    async def charge(self, order: OrderRequest) -> None:
        await trio.sleep(order.delay_ms.get("payment", self.delay_ms) / 1000)
        if order.fail_step == "payment" or order.amount <= 0:
            raise StepError(PAYMENT_DECLINED)
        attempt = current_attempt.get()
        if self.ledger is not None and attempt is not None:
            await self.ledger.charge(attempt.id, attempt.key, order.amount)

    async def refund(self, order: OrderRequest) -> None:
        await trio.sleep(order.compensation_delay_ms.get("payment", self.refund_delay_ms) / 1000)
        if order.fail_compensation == "payment":
            raise StepError(REFUND_FAILED)
        attempt = current_attempt.get()
        if self.ledger is not None and attempt is not None:
            await self.ledger.refund(attempt.id, attempt.key)
