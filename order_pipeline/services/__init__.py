"""Domain services: the simulated payment, vendor and courier steps, and their helpers.

Nothing here knows about HTTP; each step is an async callable taking an order.
"""

from .courier import CourierService
from .payment import PaymentService
from .pool import CourierPool
from .tracker import StepTracker
from .vendor import VendorService

__all__ = [
    "CourierPool",
    "CourierService",
    "PaymentService",
    "StepTracker",
    "VendorService",
]
