"""order-pipeline: process a delivery order with concurrent steps under Trio.

Payment, vendor notification and courier assignment run at once; the first
failure, the deadline or the client going away cancels the rest.
"""

from .model import OrderRequest, OrderResult, StepError, StepResult, StepStatus
from .orchestrator import Pipeline, Step
from .server import Service, Settings, build_service, serve

__all__ = [
    "OrderRequest",
    "OrderResult",
    "Pipeline",
    "Service",
    "Settings",
    "Step",
    "StepError",
    "StepResult",
    "StepStatus",
    "build_service",
    "serve",
]
