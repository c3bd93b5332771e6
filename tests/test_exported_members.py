"""The public names of the package, pinned: a change to them is a deliberate one."""

from __future__ import annotations

import order_pipeline


def test_public_names() -> None:
    """`order_pipeline.__all__` is exactly the documented public surface, sorted."""
    assert order_pipeline.__all__ == [
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
    for name in order_pipeline.__all__:
        assert getattr(order_pipeline, name) is not None
