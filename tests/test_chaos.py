"""Chaos, in the spirit of Jepsen's bank test: kill the server at random while clients retry.

Concurrent clients send orders with random keys, amounts, failures and delays;
the server (a real subprocess on one SQLite file) is struck at random moments
and started again: mostly with SIGKILL, and a third of the time with SIGTERM, a
drain with a short grace (`GRACE_S`), which it may not finish: half of the drains
get a SIGKILL within `CUT_WITHIN_S`. Every client retries its order, with the
same key, until it gets a final reply. Then, for every key: exactly one final
result, and the one the client got; the ledger's net charge is the order's
amount if it ended ok and 0 otherwise (unless its refund was made to fail);
nothing left running; nothing needs attention unless a compensation was made
to fail. And for the drains: one the SIGKILL did not cut short exits 0 (README,
"Exit statuses": cancelling orders at the grace's end is part of a drain), and
its last line counts as cancelled the orders it warned it cancelled; an order a
drain cancelled ends as the drain's line for it says (`canceled`, or
`compensation_failed`, or the kind it had failed with while it was undone), which
its client, whose connection ended without a reply, got as the replay of its
retry, unless a SIGKILL cut that drain short before its record was stored: then
it was recovered (`interrupted`, and the retry ran it again, or
`compensation_failed`); and a client got `canceled` only so. `nox -s chaos`
runs it; CHAOS_ORDERS and CHAOS_KILLS (the strikes, drains included) set its size.

It runs three times: one host on a SQLite file; one host with `--workers 2` on
a SQLite file, where most kills fall on one worker (the supervisor restarts it, and
its orders are recovered once its lease lapses, by the other worker or its restart)
and the others on the supervisor with its workers (their process group), started
again; and two hosts (two server processes) on one PostgreSQL database, clients
spreading their requests over both and the kills falling on either. A drain falls
likewise: on one worker (SIGTERM to it alone: it drains and exits 0, its replacement
started as its drain begins, or as it ends if that comes first; or, still starting, it ends
by the signal before it takes an order), or on the
supervisor's process group (each worker drains once, the supervisor exits 0), or
on a host.
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
from order_pipeline.reporting import ORDERS_LOGGER
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
# How often a strike is a drain (SIGTERM), not a SIGKILL; how often a drain is sent a SIGKILL
# (cut short, if it still drains), within how long of its SIGTERM; and the servers' grace,
# short enough that a drain cancels some of the orders in flight (steps take up to 400 ms).
DRAIN_SHARE = 1 / 3
CUT_SHARE = 0.5
CUT_WITHIN_S = 0.4
GRACE_S = 0.1
# Longer than any drain may take: its hard deadline (grace + compensations' 5 s + 5 s), and
# the supervisor's kill of a worker still running 3 s after that.
DRAIN_LIMIT_S = 20.0
DRAIN_LINE = "drained orders: "
CANCELLED_BY_THE_DRAIN = re.compile(r"order (\S+) cancelled by the drain: ")


def worker_ended(number: int, pid: int) -> re.Pattern[bytes]:
    """The supervisor's line for worker `number`'s end: `died with C: restarting`, or `exited
    with C` (restarting; replaced, as it drained alone; once the supervisor drains too)."""
    return re.compile(rb"worker %d \(pid %d\) (?:died|exited) with (-?\d+)" % (number, pid))


def log_lines(log: Path) -> list[dict[str, Any]]:
    """The JSON lines of a server's log (a SIGKILL may have cut its last line short)."""
    lines = []
    for text in log.read_bytes().splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            continue
    return lines


