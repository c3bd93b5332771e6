"""Benchmarks (`nox -s bench`): pool throughput by capacity, orchestrator overhead per order.

They measure; they assert only that the work was done, never a time.
"""

from __future__ import annotations

import pytest
import trio
from pytest_benchmark.fixture import BenchmarkFixture

from order_pipeline.orchestrator import Pipeline, Step
from order_pipeline.services import CourierPool

from .conftest import make_order
from .fakes import Instant

pytestmark = pytest.mark.bench

TASKS = 2_000
ORDERS = 1_000


@pytest.mark.parametrize("capacity", [1, 2, 8, 64, 128])
def test_pool_throughput(benchmark: BenchmarkFixture, capacity: int) -> None:
    """2,000 tasks each take a slot, yield once and give it back."""
    benchmark.group = "pool: 2,000 slot acquisitions"

    async def run() -> int:
        pool = CourierPool(capacity)
        served = 0

        async def one() -> None:
            nonlocal served
            async with pool.slot():
                await trio.lowlevel.checkpoint()
                served += 1

        async with trio.open_nursery() as nursery:
            for _ in range(TASKS):
                nursery.start_soon(one)
        return served

    assert benchmark(trio.run, run) == TASKS


def test_orchestrator_overhead(benchmark: BenchmarkFixture) -> None:
    """1,000 orders of three zero-delay steps, one after another: divide by 1,000 per order."""
    benchmark.group = "orchestrator: 1,000 orders, zero delays"
    pipeline = Pipeline(
        [Step(n, Instant()) for n in ("payment", "vendor", "courier")], on_finish=lambda _: None
    )
    order = make_order(amount=1)

    async def run() -> int:
        ok = 0
        for _ in range(ORDERS):
            ok += (await pipeline.process(order)).ok
        return ok

    assert benchmark(trio.run, run) == ORDERS
