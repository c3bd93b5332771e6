"""order-pipeline: process a delivery order with concurrent steps under Trio.

Payment, vendor notification and courier assignment run at once; the first
failure, the deadline or the client going away cancels the rest.
"""

import importlib
import importlib.metadata
import typing

if typing.TYPE_CHECKING:
    from .model import OrderRequest, OrderResult, StepError, StepResult, StepStatus
    from .orchestrator import Pipeline, Step
    from .server import Assembly, assemble, serve
    from .settings import Settings

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

# Where each name lives. They are imported when first used, so a process that needs
# only a part of the package (the store process: the store and the model) does not
# import the web framework.
_HOMES = {
    "OrderRequest": "model",
    "OrderResult": "model",
    "StepError": "model",
    "StepResult": "model",
    "StepStatus": "model",
    "Pipeline": "orchestrator",
    "Step": "orchestrator",
    "Assembly": "server",
    "Settings": "settings",
    "assemble": "server",
    "serve": "server",
}


def __getattr__(name: str) -> typing.Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value