@attrs.frozen
class Drain:
    """A drain a strike began: in which log, of which processes (a lone server, one worker,
    or every worker of a supervisor), how the process signalled ended, and whether the strike
    sent it a SIGKILL while it drained."""

    log: Path
    pids: frozenset[int]
    status: int
    killed: bool
    worker: bool = False

    @property
    def cut(self) -> bool:
        """Cut short by the strike's SIGKILL (not ended before it came)."""
        return self.killed and self.status == -signal.SIGKILL


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
    drains: list[Drain] = attrs.Factory(list)
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
            "--shutdown-grace", str(GRACE_S),
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

    def signal(self, signum: int) -> None:
        """Send `signum` to the server: with workers, to the supervisor's process group."""
        assert self.process is not None
        if self.workers > 1:
            os.killpg(self.process.pid, signum)
        else:
            self.process.send_signal(signum)

    async def kill(self) -> None:
        """SIGKILL the server: with workers, the supervisor and its workers at once."""
        assert self.process is not None
        self.up = trio.Event()
        self.signal(signal.SIGKILL)
        await self.process.wait()

    async def drain(self, cut_after: float | None) -> None:
        """SIGTERM the server (with workers, its process group: each worker drains once), and
        SIGKILL it `cut_after` seconds later if it is still draining then; wait for its end."""
        assert self.process is not None
        self.up = trio.Event()
        pids = {self.process.pid} if self.workers == 1 else set(self.live_workers().values())
        self.signal(signal.SIGTERM)
        killed = False
        with trio.fail_after(DRAIN_LIMIT_S):
            if cut_after is not None:
                with trio.move_on_after(cut_after):
                    await self.process.wait()
                if self.process.returncode is None:  # not reaped: its pid is still its own
                    self.signal(signal.SIGKILL)
                    killed = True
            status = await self.process.wait()
        self.drains.append(Drain(self.log, frozenset(pids), status, killed))

    async def drain_worker(self, number: int, pid: int, cut_after: float | None) -> None:
        """SIGTERM one worker alone (it drains and is replaced), and SIGKILL it `cut_after`
        seconds later if it is still the supervisor's child then; wait for the supervisor's
        line on its end."""
        os.kill(pid, signal.SIGTERM)
        ended = worker_ended(number, pid)
        killed = False
        with trio.fail_after(DRAIN_LIMIT_S):
            if cut_after is not None:
                await trio.sleep(cut_after)
                if self.is_child(pid):  # draining still (its replacement may serve already)
                    os.kill(pid, signal.SIGKILL)
                    killed = True
            # The supervisor's process: no event to wait on, so poll its log.
            while not (found := ended.search(self.log.read_bytes())):  # noqa: ASYNC110 # see above
                await trio.sleep(0.05)
        status = int(found.group(1))
        self.drains.append(Drain(self.log, frozenset({pid}), status, killed, worker=True))

    async def strike(self, rng: random.Random) -> None:
        """One kill or drain: of one live worker, mostly, if it has the restarts to spare (a
        worker that keeps dying is given up on, by design); else of the server, started again."""
        one_worker = self.workers > 1 and rng.random() >= GROUP_KILL_SHARE
        drain = rng.random() < DRAIN_SHARE
        cut_after = rng.uniform(0, CUT_WITHIN_S) if drain and rng.random() < CUT_SHARE else None
        if one_worker:
            now = trio.current_time()
            spare = [
                (number, pid)
                for number, pid in self.live_workers().items()
                if sum(now - t < RESTART_WINDOW_S for t in self.killed_at.get(number, []))
                < RESTART_LIMIT - 1
            ]
            if spare:
                number, pid = rng.choice(sorted(spare))
                self.killed_at.setdefault(number, []).append(now)
                self.worker_kills += 1
                if drain:
                    await self.drain_worker(number, pid, cut_after)
                else:
                    os.kill(pid, signal.SIGKILL)
                return
        if drain:
            await self.drain(cut_after)
        else:
            await self.kill()
        await self.start()

    def live_workers(self) -> dict[int, int]:
        """Each worker's latest pid, from the supervisor's `worker N started (pid P)` lines,
        if that process is still the supervisor's child (not one being restarted)."""
        latest = {int(n): int(pid) for n, pid in WORKER_STARTED.findall(self.log.read_bytes())}
        return {number: pid for number, pid in latest.items() if self.is_child(pid)}

    def is_child(self, pid: int) -> bool:
        """Whether process `pid` is the supervisor's child still, not ended."""
        assert self.process is not None
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return False
        state, ppid = stat.rpartition(")")[2].split()[:2]
        return state != "Z" and int(ppid) == self.process.pid

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
    hosts: list[Server],
    orders: Orders,
    got: dict[str, tuple[int, bytes]],
    replayed: set[str],
    rng: random.Random,
) -> None:
    """Send each order until a final reply comes back, with the same key, to any host up;
    `replayed` gets each key whose final reply was a replay."""
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
                if response.headers.get("idempotent-replayed") == "true":
                    replayed.add(key)
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
    """N orders, K strikes (SIGKILLs and drains): one final result per key, the ledger matches,
    nothing left over; each drain ends as README says, and so do the orders it cancelled."""
    store_url, host_count, workers = cluster
    rng = random.Random(SEED)
    print(
        f"chaos: {ORDERS} orders, {KILLS} strikes, {host_count} host(s) of {workers} worker(s), "
        f"seed {SEED}"
    )
    hosts = [Server(store_url, tmp_path, f"host-{n}", workers) for n in range(host_count)]
    reaped.extend(hosts)
    orders = {f"key-{n}-{rng.randrange(10**9)}": random_order(rng, n) for n in range(ORDERS)}
    got: dict[str, tuple[int, bytes]] = {}
    replayed: set[str] = set()
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
                nursery.start_soon(client, hosts, receive.clone(), got, replayed, client_rng)
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
    keys = {order["order_id"]: key for key, order in orders.items()}
    drains = [d for h in hosts for d in h.drains]
    cut = {pid for d in drains if d.cut for pid in d.pids}
    # Each order a drain cancelled: by each process that did (one cut short may have left it
    # to be run again, and cancelled again), the order's line, which says how it ended. Every
    # drained process's log is read (a log holds the lines of every worker of its supervisor).
    cancelled: dict[str, dict[int, dict[str, Any]]] = {}
    for log in {d.log for d in drains}:
        unsent = {}  # each process's last line of each order it sent no reply to
        for line in log_lines(log):
            if line["logger"] == ORDERS_LOGGER and line["http_status"] is None:
                unsent[line["pid"], line["order_id"]] = line
            elif found := CANCELLED_BY_THE_DRAIN.match(line["message"]):
                order_line = unsent[line["pid"], found.group(1)]  # said just before
                cancelled.setdefault(keys[found.group(1)], {})[line["pid"]] = order_line
    for drain in drains:
        # A worker SIGTERMed alone while still starting ends by the signal, before it serves.
        drained = {0, -signal.SIGTERM} if drain.worker else {0}
        assert drain.status in drained or drain.cut, drain
        if drain.cut:
            continue
        lines = log_lines(drain.log)
        for pid in drain.pids:
            mine = [line for line in lines if line["pid"] == pid]
            if not mine:  # a worker still starting, ended by the signal before it took an order
                continue
            last = [line for line in mine if line["message"].startswith(DRAIN_LINE)]
            # Cancelling orders at the grace's end is part of a drain: exit status 0.
            assert [(x["exit_status"], x["canceled_by_client"]) for x in last] == [(0, 0)], drain
            assert last[0]["canceled"] == sum(pid in by for by in cancelled.values()), drain
    attention, run_again = [], 0
    for key, order in orders.items():
        record, net = stored[key]
        assert record.state == FINISHED, key
        assert (record.http_status, record.reply) == got[key], key
        reply = json.loads(got[key][1])
        outcome = (reply.get("error", {}).get("kind", "ok"), reply.get("steps"))
        if key in cancelled:
            # No reply is sent for an order a drain cancelled (its kind `canceled`, or
            # `compensation_failed`, or the kind it had failed with if it was being undone):
            # its client's retry got the record of its cancellation, replayed. Unless a
            # SIGKILL cut that drain short before the record was stored: then it was recovered,
            # `interrupted` and run again by the retry, or `compensation_failed` (an undoing
            # made to fail failed again).
            by = cancelled[key]
            if outcome in [(line["kind"], line["steps"]) for line in by.values()]:
                assert key in replayed, key
            else:
                assert set(by) <= cut, key
                assert record.attempt > 1 or outcome[0] == "compensation_failed", key
                run_again += record.attempt > 1
            full = [pid for pid in by if pid not in cut]
            if full:  # a drain not cut short stored its record: the final one
                assert outcome == (by[full[0]]["kind"], by[full[0]]["steps"]), key
        elif outcome[0] == "canceled":
            # No client of ours leaves: only a drain cancels, and only one cut short (by a
            # SIGKILL, as its lines were written) may have lost the line that said so.
            assert cut, key
            assert key in replayed, key
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
        f"chaos: {len(got)} orders, {server_kills + worker_kills} strikes{kinds} over "
        f"{host_count} host(s), {len(drains)} of them drains ({sum(d.worker for d in drains)} of "
        f"one worker, {sum(d.cut for d in drains)} cut short by a SIGKILL), "
        f"{sum(1 for o, _ in stored.values() if o.attempt > 1)} run again after "
        f"an interruption, {len(cancelled)} cancelled by a drain "
        f"({run_again} of them recovered and run again), "
        f"{len(attention)} need attention (each with a compensation made to fail)"
    )
