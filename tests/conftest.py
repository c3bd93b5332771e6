"""Shared fixtures and helpers; hypothesis profiles (`fuzz` runs many more examples)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from order_pipeline.model import OrderRequest
from order_pipeline.serialization import converter

from .server_process import StartServer, server_factory

settings.register_profile("default", deadline=None)
settings.register_profile(
    "fuzz", deadline=None, max_examples=5_000, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("default")


def make_order(order_id: str = "o-1", **fields: Any) -> OrderRequest:
    """An order built through the real converter, so tests obey the same rules."""
    return converter.structure({"order_id": order_id, **fields}, OrderRequest)


@pytest.fixture(name="order")
def _order() -> OrderRequest:
    return make_order(amount=100)


@pytest.fixture(name="start_server")
async def _start_server(tmp_path: Path) -> AsyncIterator[StartServer]:
    """Start the real server (a subprocess on 127.0.0.1, port 0) with extra flags."""
    async with server_factory(tmp_path) as start:
        yield start
