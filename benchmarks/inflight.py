"""20,000 orders in flight at once in one process, without HTTP: CPU and memory per order.

Usage: python benchmarks/inflight.py [service|trio-floor] [--memory] [--orders N] [--default-gc]

Prints one JSON object. Payment and vendor take 2 s; the courier takes no time,
since the pool (at most 128 couriers) would otherwise serialise the orders. The
figure is CPU time per order, over the whole run.

`trio-floor` runs the same shape with nothing of ours in it: per order a task,
a deadline scope, a nursery and three tasks that sleep 2 s, 2 s and 0 s. It is
what Trio itself costs for this design; the service's figures are read against it.

`--memory` measures resident memory per order in flight instead: the steps take
60 s, and memory is read once every order is waiting in its steps (no task left
to run), before any has finished; then the orders are cancelled. Not with 2 s
steps: starting 20,000 orders takes longer than that on a slow machine, so the
first would finish before the last began, and each sleep that ends leaves a
transient exception behind that the process keeps as resident memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Awaitable, Callable

import trio
import trio.testing

from order_pipeline.main import tune_garbage_collector
from order_pipeline.model import OrderRequest
from order_pipeline.serialization import converter
from order_pipeline.server import assemble
from order_pipeline.settings import Settings

SLOW_S = 2.0
MEMORY_SLOW_S = 60.0


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def service_process(orders: int, slow_s: float) -> Callable[[OrderRequest], Awaitable[object]]:
    service = assemble(Settings(courier_pool_size=128, courier_queue_limit=orders))
    # No log line per order: measure the orchestration, not the logging.
    pipeline = service.pipeline.__class__(
        service.pipeline.steps, timeout=slow_s + 30, on_finish=lambda _: None
    )

    async def process(order: OrderRequest) -> object:
        result = await pipeline.process(order)
        assert result.ok
        return result

    return process


def trio_floor_process(slow_s: float) -> Callable[[OrderRequest], Awaitable[object]]:
    async def step(seconds: float) -> None:
        await trio.sleep(seconds)

    async def process(order: OrderRequest) -> object:
        with trio.move_on_after(slow_s + 30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(step, slow_s)
                nursery.start_soon(step, slow_s)
                nursery.start_soon(step, 0)
        return None

    return process


def orders_of(count: int, slow_s: float) -> list[OrderRequest]:
    delays = {"payment": int(slow_s * 1000), "vendor": int(slow_s * 1000), "courier": 0}
    return [
        converter.structure({"order_id": f"o{n}", "amount": 1, "delay_ms": delays}, OrderRequest)
        for n in range(count)
    ]


async def cpu(
    process: Callable[[OrderRequest], Awaitable[object]], orders: int, default_gc: bool
) -> dict[str, float]:
    requests = orders_of(orders, SLOW_S)
    if not default_gc:
        tune_garbage_collector()  # as `order-pipeline serve` does
    done = 0

    async def one(order: OrderRequest) -> None:
        nonlocal done
        await process(order)
        done += 1

    cpu_before, wall_before = time.process_time(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for order in requests:
            nursery.start_soon(one, order)
    cpu_s = time.process_time() - cpu_before
    assert done == orders
    return {
        "orders": orders,
        "cpu_us_per_order": cpu_s / orders * 1e6,
        "wall_s": time.perf_counter() - wall_before,
        "gc_collections": sum(s["collections"] for s in gc.get_stats()),
    }


async def memory(
    process: Callable[[OrderRequest], Awaitable[object]], orders: int, default_gc: bool
) -> dict[str, float]:
    requests = orders_of(orders, MEMORY_SLOW_S)
    if not default_gc:
        tune_garbage_collector()
    gc.collect()
    before_kb = rss_kb()
    finished = 0

    async def one(order: OrderRequest) -> None:
        nonlocal finished
        await process(order)
        finished += 1

    async with trio.open_nursery() as nursery:
        for order in requests:
            nursery.start_soon(one, order)
        await trio.testing.wait_all_tasks_blocked()  # every order now waits in its steps
        in_flight_kb = rss_kb()
        assert finished == 0, "an order finished before the last had started"
        nursery.cancel_scope.cancel()
    return {"orders": orders, "kb_per_in_flight_order": (in_flight_kb - before_kb) / orders}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", nargs="?", choices=["service", "trio-floor"], default="service")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--orders", type=int, default=20_000)
    parser.add_argument("--default-gc", action="store_true")
    args = parser.parse_args()
    slow_s = MEMORY_SLOW_S if args.memory else SLOW_S
    if args.what == "service":
        process = service_process(args.orders, slow_s)
    else:
        process = trio_floor_process(slow_s)
    measure = memory if args.memory else cpu
    print(json.dumps(trio.run(measure, process, args.orders, args.default_gc)))


if __name__ == "__main__":
    main()
