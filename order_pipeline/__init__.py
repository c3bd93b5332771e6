"""order-pipeline: process a delivery order with concurrent steps under Trio.

Payment, vendor notification and courier assignment run at once; the first
failure, the deadline or the client going away cancels the rest.
"""

import importlib
import typing

if typing.TYPE_CHECKING:
    from .model import OrderRequest, OrderResult, StepError, StepResult, StepStatus
    from .orchestrator import Pipeline, Step
    from .server import Assembly, assemble, serve
    from .settings import Settings

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
    if name == "__version__":  # the installed distribution's, as `--version` prints it
        # Read when asked, not at import: importlib.metadata takes a while to load, and the
        # command (`__main__`) imports this package before it can catch a Ctrl+C quietly.
        return importlib.import_module("importlib.metadata").version("order-pipeline")
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value
