"""Concurrency far past the reference: 20,000 orders in flight, 5,000 connections at once."""

from __future__ import annotations

import json
import resource
from collections import Counter
from typing import Any

import pytest
import trio
import trio.testing

from order_pipeline.model import StepStatus
from order_pipeline.server import Settings, assemble

from .conftest import make_order
from .rawhttp import address, parse, read_all, request
from .server_process import StartServer

pytestmark = pytest.mark.stress

IN_FLIGHT = 20_000
CONNECTIONS = 5_000


async def test_twenty_thousand_orders_in_flight_at_once(autojump_clock: trio.abc.Clock) -> None:
    """20,000 orders run at the same moment through the real services; every result checked."""
    service = assemble(Settings(courier_pool_size=128, courier_queue_limit=IN_FLIGHT))
    delays = {"payment": 2000, "vendor": 2000, "courier": 0}
    orders = [
        make_order(f"o{n}", amount=1, delay_ms=delays, fail_step="vendor" if n % 4 == 0 else None)
        for n in range(IN_FLIGHT)
    ]
    kinds: Counter[str | None] = Counter()

    async def run(n: int) -> None:
        result = await service.pipeline.process(orders[n])
        kinds[result.kind] += 1
        expected = StepStatus.ERROR if n % 4 == 0 else StepStatus.OK
        assert [s.status for s in result.steps][1] == expected

    async with trio.open_nursery() as nursery:
        for n in range(IN_FLIGHT):
            nursery.start_soon(run, n)
        await trio.testing.wait_all_tasks_blocked()
        # Every order is in flight now: 20,000 payments and vendors are sleeping.
        assert service.tracker.in_flight >= 2 * IN_FLIGHT
        assert trio.current_time() == 0

    assert kinds == {None: IN_FLIGHT * 3 // 4, "vendor_unavailable": IN_FLIGHT // 4}
    assert service.tracker.in_flight == 0
    assert (service.pool.in_use, service.pool.waiting) == (0, 0)


def raise_open_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} open files; the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


SLOW = 6000  # ms: every order outlasts the time it takes to open all the connections
MIX: list[tuple[dict[str, Any], int, str]] = [
    ({"amount": 1, "delay_ms": {"vendor": SLOW}}, 200, "ok"),
    ({"amount": 0, "delay_ms": {"payment": SLOW, "vendor": SLOW + 1000}}, 400, "payment_declined"),
    ({"amount": 1, "fail_step": "vendor", "delay_ms": {"vendor": SLOW}}, 503, "vendor_unavailable"),
    ({"amount": 1, "fail_step": "courier", "delay_ms": {"courier": SLOW}}, 503, "no_courier"),
]


async def test_five_thousand_simultaneous_connections(start_server: StartServer) -> None:
    """5,000 connections open at once to the real server, mixed outcomes, all answered right."""
    raise_open_file_limit(2 * CONNECTIONS + 1000)  # the server inherits the raised limit
    server = await start_server(
        "--no-access-log", "--courier-pool-size", "128", "--courier-queue-limit", "10000",
        "--request-timeout", "120",
        # One process on two cores takes several seconds to reach the headers of the
        # last of 5,000 connections accepted at once; the 3 s default would close them.
        "--header-timeout", "60",
    )  # fmt: skip # flags and their values in pairs, as on a command line
    host, port = address(server.url)
    open_now = peak = answered = 0
    wrong: list[str] = []

    async def client(n: int) -> None:
        nonlocal open_now, peak, answered
        fields, status, kind = MIX[n % len(MIX)]
        body = json.dumps({"order_id": f"c{n}", **fields}).encode()
        async with await trio.open_tcp_stream(host, port) as stream:
            open_now += 1
            peak = max(peak, open_now)
            await stream.send_all(request(body))
            reply = parse(await read_all(stream))
            open_now -= 1
        got = (reply.status, reply.json()["error"]["kind"] if reply.status != 200 else "ok")
        if got != (status, kind):
            wrong.append(f"c{n}: {got}")
        answered += 1

    with trio.fail_after(240):
        async with trio.open_nursery() as nursery:
            for n in range(CONNECTIONS):
                nursery.start_soon(client, n)

    assert wrong == []
    assert answered == CONNECTIONS
    assert peak == CONNECTIONS
