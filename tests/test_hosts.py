"""Several hosts, one PostgreSQL: two server processes on different ports share one schema.

Each "host" is a real server process (`order-pipeline serve --store postgresql://...`) on
127.0.0.1; both use the test's own schema on the test server (tests/pg.py). One new key sent
to both at the same moment runs once; a host SIGKILLed with 200 paid orders in flight has them
refunded and recorded `interrupted` by the other, already running, within the lease timeout
plus 2 s, and retrying them on that host runs each once. docs/deploying.md shows the same by
hand. The chaos test over two hosts is in tests/test_chaos.py.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from order_pipeline.store import FINISHED, RUNNING, every_order, open_store

from .crash import kill_with_paid_orders_in_flight, paid_orders, send_again, wait_until_none_running
from .pg import postgres_url
from .server_process import ServerProcess, StartServer

pytestmark = pytest.mark.postgres

LEASE_S = 2.0
PER_HOST = 50
ORDERS = 200


@pytest.fixture(name="url")
def _url(schema: str) -> str:
    """The store's URL: the test server, on a schema of the test's own (skips without one)."""
    return postgres_url(schema=schema)


def order_lines(*hosts: ServerProcess) -> list[dict[str, Any]]:
    """The one log line per order of every host (the orders that ran or were undone there)."""
    return [line for host in hosts for line in order_lines_of(host.log_lines())]


def order_lines_of(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line["logger"] == "order_pipeline.orders" and "kind" in line]


async def test_one_new_key_sent_to_both_hosts_at_once_runs_once(
    start_server: StartServer, url: str
) -> None:
    """50 requests with one new key to each host at once: one run, the rest 409 or a replay."""
    hosts = [await start_server("--store", url, "--no-access-log") for _ in range(2)]
    assert hosts[0].url != hosts[1].url
    order = {"order_id": "once", "amount": 40, "delay_ms": {"payment": 200}}
    go = trio.Event()
    replies: list[httpx.Response] = []
    by_host: list[Counter[str]] = [Counter(), Counter()]  # each host's answers, for the record

    async def send(http: httpx.AsyncClient, host: int) -> None:
        await go.wait()
        reply = await http.post("/order", json=order, headers={"Idempotency-Key": "one"})
        replies.append(reply)
        replayed = "Idempotent-Replayed" in reply.headers
        by_host[host]["replayed" if replayed else str(reply.status_code)] += 1

    limits = httpx.Limits(max_connections=PER_HOST)
    async with (
        httpx.AsyncClient(base_url=hosts[0].url, limits=limits, timeout=30) as first,
        httpx.AsyncClient(base_url=hosts[1].url, limits=limits, timeout=30) as second,
        trio.open_nursery() as nursery,
    ):
        for host, http in enumerate((first, second)):
            for _ in range(PER_HOST):
                nursery.start_soon(send, http, host)
        go.set()

    assert len(replies) == 2 * PER_HOST
    ran = [r for r in replies if r.status_code == 200 and "Idempotent-Replayed" not in r.headers]
    assert len(ran) == 1
    for reply in replies:
        if reply.status_code == 200:  # the run, or a replay of it: the same bytes
            assert reply.content == ran[0].content
        else:
            assert reply.status_code == 409, reply.content
            assert reply.json()["error"]["kind"] == "order_in_progress"
    assert json.loads(ran[0].content)["status"] == "ok"
    async with open_store(url) as store:
        assert await store.net_charge("one") == 40
    for server in hosts:
        assert await server.stop() == 0  # every line written
    assert [line["kind"] for line in order_lines(*hosts) if line["kind"] == "ok"] == ["ok"]
    print(f"hosts: one key, {PER_HOST} requests to each host: {[dict(c) for c in by_host]}")


@pytest.mark.chaos
async def test_a_host_killed_with_200_orders_in_flight_is_undone_by_the_other(
    start_server: StartServer, url: str
) -> None:
    """A host SIGKILLed mid-order: the other refunds all 200 in lease + 2 s; retries run once."""
    flags = (
        "--store", url, "--lease-timeout", str(LEASE_S), "--no-access-log",
        "--courier-pool-size", "128", "--courier-queue-limit", "10000",
    )  # fmt: skip # one flag and its value a pair
    doomed = await start_server(*flags, check_exit=False)
    survivor = await start_server(*flags)  # up and holding its lease before the kill
    orders = paid_orders("hosts", ORDERS)

    async with open_store(url) as store:
        stored = await kill_with_paid_orders_in_flight(doomed, orders, store)
        assert all(o.state == RUNNING for o, _ in stored)  # all in flight on the doomed host
        assert len({o.owner for o, _ in stored}) == 1  # the doomed host's process

        # The survivor claims them once the dead host's lease expires.
        recovered_in = await wait_until_none_running(store, LEASE_S + 2)

        after = {o.key: (o, net) async for o, net in every_order(store)}
        assert set(after) == set(orders)
        owners = {o.owner for o, _ in after.values()}
        assert len(owners) == 1  # one claimer: the survivor
        assert owners.isdisjoint({o.owner for o, _ in stored})
        for key, (order, net) in after.items():
            assert (order.state, order.kind, order.http_status, net) == (
                FINISHED,
                "interrupted",
                503,
                0,
            ), key

        def interrupted(lines: list[dict[str, Any]]) -> int:
            return sum(1 for line in order_lines_of(lines) if line["kind"] == "interrupted")

        logged = await survivor.wait_for_lines(lambda lines: interrupted(lines) >= ORDERS)
        assert interrupted(logged) == ORDERS

        retried = await send_again(survivor.url, orders)

        assert set(retried) == set(orders)
        for key, response in retried.items():
            assert response.status_code == 200, (key, response.content)
            assert "Idempotent-Replayed" not in response.headers, key
            assert json.loads(response.content)["status"] == "ok"
            assert await store.net_charge(key) == orders[key]["amount"], key
        attempts = {o.key: o.attempt async for o, _ in every_order(store)}
        assert attempts == dict.fromkeys(orders, 2)
    print(f"hosts: {ORDERS} orders of a killed host recovered by the other in {recovered_in:.2f} s")


async def test_a_server_whose_store_process_dies_exits_and_a_restart_serves_on(
    start_server: StartServer, url: str
) -> None:
    """Its store process killed (say, by the out-of-memory killer): the server exits 1 at
    once with one error line, as if the database code had crashed it (its orders in flight
    are recovered by lease, as after any crash), and a restart on the same database serves on."""
    flags = ("--store", url, "--no-access-log")
    first = await start_server(*flags, check_exit=False)
    order, key = {"order_id": "before", "amount": 5}, {"Idempotency-Key": "before"}
    async with httpx.AsyncClient(base_url=first.url, timeout=30) as http:
        assert (await http.post("/order", json=order, headers=key)).status_code == 200
    (store_process,) = _children(first.process.pid)
    os.kill(store_process, signal.SIGKILL)
    with trio.fail_after(10):
        assert await first.process.wait() == 1
    (line,) = first.errors()
    assert line["message"].startswith("the store process ended unexpectedly")
    second = await start_server(*flags)
    async with httpx.AsyncClient(base_url=second.url, timeout=30) as http:
        replayed = await http.post("/order", json=order, headers=key)
    assert (replayed.status_code, replayed.headers["Idempotent-Replayed"]) == (200, "true")


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
