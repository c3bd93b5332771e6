"""Clients that go away mid-order: their steps are cancelled at once, nothing leaks."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator

import pytest
import trio

from order_pipeline.server import Assembly, Settings

from .conftest import serving
from .rawhttp import address, exchange, parse, read_all, request

LONG = {"payment": 5_000, "vendor": 5_000, "courier": 5_000}


@pytest.fixture(name="served")
async def _served() -> AsyncIterator[tuple[Assembly, str]]:
    """The real server in this test's nursery, on 127.0.0.1, with its service to observe."""
    settings = Settings(access_log=False, courier_pool_size=128, courier_queue_limit=10_000)
    async with serving(settings) as served:
        yield served


async def test_disconnect_cancels_the_order_within_50_ms(served: tuple[Assembly, str]) -> None:
    """Closing the connection mid-order cancels its in-flight steps within 50 ms."""
    service, url = served
    body = json.dumps({"order_id": "gone", "amount": 1, "delay_ms": LONG}).encode()
    stream = await trio.open_tcp_stream(*address(url))
    await stream.send_all(request(body, close=False))
    with trio.fail_after(5):
        await service.tracker.wait_for(lambda n: n == 3)

    await stream.aclose()
    closed_at = trio.current_time()
    with trio.fail_after(5):
        await service.tracker.wait_for(lambda n: n == 0)

    assert trio.current_time() - closed_at < 0.05
    assert service.pool.in_use == 0


async def test_a_thousand_orders_half_of_them_abandoned(served: tuple[Assembly, str]) -> None:
    """1,000 concurrent orders, a random half of whose clients leave: the rest are answered."""
    service, url = served
    host, port = address(url)
    rng = random.Random(1234)
    leave = set(rng.sample(range(1000), 500))
    statuses: list[int] = []

    async def order(n: int) -> None:
        delays = {"payment": rng.randrange(0, 300), "vendor": rng.randrange(0, 300), "courier": 50}
        body = json.dumps({"order_id": f"o{n}", "amount": 1, "delay_ms": delays}).encode()
        if n in leave:
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(request(body))
                await trio.sleep(rng.uniform(0, 0.2))
            return
        statuses.append(parse(await exchange(url, request(body))).status)

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            for n in range(1000):
                nursery.start_soon(order, n)
        await service.tracker.wait_for(lambda n: n == 0)

    assert statuses == [200] * 500
    assert (service.pool.in_use, service.pool.waiting) == (0, 0)
    after = parse(await exchange(url, request(b'{"order_id": "after", "amount": 1}')))
    assert after.status == 200


async def test_reading_nothing_back_is_a_disconnect_too(served: tuple[Assembly, str]) -> None:
    """A client that half-closes and never reads still gets its order finished or cancelled."""
    service, url = served
    host, port = address(url)
    body = json.dumps({"order_id": "mute", "amount": 1, "delay_ms": {"vendor": 100}}).encode()
    async with await trio.open_tcp_stream(host, port) as stream:
        await stream.send_all(request(body))
        await stream.send_eof()
        with trio.fail_after(5):
            reply = await read_all(stream)
    assert reply == b"" or parse(reply).status == 200
    with trio.fail_after(5):
        await service.tracker.wait_for(lambda n: n == 0)
