"""Clients that go away mid-order: their steps are cancelled at once, nothing leaks."""

from __future__ import annotations

import json
import logging
import random
import socket
import struct
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


@pytest.mark.parametrize("leaving", ["close", "reset"])
@pytest.mark.parametrize(
    "behind",
    [b"", b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n", request(b'{"order_id": "next"}')],
    ids=["nothing", "a GET", "an order"],
)
async def test_a_client_gone_with_a_request_pipelined_behind_its_order_cancels_it_at_once(
    served: tuple[Assembly, str], caplog: pytest.LogCaptureFixture, behind: bytes, leaving: str
) -> None:
    """A client that pipelines a request behind its order and then leaves (a close, or a
    reset) cancels the order at once, as one with nothing behind it does: same line, same
    count. The server read nothing past a request pipelined behind another (h11 PAUSED)
    until that other's reply, so it never saw the client leave: the order ran its 5 s to its
    end, logged and counted as answered, and its reply went to no one."""
    caplog.set_level(logging.INFO, logger="order_pipeline.orders")
    service, url = served
    body = json.dumps({"order_id": "gone", "amount": 1, "delay_ms": LONG}).encode()
    stream = await trio.open_tcp_stream(*address(url))
    await stream.send_all(request(body, close=False) + behind)
    with trio.fail_after(5):
        await service.tracker.wait_for(lambda n: n == 3)

    if leaving == "reset":  # SO_LINGER 0: the close is a reset
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()
    with trio.fail_after(1):  # at once: the steps take 5 s (under load here, up to 0.4 s)
        await service.tracker.wait_for(lambda n: n == 0)

    (line,) = [r.__dict__["fields"] for r in caplog.records if r.name == "order_pipeline.orders"]
    assert (line["order_id"], line["kind"], line["http_status"]) == ("gone", "canceled", None)
    canceled = service.metrics.registry.get_sample_value("order_pipeline_orders_canceled_total")
    assert (canceled, service.pool.in_use) == (1, 0)


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
