"""20,000 orders in flight at once in one process, without HTTP: CPU and memory per order.

Usage: python benchmarks/inflight.py [service|trio-floor] [--orders N] [--default-gc]

Prints one JSON object. Payment and vendor take 2 s; the courier takes no time,
since the pool (at most 128 couriers) would otherwise serialise the orders.

`trio-floor` runs the same shape with nothing of ours in it: per order a task,
a deadline scope, a nursery and three tasks that sleep 2 s, 2 s and 0 s. It is
what Trio itself costs for this design; the service's figures are read against it.

Memory: a sampler notes resident memory and the number of orders in flight every
50 ms; the figure is taken at the sample with the most orders in flight (growth
since start-up divided by that number). On a slow machine the last orders start
after the first have finished, so "orders in flight" is counted, not assumed.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Awaitable, Callable

import trio

from order_pipeline.model import OrderRequest
from order_pipeline.serialization import converter
from order_pipeline.server import build_service, tune_garbage_collector
from order_pipeline.settings import Settings

SLOW_S = 2.0
SAMPLE_EVERY_S = 0.05


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def service_process(orders: int) -> Callable[[OrderRequest], Awaitable[object]]:
    service = build_service(Settings(courier_pool_size=128, courier_queue_limit=orders))
    # No log line per order: measure the orchestration, not the logging.
    pipeline = service.pipeline.__class__(
        service.pipeline.steps, timeout=30, on_finish=lambda _: None
    )

    async def process(order: OrderRequest) -> object:
        result = await pipeline.process(order)
        assert result.ok
        return result

    return process


async def trio_floor_process(order: OrderRequest) -> object:
    async def step(seconds: float) -> None:
        await trio.sleep(seconds)

    with trio.move_on_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(step, SLOW_S)
            nursery.start_soon(step, SLOW_S)
            nursery.start_soon(step, 0)
    return None


async def measure(
    process: Callable[[OrderRequest], Awaitable[object]], orders: int, default_gc: bool
) -> dict[str, float]:
    delays = {"payment": int(SLOW_S * 1000), "vendor": int(SLOW_S * 1000), "courier": 0}
    requests = [
        converter.structure({"order_id": f"o{n}", "amount": 1, "delay_ms": delays}, OrderRequest)
        for n in range(orders)
    ]
    if not default_gc:
        tune_garbage_collector()  # as `order-pipeline serve` does
    gc.collect()
    before_kb = rss_kb()
    in_flight = done = 0
    peak = (0, before_kb)  # (orders in flight, resident KB) at the fullest sample

    async def one(order: OrderRequest) -> None:
        nonlocal in_flight, done
        in_flight += 1
        await process(order)
        in_flight -= 1
        done += 1

    async def sample() -> None:
        nonlocal peak
        while True:
            if in_flight > peak[0]:
                peak = (in_flight, rss_kb())
            await trio.sleep(SAMPLE_EVERY_S)

    cpu_before, wall_before = time.process_time(), time.perf_counter()
    async with trio.open_nursery() as outer:
        outer.start_soon(sample)
        async with trio.open_nursery() as nursery:
            for order in requests:
                nursery.start_soon(one, order)
        outer.cancel_scope.cancel()
    cpu = time.process_time() - cpu_before
    assert done == orders
    return {
        "orders": orders,
        "cpu_us_per_order": cpu / orders * 1e6,
        "peak_orders_in_flight": peak[0],
        "kb_per_in_flight_order": (peak[1] - before_kb) / peak[0],
        "wall_s": time.perf_counter() - wall_before,
        "gc_collections": sum(s["collections"] for s in gc.get_stats()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", nargs="?", choices=["service", "trio-floor"], default="service")
    parser.add_argument("--orders", type=int, default=20_000)
    parser.add_argument("--default-gc", action="store_true")
    args = parser.parse_args()
    process = service_process(args.orders) if args.what == "service" else trio_floor_process
    print(json.dumps(trio.run(measure, process, args.orders, args.default_gc)))


if __name__ == "__main__":
    main()
