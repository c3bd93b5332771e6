"""20,000 orders in flight at once in one process, without HTTP: CPU and memory per order.

Prints one JSON object. Payment and vendor take 2 s; the courier takes no time,
since the pool (at most 128 couriers) would otherwise serialise the orders.
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time

import trio

from order_pipeline.model import OrderRequest
from order_pipeline.serialization import converter
from order_pipeline.server import build_service, tune_garbage_collector
from order_pipeline.settings import Settings

ORDERS = 20_000


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


async def main() -> dict[str, float]:
    service = build_service(Settings(courier_pool_size=128, courier_queue_limit=ORDERS))
    pipeline = service.pipeline.__class__(
        service.pipeline.steps, timeout=30, on_finish=lambda _: None
    )  # no log line per order: measure the orchestration, not the logging
    orders = [
        converter.structure(
            {
                "order_id": f"o{n}",
                "amount": 1,
                "delay_ms": {"payment": 2000, "vendor": 2000, "courier": 0},
            },
            OrderRequest,
        )
        for n in range(ORDERS)
    ]
    if "--default-gc" not in sys.argv:
        tune_garbage_collector()  # as `order-pipeline serve` does
    gc.collect()
    before_kb = rss_kb()
    cpu_before = time.process_time()
    wall_before = time.perf_counter()
    peak_kb = 0
    done = 0

    async def one(order: OrderRequest) -> None:
        nonlocal done
        result = await pipeline.process(order)
        assert result.ok
        done += 1

    async with trio.open_nursery() as nursery:
        for order in orders:
            nursery.start_soon(one, order)
        await trio.sleep(1)  # every order is now waiting on its 2 s steps
        peak_kb = rss_kb()
    cpu = time.process_time() - cpu_before
    assert done == ORDERS
    return {
        "orders": ORDERS,
        "cpu_us_per_order": cpu / ORDERS * 1e6,
        "kb_per_in_flight_order": (peak_kb - before_kb) / ORDERS,
        "wall_s": time.perf_counter() - wall_before,
        "gc_collections": sum(s["collections"] for s in gc.get_stats()),
    }


if __name__ == "__main__":
    print(json.dumps(trio.run(main)))
