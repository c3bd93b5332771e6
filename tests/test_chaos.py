"""Chaos, in the spirit of Jepsen's bank test: SIGKILL the server at random while clients retry.

Concurrent clients send orders with random keys, amounts, failures and delays;
the server (a real subprocess on one SQLite file) is killed with SIGKILL at
random moments and started again; every client retries its order, with the
same key, until it gets a final reply. Then, for every key: exactly one final
result, and the one the client got; the ledger's net charge is the order's
amount if it ended ok and 0 otherwise (unless its refund was made to fail);
nothing left running; nothing needs attention unless a compensation was made
to fail. `nox -s chaos` runs it; CHAOS_ORDERS and CHAOS_KILLS set its size.

It runs three times: one host on a SQLite file; one host with `--workers 2` on
a SQLite file, where most kills fall on one worker (the supervisor restarts it, and
its orders are recovered once its lease lapses, by the other worker or its restart)
and the others on the supervisor with its workers (their process group), started
again; and two hosts (two server processes) on one PostgreSQL database, clients
spreading their requests over both and the kills falling on either.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from order_pipeline.model import STEP_NAMES
from order_pipeline.store import FINISHED, RUNNING, OrderStore, StoredOrder, every_order, open_store
from order_pipeline.supervisor import RESTART_LIMIT, RESTART_WINDOW_S

from . import pg
from .launch import serve_argv
from .server_process import wait_for_url

pytestmark = pytest.mark.chaos

ORDERS = int(os.environ.get("CHAOS_ORDERS", "500"))
KILLS = int(os.environ.get("CHAOS_KILLS", "5"))
CLIENTS = 50
LEASE_S = 2.0
SEED = int(os.environ.get("CHAOS_SEED", "0")) or random.randrange(1, 2**32)
# Replies that say "not yet": the client tries again with the same key.
NOT_FINAL = {"order_in_progress", "store_unavailable"}
# With --workers: how often a kill takes the supervisor with its workers, not one worker.
GROUP_KILL_SHARE = 0.25
WORKER_STARTED = re.compile(rb"worker (\d+) started \(pid (\d+)\)")


async def all_orders(store: OrderStore) -> list[tuple[StoredOrder, int]]:
    """Every stored order with its net charge, read page by page."""
    return [listed async for listed in every_order(store)]


@attrs.define
class Server:
    """One host's server process, started again after each kill; with `workers`, a supervisor
    in a process group of its own, whose workers are killed one at a time as well."""

    store_url: str
    log_dir: Path
    name: str
    workers: int = 1
    process: trio.Process | None = None
    url: str = ""
    up: trio.Event = attrs.Factory(trio.Event)
    starts: int = 0
    worker_kills: int = 0
    # The current supervisor's kills of each worker, by trio time: kept under its restart limit.
    killed_at: dict[int, list[float]] = attrs.Factory(dict)

    @property
    def log(self) -> Path:
        return self.log_dir / f"{self.name}-{self.starts}.log"

    async def start(self) -> None:
        self.starts += 1
        self.killed_at = {}
        argv = serve_argv(
            sys.executable, "--store", self.store_url, "--lease-timeout", str(LEASE_S),
            "--no-access-log", "--courier-pool-size", "128", "--workers", str(self.workers),
        )  # fmt: skip # one flag and its value a pair
        with self.log.open("wb") as out:
            self.process = await trio.lowlevel.open_process(
                argv,
                stdout=out,
                stderr=out,
                # A supervisor killed leaves its metrics directory: here, not in /tmp.
                env={**os.environ, "TMPDIR": str(self.log_dir)},
                start_new_session=self.workers > 1,
            )
        self.url = await wait_for_url(self.process, trio.Path(self.log))
        self.up.set()

    async def kill(self) -> None:
        """SIGKILL the server: with workers, the supervisor and its workers at once."""
        assert self.process is not None
        self.up = trio.Event()
        if self.workers > 1:
            os.killpg(self.process.pid, signal.SIGKILL)
        else:
            self.process.kill()
        await self.process.wait()

    async def strike(self, rng: random.Random) -> None:
        """One kill: of one live worker, mostly, if it has the restarts to spare (a worker
        that keeps dying is given up on, by design); else of the server, started again."""
        if self.workers > 1 and rng.random() >= GROUP_KILL_SHARE:
            now = trio.current_time()
            spare = [
                (number, pid)
                for number, pid in self.live_workers().items()
                if sum(now - t < RESTART_WINDOW_S for t in self.killed_at.get(number, []))
                < RESTART_LIMIT - 1
            ]
            if spare:
                number, pid = rng.choice(sorted(spare))
                os.kill(pid, signal.SIGKILL)
                self.killed_at.setdefault(number, []).append(now)
                self.worker_kills += 1
                return
        await self.kill()
        await self.start()

    def live_workers(self) -> dict[int, int]:
        """Each worker's latest pid, from the supervisor's `worker N started (pid P)` lines,
        if that process is still the supervisor's child (not one being restarted)."""
        assert self.process is not None
        latest = {int(n): int(pid) for n, pid in WORKER_STARTED.findall(self.log.read_bytes())}
        live = {}
        for number, pid in latest.items():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except FileNotFoundError:
                continue
            state, ppid = stat.rpartition(")")[2].split()[:2]
            if state != "Z" and int(ppid) == self.process.pid:
                live[number] = pid
        return live

    async def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        with trio.fail_after(60):
            return await self.process.wait()


