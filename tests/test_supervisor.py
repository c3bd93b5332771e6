"""`serve --workers N`: a socket per worker, a worker's death, SIGTERM in its restart pause,
a worker given up on.

Each test runs the real supervisor as a subprocess and kills workers by the pids
it logs. Which worker accepted a connection is read from /proc: each worker has a
socket of its own and the kernel picks one for each new connection, so the orders
that must be in flight on the worker that drains are sent on connections it accepted.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
from collections import Counter
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from order_pipeline.handoff import LISTEN_FD_ENV, MULTIPROC_ENV, READY_FD_ENV, Handoff
from order_pipeline.settings import Settings
from order_pipeline.supervisor import RESTART_LIMIT, RESTART_WINDOW_S, _Supervisor

from . import rawhttp
from .server_process import ServerProcess, StartServer, wait_for_steps_in_flight

STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")
# Every step of these orders takes this long, so an order in flight has three steps in flight.
SLOW = {"payment": 2000, "vendor": 2000, "courier": 2000}
ORDERS = 4  # fewer than the default five couriers: every order runs its three steps at once
WAIT_S = 20  # for something a subprocess does
# /proc/net/tcp's states (include/net/tcp_states.h).
ESTABLISHED, LISTEN = "01", "0A"
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
# A worker's, SIGTERMed while it drains because its supervisor is gone.
ORPHAN_SIGTERM = (
    "received SIGTERM while draining (the supervisor is gone): the drain goes on; "
    "a second SIGTERM cancels the orders in flight"
)


def supervisor_lines(server: ServerProcess) -> list[tuple[str, str]]:
    """(level, message) of each complete line the supervisor itself logged, not a worker."""
    text = server.log_path.read_text(errors="replace")
    complete = text[: text.rfind("\n") + 1]  # a line still being written is left out
    lines = [json.loads(line) for line in complete.splitlines() if line.startswith("{")]
    return [(line["level"], line["message"]) for line in lines if line["pid"] == server.process.pid]


def started_pids(server: ServerProcess, number: int) -> list[int]:
    """The pids of worker `number`, from its first start to its latest."""
    found = (STARTED.fullmatch(message) for _, message in supervisor_lines(server))
    return [int(m[2]) for m in found if m and int(m[1]) == number]


async def poll(condition: Callable[[], bool]) -> None:
    """Wait until `condition()` holds: a subprocess's log is the only signal it gives."""
    with trio.fail_after(WAIT_S):
        while True:
            if condition():
                return
            await trio.sleep(0.02)


async def pid_of_start(server: ServerProcess, number: int, start: int) -> int:
    """The pid of worker `number`'s `start`-th process (1 is the first), once it is logged."""
    await poll(lambda: len(started_pids(server, number)) >= start)
    return started_pids(server, number)[start - 1]


def tcp_sockets(port: int) -> list[tuple[str, int, int]]:
    """The IPv4 sockets on local port `port`, from /proc/net/tcp: the state, the peer's port and
    the inode of each (0 for a connection queued on a listening socket, not yet accepted)."""
    found = []
    with open("/proc/net/tcp") as table:
        next(table)  # the heading
        for line in table:
            local, remote, state, *_, inode = line.split()[1:10]
            if int(local.partition(":")[2], 16) == port:
                found.append((state, int(remote.partition(":")[2], 16), int(inode)))
    return found


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets process `pid` holds: its fds that link to `socket:[INODE]`."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:  # closed since the listing
            continue
        if link.startswith("socket:["):
            inodes.add(int(link.removeprefix("socket:[").removesuffix("]")))
    return inodes


async def accepting_workers(
    server: ServerProcess, client_ports: Collection[int], workers: Collection[int]
) -> dict[int, int]:
    """Which of the worker processes `workers` accepted each connection to `server` (named by
    its client's port), once every one has been accepted."""
    port = rawhttp.address(server.url)[1]
    with trio.fail_after(WAIT_S):
        while True:
            holders = {inode: pid for pid in workers for inode in socket_inodes(pid)}
            accepted = {
                peer: holders[inode]
                for state, peer, inode in tcp_sockets(port)
                if state == ESTABLISHED and inode in holders
            }
            if all(client_port in accepted for client_port in client_ports):
                return {client_port: accepted[client_port] for client_port in client_ports}
            await trio.sleep(0.02)


