"""The default delays, read from the services: what a test expects of an order that sets none.

A test that expects a duration made of defaults takes it from here, so changing a
default changes no test; the delays a test chooses for itself stay written in it.
"""

from __future__ import annotations

from typing import Final

from order_pipeline.server import Settings
from order_pipeline.services import CourierPool, CourierService, PaymentService, VendorService

_payment, _vendor, _courier = PaymentService(), VendorService(), CourierService(CourierPool(1))

DELAY_MS: Final = {
    "payment": _payment.delay_ms,
    "vendor": _vendor.delay_ms,
    "courier": _courier.delay_ms,
}
"""Each step's default delay, by step name, in the order the steps are registered."""

UNDO_MS: Final = {
    "payment": _payment.refund_delay_ms,
    "vendor": _vendor.cancel_delay_ms,
    "courier": _courier.release_delay_ms,
}
"""Each step's compensation's default delay: refund, cancel the notification, release."""

DEADLINE_MS: Final = round(Settings().request_timeout * 1000)
"""An order's default deadline."""

NO_DELAY: Final = dict.fromkeys(DELAY_MS, 0)
"""`delay_ms` of an order whose steps take no time."""


def seconds(*ms: int) -> float:
    """Trio's clock after sleeping each of `ms` milliseconds in turn from 0, summed as it sums them.

    Summing in the clock's order keeps `trio.current_time() == seconds(...)` exact
    (0.25 + 0.09 is not 0.34 in floating point).
    """
    return sum(m / 1000 for m in ms)