def random_order(rng: random.Random, n: int) -> dict[str, Any]:
    order: dict[str, Any] = {
        "order_id": f"chaos-{n}",
        "amount": rng.choice([0, *range(1, 1000)]),
        "delay_ms": {s: rng.randrange(0, 400) for s in STEP_NAMES},
    }
    if rng.random() < 0.15:
        order["fail_step"] = rng.choice(STEP_NAMES)
    if rng.random() < 0.05:
        order["fail_compensation"] = rng.choice(STEP_NAMES)
    return order


Orders = trio.MemoryReceiveChannel[tuple[str, dict[str, Any]]]


async def client(
    hosts: list[Server], orders: Orders, got: dict[str, tuple[int, bytes]], rng: random.Random
) -> None:
    """Send each order until a final reply comes back, with the same key, to any host up."""
    async with httpx.AsyncClient(timeout=30) as http:
        async for key, order in orders:
            while True:
                server = rng.choice(hosts)
                await server.up.wait()
                try:
                    response = await http.post(
                        f"{server.url}/order", json=order, headers={"Idempotency-Key": key}
                    )
                except httpx.HTTPError:
                    await trio.sleep(0.05)
                    continue
                body = response.json()
                if body.get("error", {}).get("kind") in NOT_FINAL:
                    await trio.sleep(0.05)
                    continue
                got[key] = (response.status_code, response.content)
                break


@pytest.fixture(
    name="cluster",
    params=["sqlite", "workers", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def _cluster(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, int, int]:
    """(store URL, number of hosts, workers per host): one host on a SQLite file, one with
    two workers on a SQLite file, or two on one PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'orders.db'}", 1, 1
    if request.param == "workers":
        return f"sqlite:///{tmp_path / 'orders.db'}", 1, 2
    return pg.postgres_url(), 2, 1


@pytest.fixture(name="reaped")
async def _reaped() -> AsyncIterator[list[Server]]:
    """The servers a test starts: any still running at its end is killed, so that a test
    that fails half-way leaves no server behind."""
    servers: list[Server] = []
    yield servers
    for server in servers:
        if server.process is not None and server.process.returncode is None:
            with trio.CancelScope(shield=True):
                await server.kill()


@pytest.mark.skipif(ORDERS < 1, reason="CHAOS_ORDERS is 0")
async def test_kills_at_random_lose_no_order_and_no_money(
    tmp_path: Path, cluster: tuple[str, int, int], reaped: list[Server]
) -> None:
    """N orders, K SIGKILLs: one final result per key, the ledger matches, nothing left over."""
    store_url, host_count, workers = cluster
    rng = random.Random(SEED)
    print(
        f"chaos: {ORDERS} orders, {KILLS} kills, {host_count} host(s) of {workers} worker(s), "
        f"seed {SEED}"
    )
    hosts = [Server(store_url, tmp_path, f"host-{n}", workers) for n in range(host_count)]
    reaped.extend(hosts)
    orders = {f"key-{n}-{rng.randrange(10**9)}": random_order(rng, n) for n in range(ORDERS)}
    got: dict[str, tuple[int, bytes]] = {}
    for host in hosts:
        await host.start()

    # The kills draw from a generator of their own, so that a seed repeats their schedule
    # (each pause, whom each kills): the clients' draws depend on timing (how often each
    # retries), and sharing one generator made every kill after the first differ.
    kills = random.Random(f"{SEED} kills")

    async def killer() -> None:
        for _ in range(KILLS):
            await trio.sleep(kills.uniform(0.3, 1.5))
            await kills.choice(hosts).strike(kills)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(killer)
        send, receive = trio.open_memory_channel[tuple[str, dict[str, Any]]](0)
        async with receive:
            for n in range(CLIENTS):
                client_rng = random.Random(f"{SEED} client {n}")
                nursery.start_soon(client, hosts, receive.clone(), got, client_rng)
        # Orders keep arriving over the time the kills take (about 2 s each).
        gap = KILLS * 2.0 / ORDERS
        async with send:
            for item in orders.items():
                await send.send(item)
                await trio.sleep(gap)

    # The hosts still up recover what the last kills left.
    async with open_store(store_url) as store:
        with trio.fail_after(LEASE_S + 10):
            # Another process's store: there is no event to wait on, so poll it.
            while any(o.state == RUNNING for o, _ in await all_orders(store)):  # noqa: ASYNC110 # see above
                await trio.sleep(0.2)
        for host in hosts:
            assert await host.stop() == 0
        stored = {o.key: (o, net) for o, net in await all_orders(store)}

    assert set(got) == set(orders)
    assert set(stored) == set(orders)
    attention = []
    for key, order in orders.items():
        record, net = stored[key]
        assert record.state == FINISHED, key
        assert (record.http_status, record.reply) == got[key], key
        reply = json.loads(got[key][1])
        refund_failed = any(
            s.step == "payment" and s.compensation in ("error", "timeout") for s in record.steps
        )
        if reply["status"] == "ok":
            assert net == order["amount"], key
        elif refund_failed:
            # A refund made to fail leaves the charge, if there was one: recovery also
            # refunds a payment whose outcome nobody recorded, which may never have charged.
            assert net in (0, order["amount"]), key
        else:
            assert net == 0, key
        if record.needs_attention:
            attention.append(key)
            assert "fail_compensation" in order, key
    worker_kills = sum(h.worker_kills for h in hosts)
    server_kills = sum(h.starts for h in hosts) - host_count
    kinds = f" ({worker_kills} of one worker, {server_kills} of a server)" if workers > 1 else ""
    print(
        f"chaos: {len(got)} orders, {server_kills + worker_kills} kills{kinds} over "
        f"{host_count} host(s), "
        f"{sum(1 for o, _ in stored.values() if o.attempt > 1)} run again after an interruption, "
        f"{len(attention)} need attention (each with a compensation made to fail)"
    )