async def connection_to(
    server: ServerProcess, worker: int, workers: Collection[int]
) -> trio.SocketStream:
    """A new connection to `server` that worker process `worker` (of `workers`) accepted: the
    kernel picks one worker's socket for each connection, so connect until it picks this one."""
    with trio.fail_after(WAIT_S):
        while True:
            stream = await trio.open_tcp_stream(*rawhttp.address(server.url))
            client_port = stream.socket.getsockname()[1]
            if (await accepting_workers(server, [client_port], workers))[client_port] == worker:
                return stream
            await stream.aclose()


async def connect(server: ServerProcess) -> trio.SocketStream:
    """A new connection to `server`, to whichever worker the kernel gives it."""
    return await trio.open_tcp_stream(*rawhttp.address(server.url))


async def exchange(stream: trio.SocketStream, raw: bytes) -> int | str:
    """Send `raw` on `stream` and read until the server closes it: the reply's status, or
    "no reply"."""
    async with stream:
        try:
            with trio.fail_after(WAIT_S):
                await stream.send_all(raw)
                reply = await rawhttp.read_all(stream)
        except trio.BrokenResourceError:  # reset
            reply = b""
    return rawhttp.parse(reply).status if reply else "no reply"


async def order(stream: trio.SocketStream, order_id: str, outcomes: list[int | str]) -> None:
    """POST one slow order on `stream`; record its status, or "no reply"."""
    body = json.dumps({"order_id": order_id, "amount": 100, "delay_ms": SLOW}).encode()
    outcomes.append(await exchange(stream, rawhttp.request(body)))


async def test_each_worker_serves_a_socket_of_its_own_and_the_kernel_spreads_connections(
    start_server: StartServer,
) -> None:
    """--workers 2: two listening sockets on the port, the supervisor holding both and each
    worker one; of 200 connections opened at once, each worker accepts 30 to 70 % (the
    kernel hashes each connection's addresses to pick a socket: the bounds are 5.6 sigma)."""
    connections = 200
    server = await start_server("--workers", "2", "--no-access-log", "--header-timeout", "60")
    port = rawhttp.address(server.url)[1]
    workers = [started_pids(server, number)[-1] for number in range(2)]
    listening = {inode for state, _, inode in tcp_sockets(port) if state == LISTEN}
    held = [socket_inodes(pid) & listening for pid in workers]

    assert len(listening) == 2
    assert len(held[0]) == len(held[1]) == 1
    assert held[0] | held[1] == listening
    assert socket_inodes(server.process.pid) & listening == listening

    streams: list[trio.SocketStream] = []

    async def connect() -> None:
        streams.append(await trio.open_tcp_stream(*rawhttp.address(server.url)))

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(connect)
        client_ports = [stream.socket.getsockname()[1] for stream in streams]
        accepted = Counter((await accepting_workers(server, client_ports, workers)).values())
    finally:
        for stream in streams:
            await stream.aclose()
    assert all(0.3 * connections <= accepted[pid] <= 0.7 * connections for pid in workers), accepted


async def test_connections_queued_on_a_dead_workers_socket_are_served_by_its_restart(
    start_server: StartServer,
) -> None:
    """While worker 0 is dead, the connections the kernel gives its socket wait in its queue
    (the supervisor keeps it open): the restarted worker accepts and serves them."""
    server = await start_server(
        "--workers", "2", "--no-access-log", "--header-timeout", "60", expect_errors=True
    )
    doomed = await pid_of_start(server, 0, 1)
    os.kill(doomed, signal.SIGKILL)
    await poll(
        lambda: (
            ("error", f"worker 0 (pid {doomed}) died with -9: restarting")
            in supervisor_lines(server)
        )
    )
    # Stopped, the supervisor cannot restart worker 0 while the connections are opened. Of
    # 20, none lands on worker 0's socket once in a million runs.
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        streams = [await trio.open_tcp_stream(*rawhttp.address(server.url)) for _ in range(20)]
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    restarted = await pid_of_start(server, 0, 2)
    client_ports = [stream.socket.getsockname()[1] for stream in streams]
    workers = [restarted, started_pids(server, 1)[-1]]
    accepted = await accepting_workers(server, client_ports, workers)
    statuses = [await exchange(stream, HEALTHZ) for stream in streams]

    assert restarted in accepted.values()
    assert statuses == [200] * len(streams)


