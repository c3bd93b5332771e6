"""`serve --workers N`: a worker's death, SIGTERM in its restart pause, a worker given up on.

Each test runs the real supervisor as a subprocess and kills workers by the pids
it logs. The worker about to be killed is first SIGSTOPped, so the other one
accepts every order sent: those orders are in flight on the worker that must drain.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable

import httpx
import trio

from order_pipeline.supervisor import RESTART_LIMIT, RESTART_WINDOW_S

from .server_process import ServerProcess, StartServer

STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")
IN_FLIGHT = re.compile(r"^order_pipeline_steps_in_flight (\S+)$", re.MULTILINE)
# Every step of these orders takes this long, so an order in flight has three steps in flight.
SLOW = {"payment": 2000, "vendor": 2000, "courier": 2000}
ORDERS = 4  # fewer than the default five couriers: every order runs its three steps at once
WAIT_S = 20  # for something a subprocess does


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


async def wait_for_steps_in_flight(server: ServerProcess, steps: int) -> None:
    """Wait until the server's /metrics counts `steps` steps in flight."""
    async with httpx.AsyncClient(base_url=server.url) as scraper:
        with trio.fail_after(WAIT_S):
            while True:
                found = IN_FLIGHT.search((await scraper.get("/metrics")).text)
                if found and float(found[1]) == steps:
                    return
                await trio.sleep(0.05)


async def order(server: ServerProcess, order_id: str, outcomes: list[int | str]) -> None:
    """POST one slow order; record its status, or the error that ended it."""
    body = {"order_id": order_id, "amount": 100, "delay_ms": SLOW}
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as client:
            outcomes.append((await client.post("/order", json=body)).status_code)
    except httpx.TransportError as exc:
        outcomes.append(type(exc).__name__)


async def test_sigterm_in_a_restart_pause_lets_the_other_worker_drain(
    start_server: StartServer,
) -> None:
    """SIGTERM while a dead worker waits to be restarted: the other's orders get 200, exit 0."""
    server = await start_server("--workers", "2", "--no-access-log", expect_errors=True)
    doomed = await pid_of_start(server, 0, 1)
    os.kill(doomed, signal.SIGSTOP)  # worker 1 accepts every order
    outcomes: list[int | str] = []
    async with trio.open_nursery() as nursery:
        for n in range(ORDERS):
            nursery.start_soon(order, server, f"pause-{n}", outcomes)
        await wait_for_steps_in_flight(server, 3 * ORDERS)
        os.kill(doomed, signal.SIGKILL)
        died = ("error", f"worker 0 (pid {doomed}) died with -9: restarting")
        await poll(lambda: died in supervisor_lines(server))
        code = await server.stop()  # SIGTERM, within the restart pause

    assert (outcomes, code) == ([200] * ORDERS, 0)
    assert started_pids(server, 0) == [doomed]  # the SIGTERM came before the restart
    assert [(line["level"], line["message"]) for line in server.errors()] == [died]


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
                os.kill(pid, signal.SIGSTOP)
                nursery.start_soon(order, server, "given-up", outcomes)
                await wait_for_steps_in_flight(server, 3)
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
