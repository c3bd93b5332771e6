"""A real server process on a SQLite file: one key at once from 100 clients, and a SIGKILL.

The crash test kills the server with 200 orders in flight after their payments,
starts a new one on the same file, and checks that it finds, refunds and
records every one of them within the lease timeout plus 2 s, and that a retry
of each then runs it once.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio

from order_pipeline.store import FINISHED, SqliteStore, every_order

from .crash import kill_with_paid_orders_in_flight, paid_orders, send_again, wait_until_none_running
from .server_process import StartServer

LEASE_S = 2.0
ORDERS = 200


async def test_a_hundred_clients_with_one_new_key_run_it_once(
    start_server: StartServer, tmp_path: Path
) -> None:
    """100 requests with the same new key at the same moment: one run, the rest 409 or a replay."""
    db = tmp_path / "orders.db"
    server = await start_server("--store", f"sqlite:///{db}", "--no-access-log")
    order = {"order_id": "once", "amount": 40, "delay_ms": {"payment": 200}}
    go = trio.Event()
    replies: list[httpx.Response] = []

    async def send(http: httpx.AsyncClient) -> None:
        await go.wait()
        replies.append(await http.post("/order", json=order, headers={"Idempotency-Key": "one"}))

    limits = httpx.Limits(max_connections=100)
    async with (
        httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as http,
        trio.open_nursery() as nursery,
    ):
        for _ in range(100):
            nursery.start_soon(send, http)
        go.set()

    statuses = sorted(r.status_code for r in replies)
    ran = [r for r in replies if r.status_code == 200 and "Idempotent-Replayed" not in r.headers]
    assert set(statuses) <= {200, 409}
    assert len(ran) == 1
    assert all(
        r.content == ran[0].content for r in replies if r.status_code == 200
    )  # replays are the same bytes
    async with SqliteStore(db) as store:
        assert await store.net_charge("one") == 40
    assert await server.stop() == 0  # every line written
    orders = [line for line in server.log_lines() if line["logger"] == "order_pipeline.orders"]
    assert [line["kind"] for line in orders if line["kind"] == "ok"] == ["ok"]


@pytest.mark.chaos
async def test_sigkill_with_200_orders_in_flight_then_a_restart_undoes_them(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Killed mid-order: the next server refunds all 200 within lease + 2 s; retries run once."""
    db = tmp_path / "orders.db"
    flags = (
        "--store", f"sqlite:///{db}", "--lease-timeout", str(LEASE_S), "--no-access-log",
        "--courier-pool-size", "128", "--courier-queue-limit", "10000",
    )  # fmt: skip # one flag and its value a pair
    first = await start_server(*flags, check_exit=False)
    orders = paid_orders("crash", ORDERS)

    async with SqliteStore(db) as store:
        await kill_with_paid_orders_in_flight(first, orders, store)

        second = await start_server(*flags)
        recovered_in = await wait_until_none_running(store, LEASE_S + 2)

        stored = {o.key: (o, net) async for o, net in every_order(store)}
        assert set(stored) == set(orders)
        for key, (order, net) in stored.items():
            assert (order.state, order.kind, order.http_status, net) == (
                FINISHED,
                "interrupted",
                503,
                0,
            ), key

        retried = await send_again(second.url, orders)
        for key, response in retried.items():
            assert response.status_code == 200, key
            assert json.loads(response.content)["status"] == "ok"
            assert await store.net_charge(key) == orders[key]["amount"], key
    print(f"crash: {ORDERS} interrupted orders recovered in {recovered_in:.2f} s")
