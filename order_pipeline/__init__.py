"""order-pipeline: process a delivery order with concurrent steps under Trio.

Payment, vendor notification and courier assignment run at once; the first
failure, the deadline or the client going away cancels the rest.
"""

import importlib.metadata

from .model import OrderRequest, OrderResult, StepError, StepResult, StepStatus
from .orchestrator import Pipeline, Step
from .server import Assembly, Settings, assemble, serve

# The installed distribution's version, as `order-pipeline --version` prints it.
__version__ = importlib.metadata.version("order-pipeline")

__all__ = [
    "Assembly",
    "OrderRequest",
    "OrderResult",
    "Pipeline",
    "Settings",
    "Step",
    "StepError",
    "StepResult",
    "StepStatus",
    "assemble",
    "serve",
]
