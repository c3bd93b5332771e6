"""What the two crash tests share: paid orders in flight on a server that is then killed, the
wait for their recovery, and sending them all again (tests/test_crash.py, tests/test_hosts.py).
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any, Final

import httpx
import trio

from order_pipeline.store import RUNNING, OrderStore, StoredOrder, every_order

from .server_process import ServerProcess

# Paid at once; still waiting for vendor and courier when the server is killed.
PAID_THEN_SLOW: Final = {"payment": 0, "vendor": 2000, "courier": 2000}


async def all_orders(store: OrderStore) -> list[tuple[StoredOrder, int]]:
    """Every stored order with its net charge, read page by page."""
    return [listed async for listed in every_order(store)]


def paid_orders(prefix: str, count: int) -> dict[str, dict[str, Any]]:
    """`count` orders by key, each of a different amount, each paid before its other steps."""
    return {
        f"{prefix}-{n}": {"order_id": f"o-{n}", "amount": n + 1, "delay_ms": PAID_THEN_SLOW}
        for n in range(count)
    }


async def kill_with_paid_orders_in_flight(
    server: ServerProcess, orders: dict[str, dict[str, Any]], store: OrderStore
) -> list[tuple[StoredOrder, int]]:
    """Send `orders` to `server`, wait until the ledger holds every charge, SIGKILL it.

    Returns the stored orders as they were just before the kill.
    """
    total = sum(order["amount"] for order in orders.values())

    async def send(http: httpx.AsyncClient, key: str) -> None:
        with suppress(httpx.TransportError):  # killed under it: no reply is the point
            await http.post("/order", json=orders[key], headers={"Idempotency-Key": key})

    limits = httpx.Limits(max_connections=len(orders))
    async with (
        httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as http,
        trio.open_nursery() as nursery,
    ):
        for key in orders:
            nursery.start_soon(send, http, key)
        # Another process's store: there is no event to wait on, so poll it.
        with trio.fail_after(20):
            while sum(net for _, net in await all_orders(store)) < total:  # noqa: ASYNC110 # poll
                await trio.sleep(0.1)
        stored = await all_orders(store)
        server.process.kill()
    assert await server.process.wait() == -9
    return stored


async def wait_until_none_running(store: OrderStore, within: float) -> float:
    """Seconds until no stored order runs any more (polled), failing past `within`."""
    started = trio.current_time()
    with trio.fail_after(within):
        while any(o.state == RUNNING for o, _ in await all_orders(store)):  # noqa: ASYNC110 # poll
            await trio.sleep(0.1)
    return trio.current_time() - started


async def send_again(url: str, orders: dict[str, dict[str, Any]]) -> dict[str, httpx.Response]:
    """Every order sent again at once, with its key, to `url`: the reply to each."""
    replies: dict[str, httpx.Response] = {}

    async def retry(http: httpx.AsyncClient, key: str) -> None:
        replies[key] = await http.post("/order", json=orders[key], headers={"Idempotency-Key": key})

    limits = httpx.Limits(max_connections=len(orders))
    async with (
        httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http,
        trio.open_nursery() as nursery,
    ):
        for key in orders:
            nursery.start_soon(retry, http, key)
    return replies