async def test_sigterm_in_a_restart_pause_lets_the_other_worker_drain(
    start_server: StartServer,
) -> None:
    """SIGTERM while a dead worker waits to be restarted: the other's orders get 200, exit 0."""
    server = await start_server("--workers", "2", "--no-access-log", expect_errors=True)
    doomed, other = await pid_of_start(server, 0, 1), await pid_of_start(server, 1, 1)
    outcomes: list[int | str] = []
    async with trio.open_nursery() as nursery:
        for n in range(ORDERS):
            stream = await connection_to(server, other, [doomed, other])
            nursery.start_soon(order, stream, f"pause-{n}", outcomes)
        await wait_for_steps_in_flight(server.url, 3 * ORDERS)
        os.kill(doomed, signal.SIGKILL)
        died = ("error", f"worker 0 (pid {doomed}) died with -9: restarting")
        await poll(lambda: died in supervisor_lines(server))
        code = await server.stop()  # SIGTERM, within the restart pause

    assert (outcomes, code) == ([200] * ORDERS, 0)
    assert started_pids(server, 0) == [doomed]  # the SIGTERM came before the restart
    assert [(line["level"], line["message"]) for line in server.errors()] == [died]


async def test_a_worker_killed_during_the_drain_makes_the_exit_status_1(
    start_server: StartServer,
) -> None:
    """SIGTERM with orders in flight, then one worker SIGKILLed mid-drain: its orders were not
    drained (recovery undoes them), so the supervisor exits 1, not 0; the other's get 200."""
    server = await start_server(
        "--workers", "2", "--no-access-log", expect_errors=True, check_exit=False
    )
    doomed, other = await pid_of_start(server, 0, 1), await pid_of_start(server, 1, 1)
    outcomes: list[int | str] = []
    async with trio.open_nursery() as nursery:
        for n, pid in enumerate([doomed, other]):
            stream = await connection_to(server, pid, [doomed, other])
            nursery.start_soon(order, stream, f"drain-{n}", outcomes)
        await wait_for_steps_in_flight(server.url, 6)
        server.process.send_signal(signal.SIGTERM)
        await poll(
            lambda: ("info", "received SIGTERM: draining the workers") in supervisor_lines(server)
        )
        os.kill(doomed, signal.SIGKILL)
        with trio.fail_after(WAIT_S):
            code = await server.process.wait()

    assert code == 1
    assert sorted(map(str, outcomes)) == ["200", "no reply"]
    assert ("info", f"worker 0 (pid {doomed}) exited with -9") in supervisor_lines(server)
    assert supervisor_lines(server)[-1] == (
        "info",
        "workers drained (each worker logged its own counts); exit status 1",
    )


async def test_a_worker_killed_at_the_hard_deadline_makes_the_exit_status_1(
    start_server: StartServer,
) -> None:
    """A worker that cannot end its drain (SIGSTOPped: its own hard deadline cannot run) is
    killed by the supervisor 3 s after the hard deadline (grace 0 + compensations 1 + 5 s):
    not a drain in full, so the supervisor exits 1; the other worker drains and exits 0."""
    server = await start_server(
        "--workers", "2", "--no-access-log", "--shutdown-grace", "0",
        "--compensation-timeout", "1", expect_errors=True, check_exit=False,
    )  # fmt: skip # flags and their values in pairs
    stuck = await pid_of_start(server, 0, 1)
    os.kill(stuck, signal.SIGSTOP)
    server.process.send_signal(signal.SIGTERM)
    with trio.fail_after(WAIT_S):
        code = await server.process.wait()

    assert ("error", f"worker 0 (pid {stuck}) still draining: killing it") in supervisor_lines(
        server
    )
    assert code == 1
    assert supervisor_lines(server)[-1] == (
        "info",
        "workers drained (each worker logged its own counts); exit status 1",
    )


