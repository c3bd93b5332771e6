"""Domain services: the simulated payment, vendor and courier steps, and their helpers.

Nothing here knows about HTTP; each step is an async callable taking an order.
"""

from .courier import NO_COURIER, CourierService
from .payment import PAYMENT_DECLINED, PaymentService
from .pool import CourierPool
from .tracker import StepTracker
from .vendor import VENDOR_UNAVAILABLE, VendorService

__all__ = [
    "NO_COURIER",
    "PAYMENT_DECLINED",
    "VENDOR_UNAVAILABLE",
    "CourierPool",
    "CourierService",
    "PaymentService",
    "StepTracker",
    "VendorService",
]
