"""The public names of the package, pinned: a change to them is a deliberate one."""

from __future__ import annotations

import inspect

import order_pipeline


def test_public_names() -> None:
    """`__all__` is sorted and is exactly what the package exposes (submodules aside), once
    each name has been used (they are imported on first use)."""
    for name in order_pipeline.__all__:
        getattr(order_pipeline, name)
    exposed = {
        name
        for name, value in vars(order_pipeline).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }

    assert order_pipeline.__all__ == sorted(order_pipeline.__all__)
    assert set(order_pipeline.__all__) == exposed
    assert exposed == {
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
    }