async def test_a_worker_that_overruns_its_drain_ends_itself_with_its_last_line(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Another process holds the SQLite file's write lock: each worker's last store calls wait
    past the hard deadline (grace 0 + compensations 1 + 5 s), as a lone server's do
    (tests/test_drain.py). Each worker, alive, ends itself there with its error line and its
    last line, as a lone server does; the supervisor, whose own deadline came a few
    milliseconds sooner, killed them first, and those lines were lost."""
    db = tmp_path / "stalled.db"
    server = await start_server(
        "--workers", "2", "--no-access-log", "--store", f"sqlite:///{db}",
        "--shutdown-grace", "0", "--compensation-timeout", "1",
        expect_errors=True, check_exit=False,
    )  # fmt: skip # flags and their values in pairs
    workers = [await pid_of_start(server, 0, 1), await pid_of_start(server, 1, 1)]
    locker = await trio.to_thread.run_sync(
        functools.partial(sqlite3.connect, db, timeout=10, isolation_level=None)
    )
    try:
        await trio.to_thread.run_sync(locker.execute, "BEGIN IMMEDIATE")
        # Each worker's renewal (every second) waits for the lock by then, for 2.5 s more at
        # least. Only time tells: nothing outside a worker shows its writer waiting in
        # SQLite's busy loop (no line, no metric, no lock held).
        await trio.sleep(2.5)
        server.process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT_S):
            code = await server.process.wait()
    finally:
        await trio.to_thread.run_sync(locker.close)

    assert code == 1
    for number, pid in enumerate(workers):
        own = [line["message"] for line in server.log_lines() if line["pid"] == pid]
        assert own[-2:] == [
            "drain did not finish by its hard deadline: exiting",
            "drained orders: 0, cancelled: 0, cancelled by their clients: 0; exit status 1",
        ], own
        assert ("info", f"worker {number} (pid {pid}) exited with 1") in supervisor_lines(server)
    assert supervisor_lines(server)[-1] == (
        "info",
        "workers drained (each worker logged its own counts); exit status 1",
    )


def has_open(pid: int, path: Path) -> bool:
    """Whether process `pid` has the file `path` open."""
    try:
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    except FileNotFoundError:  # a descriptor closed meanwhile
        return False


@pytest.mark.parametrize("phase", ["starting", "serving"])
async def test_a_worker_ended_by_the_groups_stop_signal_is_not_taken_for_dead(
    start_server: StartServer, tmp_path: Path, phase: str
) -> None:
    """A signal to the whole process group (a Ctrl+C, systemd's stop) ends a worker still
    starting by its default action (-15), and a serving one by its own drain (0). A supervisor
    that saw that end before its own copy of the signal (busy, or here stopped, meanwhile)
    logged `died with ...: restarting` at error and counted a death, although the drain
    ended that worker, cleanly. The worker restarted after a death is held in its start by a
    SQLite file another process locks."""
    db = tmp_path / "locked.db"
    server = await start_server(
        "--workers", "2", "--no-access-log", "--store", f"sqlite:///{db}",
        expect_errors=True, check_exit=False,
    )  # fmt: skip # flags and their values in pairs
    first = await pid_of_start(server, 0, 1)
    errors: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        if phase == "starting":
            locker = await trio.to_thread.run_sync(
                functools.partial(sqlite3.connect, db, timeout=10, isolation_level=None)
            )
            stack.push_async_callback(trio.to_thread.run_sync, locker.close)
            await trio.to_thread.run_sync(locker.execute, "BEGIN IMMEDIATE")
            os.kill(first, signal.SIGKILL)
            errors.append(f"worker 0 (pid {first}) died with -9: restarting")
            ended = await pid_of_start(server, 0, 2)
            await poll(lambda: has_open(ended, db))  # it waits for the lock to take its lease
        else:
            ended = first
        server.process.send_signal(signal.SIGSTOP)
        try:
            await poll(lambda: state(server.process.pid) == "T")
            os.kill(ended, signal.SIGTERM)  # the group's signal, to each in turn
            server.process.send_signal(signal.SIGTERM)
            await poll(lambda: exited(ended))
        finally:
            server.process.send_signal(signal.SIGCONT)
    with trio.fail_after(WAIT_S):
        code = await server.process.wait()

    assert [line["message"] for line in server.errors()] == errors
    status = -signal.SIGTERM if phase == "starting" else 0
    assert ("info", f"worker 0 (pid {ended}) exited with {status}") in supervisor_lines(server)
    assert code == 0


async def test_a_worker_sigtermed_alone_drains_and_is_replaced(
    start_server: StartServer,
) -> None:
    """SIGTERM to one worker alone (no drain of the supervisor's follows) drains that worker,
    which ends with 0 and is replaced once, said as a warning (it was an error, `died with 0`,
    as for a crash), not counted as a death."""
    server = await start_server("--workers", "2", "--no-access-log", expect_errors=True)
    first = await pid_of_start(server, 0, 1)
    os.kill(first, signal.SIGTERM)
    replacement = await pid_of_start(server, 0, 2)
    await poll(lambda: exited(first))
    code = await server.stop()

    assert replacement != first
    assert server.errors() == []
    assert len(started_pids(server, 0)) == 2  # replaced once, not also restarted
    said = [(level, m) for level, m in supervisor_lines(server) if f"(pid {first})" in m]
    assert said[1:] in (
        [  # it said it drains alone before it ended
            ("warning", f"worker 0 (pid {first}) drains alone (a SIGTERM to it): starting another"),
            ("info", f"worker 0 (pid {first}) exited with 0 (replaced)"),
        ],
        # it ended first (idle, no drain delay: before the supervisor's look), and its task
        # restarted it
        [("warning", f"worker 0 (pid {first}) exited with 0: restarting")],
    )
    exits = [
        m for _, m in supervisor_lines(server) if m.startswith(f"worker 0 (pid {replacement})")
    ]
    assert len(exits) == 1, exits  # the replacement ran until the drain
    assert code == 0


async def test_a_worker_sigtermed_alone_is_replaced_at_once_so_its_socket_waits_for_nothing(
    start_server: StartServer,
) -> None:
    """An operator recycling a worker (SIGTERM to it alone) while it runs a long order: its
    replacement serves its socket at once. The kernel goes on queueing connections on that
    socket (about one in two here), which waited for the end of the old worker's drain, as
    long as its order (30 s here) before its restart served them. The old one still draining
    when the supervisor drains too is one of its workers: cut short (a second SIGTERM to it),
    it makes the exit status 1."""
    server = await start_server(
        "--workers", "2", "--no-access-log", "--request-timeout", "120",
        "--shutdown-grace", "120", expect_errors=True, check_exit=False,
    )  # fmt: skip # the flags in pairs
    workers = [await pid_of_start(server, 0, 1), await pid_of_start(server, 1, 1)]
    long = {"payment": 0, "courier": 0, "vendor": 30_000}
    body = json.dumps({"order_id": "recycled", "amount": 100, "delay_ms": long}).encode()
    outcomes: list[int | str] = []

    async def long_order(stream: trio.SocketStream) -> None:
        outcomes.append(await exchange(stream, rawhttp.request(body)))

    async with trio.open_nursery() as nursery:
        stream = await connection_to(server, workers[1], workers)
        nursery.start_soon(long_order, stream)
        await wait_for_steps_in_flight(server.url, 1)  # its vendor step
        os.kill(workers[1], signal.SIGTERM)
        replacement = await pid_of_start(server, 1, 2)
        serving = [workers[0], replacement]
        healthz = [await exchange(await connection_to(server, replacement, serving), HEALTHZ)]
        with trio.fail_after(10):  # a third of the old drain: no connection waits for it
            healthz += [await exchange(await connect(server), HEALTHZ) for _ in range(12)]
            assert not exited(workers[1])  # still draining its order
        server.process.send_signal(signal.SIGTERM)  # the supervisor's drain
        await poll(lambda: exited(replacement) and exited(workers[0]))  # idle: drained at once
        os.kill(workers[1], signal.SIGTERM)  # a second to it: its drain cut short
    with trio.fail_after(WAIT_S):
        code = await server.process.wait()

    assert healthz == [200] * 13
    assert outcomes == ["no reply"]  # the drain cut short cancelled it (its key replays that)
    assert len(started_pids(server, 1)) == 2  # replaced once, not also restarted
    said = [(level, m) for level, m in supervisor_lines(server) if f"(pid {workers[1]})" in m]
    assert said[1:] == [
        (
            "warning",
            f"worker 1 (pid {workers[1]}) drains alone (a SIGTERM to it): starting another",
        ),
        ("warning", f"worker 1 (pid {workers[1]}) exited with 1 (replaced)"),
    ]
    assert replacement not in workers
    assert code == 1


async def test_a_worker_that_cannot_be_started_again_is_retried_and_the_others_serve_on(
    start_server: StartServer,
) -> None:
    """Worker 0 SIGKILLed while the supervisor can open no file (its limit lowered to what it
    holds; a process or memory limit, or an executable removed by an upgrade, fail alike): its
    restart fails. That failure crashed the supervisor, with a traceback, and it SIGKILLed
    worker 1 with its order in flight. It is now a death like any other: logged, tried again
    a second later (here once the limit is back), and worker 1's order gets its 200."""
    server = await start_server(
        "--workers", "2", "--no-access-log", expect_errors=True, check_exit=False
    )
    doomed, other = await pid_of_start(server, 0, 1), await pid_of_start(server, 1, 1)
    supervisor = server.process.pid
    limit = resource.prlimit(supervisor, resource.RLIMIT_NOFILE)
    outcomes: list[int | str] = []
    async with trio.open_nursery() as nursery:
        stream = await connection_to(server, other, [doomed, other])
        nursery.start_soon(order, stream, "served-on", outcomes)
        await wait_for_steps_in_flight(server.url, 3)
        held = len(os.listdir(f"/proc/{supervisor}/fd"))
        resource.prlimit(supervisor, resource.RLIMIT_NOFILE, (held, limit[1]))
        try:
            os.kill(doomed, signal.SIGKILL)
            await poll(
                lambda: (
                    server.process.poll() is not None
                    or any("could not be started" in m for _, m in supervisor_lines(server))
                )
            )
        finally:
            if server.process.poll() is None:
                resource.prlimit(supervisor, resource.RLIMIT_NOFILE, limit)
        assert server.process.poll() is None, supervisor_lines(server)[-3:]
        restarted = await pid_of_start(server, 0, 2)
    assert outcomes == [200]
    code = await server.stop()

    errors = [message for level, message in supervisor_lines(server) if level == "error"]
    assert errors[0] == f"worker 0 (pid {doomed}) died with -9: restarting"
    assert re.fullmatch(
        r"worker 0 could not be started \(\[Errno 24\] Too many open files\): restarting",
        errors[1],
    ), errors
    assert len(errors) == 2, errors  # one failed start: the limit was back for the next
    exits = [m for _, m in supervisor_lines(server) if m.startswith(f"worker 0 (pid {restarted})")]
    assert len(exits) == 1, exits  # the restart ran until the drain (still starting, or serving)
    assert code == 0


async def test_a_worker_that_keeps_dying_is_given_up_on(start_server: StartServer) -> None:
    """A worker dead RESTART_LIMIT times is not restarted: the other drains its order, exit 1."""
    server = await start_server(
        "--workers", "2", "--no-access-log", expect_errors=True, check_exit=False
    )
    outcomes: list[int | str] = []
    async with trio.open_nursery() as nursery:
        for death in range(1, RESTART_LIMIT + 1):
            pid = await pid_of_start(server, 0, death)
            if death == RESTART_LIMIT:  # the last death comes with an order on worker 1
                other = await pid_of_start(server, 1, 1)
                stream = await connection_to(server, other, [pid, other])
                nursery.start_soon(order, stream, "given-up", outcomes)
                await wait_for_steps_in_flight(server.url, 3)
            os.kill(pid, signal.SIGKILL)
        # Until the supervisor exits, or starts worker 0 once more:
        await poll(
            lambda: (
                server.process.poll() is not None or len(started_pids(server, 0)) > RESTART_LIMIT
            )
        )
    pids = started_pids(server, 0)
    assert len(pids) == RESTART_LIMIT, "worker 0 was restarted after its last death"
    assert (outcomes, server.process.poll()) == ([200], 1)
    gave_up = (
        f"worker 0 died {RESTART_LIMIT} times within {RESTART_WINDOW_S:g} s "
        f"(the last, pid {pids[-1]}, with -9): giving up, draining the others"
    )
    restarted = [f"worker 0 (pid {pid}) died with -9: restarting" for pid in pids[:-1]]
    assert [line["message"] for line in server.errors()] == [*restarted, gave_up]


async def test_a_worker_sigtermed_alone_again_and_again_is_never_given_up_on(
    start_server: StartServer,
) -> None:
    """A worker ended by SIGTERMs to it alone, RESTART_LIMIT times and once more, each as soon
    as it starts (it ends by the signal; one that already serves drains): an operator's
    signal, not a crash, so no death toward the restart limit (it gave up on the fifth)."""
    server = await start_server("--workers", "2", "--no-access-log", expect_errors=True)
    for start in range(1, RESTART_LIMIT + 2):
        os.kill(await pid_of_start(server, 0, start), signal.SIGTERM)
    await pid_of_start(server, 0, RESTART_LIMIT + 2)
    code = await server.stop()

    assert server.errors() == []
    assert code == 0


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as environ:
        pairs = (item.partition(b"=") for item in environ.read().split(b"\0") if item)
        return {name.decode(): value.decode() for name, _, value in pairs}


def state(pid: int) -> str:
    """Process `pid`'s state letter in /proc (Z: a zombie, T: stopped), or "" once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or reaped after it
        return ""


def exited(pid: int) -> bool:
    """Whether process `pid` has ended: gone, or a zombie its new parent has not reaped."""
    return state(pid) in ("Z", "")


async def test_workers_whose_supervisor_is_killed_drain_and_exit(
    start_server: StartServer,
) -> None:
    """The supervisor SIGKILLed (it cannot forward a signal): each worker notices that it is
    gone, drains as on SIGTERM (its order in flight gets 200) and exits, instead of serving
    on, orphaned, beside whatever is started next on the same port."""
    server = await start_server(
        "--workers", "2", "--no-access-log", expect_errors=True, check_exit=False
    )
    workers = [await pid_of_start(server, 0, 1), await pid_of_start(server, 1, 1)]
    # Removed by the supervisor when it ends, which a killed one cannot: the test does.
    metrics_dir = environ_of(workers[0])[MULTIPROC_ENV]
    outcomes: list[int | str] = []
    try:
        async with trio.open_nursery() as nursery:
            stream = await connection_to(server, workers[1], workers)
            nursery.start_soon(order, stream, "orphaned", outcomes)
            await wait_for_steps_in_flight(server.url, 3)
            server.process.kill()
            await poll(lambda: all(exited(pid) for pid in workers))
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)

    assert outcomes == [200]
    lines = [line for line in server.log_lines() if line["pid"] in workers]
    assert {
        line["pid"] for line in lines if line["message"] == "the supervisor is gone: draining"
    } == set(workers)


async def test_a_sigterm_to_a_worker_whose_supervisor_is_gone_is_acknowledged(
    start_server: StartServer,
) -> None:
    """The supervisor SIGKILLed, a worker draining a long order: a SIGTERM then (systemd's, to
    what is left of the unit) is taken for the one that started the drain, which goes on, and
    the worker says so (it said nothing: the operator's signal seemed lost); a second SIGTERM
    cuts the drain short, the order cancelled and undone, exit status 1."""
    server = await start_server(
        "--workers", "2", "--no-access-log", "--request-timeout", "120",
        expect_errors=True, check_exit=False,
    )  # fmt: skip # the flags in pairs
    workers = [await pid_of_start(server, 0, 1), await pid_of_start(server, 1, 1)]
    metrics_dir = environ_of(workers[0])[MULTIPROC_ENV]
    # Its deadline past the test: a slow machine's test does not see it end by a 504 first.
    long = {"payment": 0, "courier": 0, "vendor": 60_000}
    body = json.dumps({"order_id": "orphaned", "amount": 100, "delay_ms": long}).encode()
    outcomes: list[int | str] = []

    async def long_order(stream: trio.SocketStream) -> None:
        outcomes.append(await exchange(stream, rawhttp.request(body)))

    def said(message: str) -> Callable[[list[dict[str, Any]]], bool]:
        return lambda lines: any(
            (line["pid"], line["message"]) == (workers[1], message) for line in lines
        )

    try:
        async with trio.open_nursery() as nursery:
            stream = await connection_to(server, workers[1], workers)
            nursery.start_soon(long_order, stream)
            await wait_for_steps_in_flight(server.url, 1)  # its vendor step
            server.process.kill()
            await server.wait_for_lines(said("the supervisor is gone: draining"))
            os.kill(workers[1], signal.SIGTERM)
            await server.wait_for_lines(said(ORPHAN_SIGTERM))
            os.kill(workers[1], signal.SIGTERM)
            await poll(lambda: all(exited(pid) for pid in workers))
    finally:
        for pid in workers:  # one still draining if the test failed (reparented: not waited for)
            if not exited(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(metrics_dir, ignore_errors=True)

    assert outcomes == ["no reply"]  # cancelled: no reply sent
    messages = [line["message"] for line in server.log_lines() if line["pid"] == workers[1]]
    drain = [m for m in messages if m.startswith(("the supervisor is gone", "received"))]
    assert drain == [
        "the supervisor is gone: draining",
        ORPHAN_SIGTERM,
        "received SIGTERM while draining: cancelling the orders in flight",
    ]
    assert messages[-1] == (
        "drained orders: 0, cancelled: 1, cancelled by their clients: 0; exit status 1"
    )


def test_a_worker_whose_supervisor_is_gone_before_it_serves_does_not_fail_saying_so(
    tmp_path: Path,
) -> None:
    """A worker says it serves on a pipe only its supervisor reads: killed while the worker
    started, the supervisor hears nothing, and saying so must not end the worker (its
    lifeline drains it)."""
    ready_read, ready_write = os.pipe()
    lifeline_read, lifeline_write = os.pipe()
    os.close(ready_read)  # the supervisor is gone
    os.close(lifeline_write)
    try:
        handoff = Handoff(0, str(tmp_path), ready_write, lifeline_read)
        handoff.say_serving()
        handoff.say_draining_alone()
    finally:
        os.close(ready_write)
        os.close(lifeline_read)


async def test_a_worker_of_a_supervisor_without_a_lifeline_serves_on(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    """A worker restarted by a supervisor older than the lifeline (an upgrade in place) finds
    none in its environment: it starts and serves, and never takes the supervisor for gone."""
    listening, (ready_read, ready_write) = socket.socket(), os.pipe()
    # What an older supervisor handed over:
    env = {
        LISTEN_FD_ENV: str(listening.fileno()),
        MULTIPROC_ENV: str(tmp_path),
        READY_FD_ENV: str(ready_write),
    }
    try:
        handoff = Handoff.from_environ(env)
    finally:
        listening.close()
        os.close(ready_read)
        os.close(ready_write)

    assert handoff is not None
    assert handoff.lifeline_fd is None
    with trio.move_on_after(3600) as waited:
        await handoff.wait_for_supervisor_to_end()
    assert waited.cancelled_caught


@pytest.mark.parametrize(
    "chunks",
    [
        [(b".", 0), (b".", 0), (b".", 1), (b".", 1), (b"..", 1)],
        [(b".", 0), (b"..", 1), (b".", 1)],  # the last two read together
        [(b"...", 1), (b".", 1)],
        # A worker's word that it drains alone is not one that it serves.
        [(b".", 0), (b"d1\n", 0), (b"d2\n.", 0), (b"d3", 0), (b"\n.", 1), (b"x\n", 1)],
    ],
    ids=["one-by-one", "two-at-once", "all-at-once", "among-draining-words"],
)
async def test_the_supervisor_says_it_serves_once_the_last_worker_does_and_once_only(
    chunks: list[tuple[bytes, int]],
) -> None:
    """Each worker writes a byte to the ready pipe once it serves: with three workers, the
    "Running on" line (`on_serving`) comes with the third byte, however the bytes are read,
    not with an earlier one (tools take it to mean that the server answers); a worker
    restarted later, saying so again, does not bring a second line. A worker's word that it
    drains alone counts as none, and has it replaced; a word of no worker's is ignored."""
    ready_read, ready_write = os.pipe()
    replaced: list[int] = []

    class Recording(_Supervisor):
        async def replace(self, pid: int, nursery: trio.Nursery) -> None:
            replaced.append(pid)

    supervisor = Recording(Settings(workers=3), [], [], (ready_write, -1), "")
    said: list[None] = []
    try:
        async with trio.lowlevel.FdStream(ready_read) as ready, trio.open_nursery() as nursery:
            watching = await nursery.start(
                supervisor.watch_workers, ready, lambda: said.append(None), nursery
            )
            written = 0
            for chunk, lines in chunks:
                written += os.write(ready_write, chunk)
                await trio.testing.wait_all_tasks_blocked()  # the watcher has read it
                assert len(said) == lines, f"{len(said)} line(s) after {written} byte(s)"
            watching.cancel()
    finally:
        os.close(ready_write)
    draining = b"".join(chunk for chunk, _ in chunks).count(b"d")
    assert replaced == [1, 2, 3][:draining]  # each word once, one read in two parts too


def orders_counted(text: str) -> float:
    """The sum of `order_pipeline_orders_total` over its labels, in a scrape."""
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("order_pipeline_orders_total{")
    )


async def test_a_dead_workers_counts_stay_and_its_files_go(start_server: StartServer) -> None:
    """Worker 0 SIGKILLed three times, after two orders each: every scrape still counts every
    order (a counter never goes down), and the metrics directory holds no file of a dead
    worker (each restart left two that every scrape read: the directory grew without end),
    only the live workers' and the one pair of every exited worker's counts."""
    server = await start_server("--workers", "2", "--no-access-log", expect_errors=True)
    other = await pid_of_start(server, 1, 1)
    metrics_dir = environ_of(other)[MULTIPROC_ENV]
    body = json.dumps({"order_id": "o-1", "amount": 100, "delay_ms": {"payment": 0}}).encode()
    counted: list[float] = []
    dead: list[int] = []
    async with httpx.AsyncClient(base_url=server.url) as client:
        for death in range(1, 4):
            doomed = await pid_of_start(server, 0, death)
            for _ in range(2):
                stream = await connection_to(server, doomed, [doomed, other])
                assert await exchange(stream, rawhttp.request(body)) == 200
            counted.append(orders_counted((await client.get("/metrics")).text))
            os.kill(doomed, signal.SIGKILL)
            died = ("error", f"worker 0 (pid {doomed}) died with -9: restarting")
            await poll(lambda: died in supervisor_lines(server))  # noqa: B023 (awaited here)
            dead.append(doomed)
            counted.append(orders_counted((await client.get("/metrics")).text))
        await pid_of_start(server, 0, 4)
        counted.append(orders_counted((await client.get("/metrics")).text))

    assert counted == [2, 2, 4, 4, 6, 6, 6]
    files = {name for name in os.listdir(metrics_dir) if name.endswith(".db")}
    assert not [name for name in files if any(name.endswith(f"_{pid}.db") for pid in dead)]
    assert {"counter_retired.db", "histogram_retired.db"} <= files
