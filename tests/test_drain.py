"""The drain as a load balancer and an operator see it: `--drain-delay`, a second signal, and
the warning for an order the drain gave up on.

Most tests run the real server as a subprocess and signal it, since what is pinned is what
the signals do to a process: which connections are still accepted, what each order ends as,
and the exit status.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import h2.errors
import httpx
import pytest
import trio

from order_pipeline import connections
from order_pipeline.cli import parse_args
from order_pipeline.handoff import CUT_SHORT_SIGNAL, DRAIN_SIGNAL
from order_pipeline.kinds import label, lookup
from order_pipeline.main import DrainCount, receive_signals
from order_pipeline.model import OrderResult
from order_pipeline.server import Readiness, Settings, assemble, serve
from order_pipeline.store import FINISHED, RUNNING, MemoryStore

from .conftest import serving
from .launch import serve_argv
from .pg import admin, postgres_url, with_params
from .rawhttp import address, parse, request
from .server_process import (
    ServerProcess,
    StartServer,
    post,
    wait_for_steps_in_flight,
    wait_for_url,
)
from .test_connections import BYTES_PAST_THE_BUFFERS, receive_a_reply
from .test_hostile import RawH2, an_order_in_flight
from .test_supervisor import pid_of_start, poll, supervisor_lines

WAIT_S = 20  # for something a subprocess does
# Payment and courier done at once; the vendor runs long past the test.
LONG = {"payment": 0, "courier": 0, "vendor": 60_000}
DRAINING = "received SIGTERM: draining"
# A worker's, told by its supervisor (handoff.DRAIN_SIGNAL).
WORKER_DRAINING = "received SIGUSR1: draining"


def messages(server: ServerProcess) -> list[str]:
    return [line["message"] for line in server.log_lines()]


def order_lines(server: ServerProcess) -> list[dict[str, Any]]:
    return [line for line in server.log_lines() if line["logger"] == "order_pipeline.orders"]


async def exit_after_signal(server: ServerProcess, signum: int) -> tuple[int, float]:
    """Send `signum` to the server; its exit status, and the seconds it took to exit."""
    server.process.send_signal(signum)
    signalled = trio.current_time()
    with trio.fail_after(WAIT_S):
        code = await server.process.wait()
    return code, trio.current_time() - signalled


async def wait_for_log(server: ServerProcess, message: str) -> None:
    """Wait until the server has logged `message`: a subprocess's log is its only signal."""
    with trio.fail_after(WAIT_S):
        while True:
            if message in messages(server):
                return
            await trio.sleep(0.02)


def fields(record: logging.LogRecord) -> Any:
    """What a line logged with `extra={"fields": ...}` says for machines."""
    return record.__dict__["fields"]


def stored_orders(server: ServerProcess) -> list[dict[str, Any]]:
    """`order-pipeline orders --json` on the server's store, once the server has exited."""
    store = f"sqlite:///{server.log_path.with_suffix('.db')}"
    argv = [sys.executable, "-m", "order_pipeline", "orders", "--store", store, "--json"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=WAIT_S, check=True)
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_drain_delay_is_a_setting_with_its_variable_and_a_floor_of_0(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--drain-delay and ORDER_PIPELINE_DRAIN_DELAY set it (default 0); a negative one exits 2."""
    assert parse_args(["serve"], environ={}).drain_delay == 0
    assert parse_args(["serve", "--drain-delay", "2.5"], environ={}).drain_delay == 2.5
    assert parse_args(["serve"], environ={"ORDER_PIPELINE_DRAIN_DELAY": "4"}).drain_delay == 4
    with pytest.raises(SystemExit) as exited:
        parse_args(["serve", "--drain-delay", "-1"], environ={})
    assert exited.value.code == 2
    assert "--drain-delay: must be a non-negative number of seconds" in capsys.readouterr().err


def test_the_hard_deadline_counts_from_the_signal_and_includes_the_delay() -> None:
    """delay + grace + compensation timeout + 5 s: the worker's watchdog and the supervisor's."""
    settings = Settings(drain_delay=2, shutdown_grace=15, compensation_timeout=5)
    assert settings.hard_exit_delay == 2 + 15 + 5 + 5


async def test_during_the_drain_delay_new_connections_are_served_and_readyz_says_503(
    start_server: StartServer,
) -> None:
    """--drain-delay 4, SIGTERM: a new connection still gets /readyz 503 (with Retry-After)
    and a new order served 200; the process drains and exits 0 only after the delay (long
    enough for both to connect within it on a slow machine)."""
    server = await start_server("--no-access-log", "--drain-delay", "4")
    server.process.send_signal(signal.SIGTERM)
    signalled = trio.current_time()
    await wait_for_log(server, DRAINING)

    async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as client:
        ready = await client.get("/readyz")
    outcomes: list[int | str] = []
    await post(server.url, {"order_id": "late-comer", "amount": 1}, outcomes)
    with trio.fail_after(WAIT_S):
        code = await server.process.wait()

    assert (ready.status_code, ready.json()) == (503, {"status": "draining"})
    assert ready.headers["Retry-After"] == "1"
    assert outcomes == [200]
    assert trio.current_time() - signalled >= 4
    assert code == 0
    assert (
        messages(server)[-1]
        == "drained orders: 1, cancelled: 0, cancelled by their clients: 0; exit status 0"
    )


@asynccontextmanager
async def own_process_group(
    tmp_path: Path, *flags: str, ignoring: signal.Signals | None = None
) -> AsyncIterator[ServerProcess]:
    """The real server in a process group of its own, as a shell runs a job: `os.killpg` on it
    is what a terminal's Ctrl+C does. Killed, group and all, if the test leaves it running.
    `ignoring`: a signal it is started ignoring (SIGHUP as `nohup` starts it, SIGINT as a
    shell script's background job)."""
    fd, name = tempfile.mkstemp(dir=tmp_path, suffix=".log")
    store = f"sqlite:///{name.removesuffix('.log')}.db"
    try:
        process = await trio.lowlevel.open_process(
            serve_argv(sys.executable, "--store", store, *flags),
            stdout=fd,
            stderr=fd,
            process_group=0,
            preexec_fn=(lambda: signal.signal(ignoring, signal.SIG_IGN)) if ignoring else None,
        )
    finally:
        os.close(fd)
    try:
        url = await wait_for_url(process, trio.Path(name))
        yield ServerProcess(process, url, Path(name))
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            with trio.CancelScope(shield=True):
                await process.wait()


def test_the_drain_counts_an_order_cancelled_whose_undoing_failed_as_cancelled() -> None:
    """The last line's counts: an order cancelled by the drain is `cancelled` whatever its
    kind (`compensation_failed` when undoing it failed too), not `drained`."""
    count = DrainCount()
    count.draining = True
    for result in (
        OrderResult("o-1", (), "compensation_failed", 10, cancelled=True),
        OrderResult("o-2", (), "compensation_failed", 10),
        OrderResult("o-3", (), "canceled", 10, cancelled=True),
    ):
        count.observe_order(result, label(result.kind), lookup(result.kind).status)

    assert (count.drained, count.canceled_in_drain) == (1, 2)


def test_an_order_recovered_during_the_drain_is_not_counted_as_drained() -> None:
    """Another process's order that this one undoes by recovery while it drains (its lease
    lapsed) is no order of this drain's: the last line does not count it (it said `drained
    orders: 1` for a server that served nothing during its drain), though the metrics do."""
    count = DrainCount()
    count.draining = True
    for cancelled in (False, True):
        recovered = OrderResult("o-1", (), "interrupted", 80, cancelled, recovered=True)
        count.observe_order(recovered, label(recovered.kind), lookup(recovered.kind).status)

    assert (count.drained, count.canceled_in_drain, count.canceled_by_client) == (0, 0, 0)
    total = count.registry.get_sample_value(
        "order_pipeline_orders_total", {"kind": "interrupted", "http_status": "503"}
    )
    assert total == 2


async def test_an_order_recovery_cannot_read_during_the_drain_is_not_counted_as_drained(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Another process's interrupted order whose record this version cannot parse is left
    for an operator (compensation_failed) by a recovery as any other is undone: no order of
    this drain's either. It was reported without `recovered`, so a draining server that
    served nothing said `drained orders: 1`."""
    store = MemoryStore()
    await store.begin("k-new", "o-1", "h", b'{"order_id": "o-1", "amount": 5, "tip": 1}', "gone")
    count = DrainCount()
    count.draining = True
    recovering = assemble(Settings(), store=store, metrics=count).desk

    async with trio.open_nursery() as nursery:
        await nursery.start(recovering.maintain)
        await trio.sleep(5)
        nursery.cancel_scope.cancel()

    stored = await store.get("k-new")
    assert stored is not None
    assert (stored.state, stored.kind) == (FINISHED, "compensation_failed")
    assert (count.drained, count.canceled_in_drain, count.canceled_by_client) == (0, 0, 0)
    total = count.registry.get_sample_value(
        "order_pipeline_orders_total", {"kind": "compensation_failed", "http_status": "500"}
    )
    assert total == 1


async def test_an_http2_client_s_own_cancel_during_the_drain_is_not_counted_the_drain_s(
    start_server: StartServer,
) -> None:
    """An HTTP/2 client resets its order's stream (RST_STREAM CANCEL) while the drain waits
    for it: the order is cancelled by its client, not by the drain (no warning says so),
    but the last line counted it `cancelled: 1`, the count of orders the drain gave up on.
    It is counted apart, and the drain, which gave up on nothing, exits 0."""
    server = await start_server("--no-access-log")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        with trio.fail_after(WAIT_S):
            order = await an_order_in_flight(client, server.url, vendor_ms=60_000)
            server.process.send_signal(signal.SIGTERM)
            await wait_for_log(server, DRAINING)
            client.conn.reset_stream(order, h2.errors.ErrorCodes.CANCEL)
            await client.flush()
            code = await server.process.wait()

    assert code == 0
    assert [line["kind"] for line in order_lines(server)] == ["canceled"]
    assert [line for line in server.log_lines() if line["level"] != "info"] == []
    assert messages(server)[-1] == (
        "drained orders: 0, cancelled: 0, cancelled by their clients: 1; exit status 0"
    )


TERM, INT = signal.SIGTERM, signal.SIGINT


@pytest.mark.parametrize(
    ("supervised", "heard", "cut_short"),
    [
        (False, [TERM], False),
        (False, [TERM, INT], True),  # a lone server: any second signal
        (True, [TERM, DRAIN_SIGNAL], False),  # one SIGTERM to the process group, either order
        (True, [DRAIN_SIGNAL, TERM], False),
        (True, [TERM, DRAIN_SIGNAL, TERM, CUT_SHORT_SIGNAL], True),  # two to the group
        (True, [DRAIN_SIGNAL, CUT_SHORT_SIGNAL], True),  # two to the supervisor
        (True, [DRAIN_SIGNAL, DRAIN_SIGNAL], False),
        (True, [TERM, TERM], True),  # a worker whose supervisor is gone
    ],
)
async def test_which_signals_cut_a_drain_short(
    supervised: bool, heard: list[int], cut_short: bool
) -> None:
    """The first signal starts the drain; which later ones cut it short (cancelling the orders
    in flight) depends on whether a supervisor tells the process, and how."""
    readiness = Readiness()
    send, received = trio.open_memory_channel[int](len(heard))
    for signum in heard:
        send.send_nowait(signum)
    send.close()
    with trio.CancelScope() as serving:
        await receive_signals(received, readiness, serving, supervised=supervised)

    assert not readiness.is_ready()
    assert (serving.cancel_called, readiness.interrupted) == (cut_short, cut_short)


@pytest.mark.parametrize(
    ("supervisor_gone", "heard", "said"),
    [
        (True, [TERM], True),
        (True, [TERM, TERM], True),  # then the second cuts the drain short
        (False, [DRAIN_SIGNAL, TERM], False),  # a SIGTERM to the group: the drain said so
    ],
)
async def test_a_sigterm_to_a_worker_draining_because_its_supervisor_is_gone_is_said(
    supervisor_gone: bool, heard: list[int], said: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker's drain started by its lifeline, not by a signal: the first SIGTERM changes
    nothing, and says so (it was silent), with what a second does."""
    readiness = Readiness()
    if supervisor_gone:
        readiness.start_draining()  # as `drain_when_supervisor_ends` does
    send, received = trio.open_memory_channel[int](len(heard))
    for signum in heard:
        send.send_nowait(signum)
    send.close()
    with caplog.at_level(logging.INFO, logger="order_pipeline.main"), trio.CancelScope() as serving:
        await receive_signals(received, readiness, serving, supervised=True)

    orphan_sigterm = (
        "received SIGTERM while draining (the supervisor is gone): the drain goes on; "
        "a second SIGTERM cancels the orders in flight"
    )
    assert (orphan_sigterm in caplog.messages) == said
    assert serving.cancel_called == (heard.count(TERM) == 2)


@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name
)
async def test_a_signal_to_the_process_group_drains_every_worker_once_with_the_delay(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """--workers 2 --drain-delay 2, one signal to the whole process group (Ctrl+C at the
    terminal, SIGHUP as it hangs up; SIGTERM from systemd's default KillMode or
    `kill -- -PGID`): each worker acts on
    it once (its supervisor's word), so it drains rather than cutting the drain short: new
    connections get /readyz 503 and new orders 200, the order in flight 200."""
    flags = ("--workers", "2", "--drain-delay", "2", "--no-access-log")
    async with own_process_group(tmp_path, *flags) as server:
        outcomes: list[int | str] = []
        async with trio.open_nursery() as nursery:
            body = {"order_id": "in-flight", "amount": 1, "delay_ms": {"vendor": 1500}}
            nursery.start_soon(post, server.url, body, outcomes)
            await wait_for_steps_in_flight(server.url, 1)  # its vendor step
            os.killpg(server.process.pid, signum)
            await wait_for_log(server, f"received {signum.name}: draining the workers")
            readies = []
            for _ in range(4):  # fresh connections: either worker may answer
                async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as client:
                    readies.append((await client.get("/readyz")).status_code)
            await post(server.url, {"order_id": "late-comer", "amount": 1}, outcomes)
        with trio.fail_after(WAIT_S):
            code = await server.process.wait()

    assert readies == [503] * 4
    assert sorted(map(str, outcomes)) == ["200", "200"]
    assert code == 0
    assert [line for line in server.log_lines() if line["level"] != "info"] == []
    assert messages(server)[-1] == (
        "workers drained (each worker logged its own counts); exit status 0"
    )


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("ignored", [signal.SIGHUP, signal.SIGINT], ids=lambda s: s.name)
async def test_a_server_started_ignoring_a_terminal_s_signal_serves_on_when_it_comes(
    tmp_path: Path, workers: str, ignored: signal.Signals
) -> None:
    """`nohup order-pipeline serve &` (SIGHUP ignored from the start, as its operator meant:
    to outlive the terminal), or `order-pipeline serve &` in a shell script (SIGINT ignored,
    as the shell starts a background job: a Ctrl+C meant for the script). That signal to its
    process group then neither drains nor ends it, with or without workers: it serves on,
    and drains on SIGTERM as usual. A SIGINT drained it once it served (while it loaded,
    Python raised nothing)."""
    flags = ("--workers", workers, "--no-access-log")
    async with own_process_group(tmp_path, *flags, ignoring=ignored) as server:
        os.killpg(server.process.pid, ignored)
        outcomes: list[int | str] = []
        await post(server.url, {"order_id": "after-hang-up", "amount": 1}, outcomes)
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as client:
            ready = (await client.get("/readyz")).status_code
        server.process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT_S):
            code = await server.process.wait()

    assert (outcomes, ready, code) == ([200], 200, 0)
    assert not [m for m in messages(server) if ignored.name in m]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
async def test_a_group_signal_while_a_worker_starts_is_a_clean_drain(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """A worker still starting (restarted after a death) has no signal handler yet: a SIGTERM
    (or SIGHUP) to the process group ends it by the default action, before it could take an
    order. That is no failed drain: the supervisor exits 0 (it gave 1 at random before)."""
    async with own_process_group(tmp_path, "--workers", "2", "--no-access-log") as server:
        os.kill(await pid_of_start(server, 0, 1), signal.SIGKILL)
        await pid_of_start(server, 0, 2)  # restarted a second later; now importing
        os.killpg(server.process.pid, signum)
        with trio.fail_after(WAIT_S):
            code = await server.process.wait()

    assert code == 0
    assert messages(server)[-1] == (
        "workers drained (each worker logged its own counts); exit status 0"
    )


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name
)
async def test_a_second_signal_cancels_and_undoes_the_orders_in_flight(
    start_server: StartServer, signum: signal.Signals
) -> None:
    """SIGTERM (or SIGINT, or SIGHUP) twice with three long orders in flight: at the second,
    each order is cancelled, its payment and courier undone, logged canceled with a warning;
    the process exits 1 at once (not 60 s later, nor at its 25 s hard deadline); the store
    says the same."""
    server = await start_server("--no-access-log", check_exit=False)
    outcomes: list[int | str] = []
    async with trio.open_nursery() as nursery:
        for n in range(3):
            body = {"order_id": f"long-{n}", "amount": 100, "delay_ms": LONG}
            nursery.start_soon(post, server.url, body, outcomes)
        await wait_for_steps_in_flight(server.url, 3)  # the three vendor steps
        server.process.send_signal(signum)
        await wait_for_log(server, f"received {signum.name}: draining")
        code, took = await exit_after_signal(server, signum)

    assert (code, took < 3) == (1, True)
    assert outcomes == ["RemoteProtocolError"] * 3  # cancelled: no reply sent
    lines = order_lines(server)
    assert sorted(line["order_id"] for line in lines) == ["long-0", "long-1", "long-2"]
    for line in lines:
        assert (line["kind"], line["http_status"]) == ("canceled", None)
        steps = [
            (s["name"], s["status"], s.get("compensation", {}).get("status")) for s in line["steps"]
        ]
        assert steps == [
            ("payment", "ok", "ok"),
            ("vendor", "canceled", None),
            ("courier", "ok", "ok"),
        ]
    warnings = [line["message"] for line in server.log_lines() if line["level"] == "warning"]
    assert warnings[0] == f"received {signum.name} while draining: cancelling the orders in flight"
    assert sorted(re.sub(r"\d+ ms", "N ms", w) for w in warnings[1:]) == [
        f"order long-{n} cancelled by the drain: undone payment ok N ms, courier ok N ms"
        for n in range(3)
    ]
    assert server.errors() == []
    assert (
        messages(server)[-1]
        == "drained orders: 0, cancelled: 3, cancelled by their clients: 0; exit status 1"
    )
    stored = stored_orders(server)
    assert [(o["kind"], o["compensations"], o["net_charge"]) for o in stored] == [
        ("canceled", {"payment": "ok", "courier": "ok"}, 0)
    ] * 3


async def test_a_second_signal_to_the_supervisor_cuts_every_workers_drain_short(
    start_server: StartServer,
) -> None:
    """--workers 2, SIGTERM twice: the supervisor forwards both; every order in flight is
    cancelled and undone, each worker exits 1 at once, and so does the supervisor."""
    server = await start_server("--workers", "2", "--no-access-log", check_exit=False)
    pid = server.process.pid
    outcomes: list[int | str] = []

    def workers_draining() -> int:
        lines = server.log_lines()
        return sum(1 for line in lines if line["pid"] != pid and line["message"] == WORKER_DRAINING)

    async with trio.open_nursery() as nursery:
        for n in range(4):
            body = {"order_id": f"long-{n}", "amount": 100, "delay_ms": LONG}
            nursery.start_soon(post, server.url, body, outcomes)
        await wait_for_steps_in_flight(server.url, 4)  # the four vendor steps, on either worker
        server.process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT_S):  # each worker has been told to drain
            while True:
                if workers_draining() == 2:
                    break
                await trio.sleep(0.02)
        code, took = await exit_after_signal(server, signal.SIGTERM)

    assert (code, took < 3) == (1, True)
    assert outcomes == ["RemoteProtocolError"] * 4
    assert sorted((line["order_id"], line["kind"]) for line in order_lines(server)) == [
        (f"long-{n}", "canceled") for n in range(4)
    ]
    mine = [(line["level"], line["message"]) for line in server.log_lines() if line["pid"] == pid]
    assert ("warning", "received SIGTERM while draining: cutting the workers' drains short") in mine
    assert mine[-1] == (
        "info",
        "workers drained (each worker logged its own counts); exit status 1",
    )
    # Each worker's last line; one without orders may have drained before the second signal.
    last = [
        re.fullmatch(
            r"drained orders: 0, cancelled: (\d), cancelled by their clients: 0; exit status (\d)",
            m,
        )
        for m in messages(server)
    ]
    counts = sorted((int(m[1]), int(m[2])) for m in last if m)
    assert len(counts) == 2, "\n".join(messages(server))
    assert sum(cancelled for cancelled, _ in counts) == 4
    assert all(status == 1 for cancelled, status in counts if cancelled)
    assert server.errors() == []


@pytest.mark.postgres
async def test_a_second_signal_makes_the_supervisor_exit_1_though_every_worker_drained_in_full(
    start_server: StartServer, schema: str
) -> None:
    """--workers 2, SIGTERM twice, the second once both workers are past their drain: each
    worker exits 0 (its drain was over, the signal came too late to cut it short), yet the
    supervisor exits 1, as it does whenever an operator cut the drain short.

    A worker's drain ends with its lease's release (DELETE FROM leases): a trigger of the
    test's own holds that DELETE on an advisory lock the test holds, so each worker waits
    there, no task of it hearing signals any more, until the supervisor has forwarded the
    second."""
    app = f"drain-test-{uuid.uuid4().hex[:12]}"
    url = with_params(postgres_url(schema=schema), application_name=app)
    server = await start_server(
        "--workers", "2", "--no-access-log", "--store", url, check_exit=False
    )  # fmt: skip # flags and their values in pairs
    workers = [await pid_of_start(server, number, 1) for number in range(2)]
    gate = uuid.uuid4().int >> 65  # an advisory lock's key (a bigint) of this test's own
    cut_short = ("warning", "received SIGTERM while draining: cutting the workers' drains short")
    test_conn = await trio.to_thread.run_sync(admin)

    def run(query: str, *args: object) -> list[tuple[Any, ...]]:
        cursor = test_conn.execute(query, args)
        return cursor.fetchall() if cursor.description else []

    try:
        await trio.to_thread.run_sync(run, f"SET search_path TO {schema}")
        await trio.to_thread.run_sync(
            run,
            "CREATE FUNCTION hold_release() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " PERFORM set_config('lock_timeout', '0', true);"  # the store's is 2 s
            f" PERFORM pg_advisory_xact_lock_shared({gate}); RETURN OLD; END $$",
        )
        await trio.to_thread.run_sync(
            run,
            "CREATE TRIGGER hold_release BEFORE DELETE ON leases"
            " FOR EACH ROW EXECUTE FUNCTION hold_release()",
        )
        await trio.to_thread.run_sync(run, "SELECT pg_advisory_lock(%s)", gate)
        server.process.send_signal(signal.SIGTERM)

        async def releases_held() -> bool:
            rows = await trio.to_thread.run_sync(
                run,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
                " AND wait_event = 'advisory' AND query LIKE 'DELETE FROM leases%%'",
                app,
            )
            return rows == [(2,)]

        with trio.fail_after(WAIT_S):
            while not await releases_held():  # noqa: ASYNC110  # the server's state: no Event tells it
                await trio.sleep(0.02)
        server.process.send_signal(signal.SIGTERM)
        await poll(lambda: cut_short in supervisor_lines(server))
    finally:
        await trio.to_thread.run_sync(test_conn.close)  # the lock released, the releases go on
    with trio.fail_after(WAIT_S):
        code = await server.process.wait()

    mine = supervisor_lines(server)
    assert code == 1, mine
    exits = [("info", f"worker {n} (pid {pid}) exited with 0") for n, pid in enumerate(workers)]
    # Both still running when the second signal came, and both ended with 0:
    assert mine.index(cut_short) < min(mine.index(line) for line in exits)
    assert mine[-1] == (
        "info",
        "workers drained (each worker logged its own counts); exit status 1",
    )
    last = [m for m in messages(server) if m.startswith("drained orders: ")]
    assert (
        last
        == ["drained orders: 0, cancelled: 0, cancelled by their clients: 0; exit status 0"] * 2
    )
    assert server.errors() == []


async def test_an_order_the_drain_gives_up_on_is_a_warning_one_whose_client_left_is_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In a drain, an order still running when the grace ends gets a warning besides its line;
    one cancelled within the grace because its client left gets its line only."""
    caplog.set_level(logging.INFO)
    stop = trio.Event()
    outcomes: list[int | str] = []

    def order_line(order_id: str) -> bool:
        return any(
            r.name == "order_pipeline.orders" and r.getMessage().startswith(f"order {order_id} ")
            for r in caplog.records
        )

    async with (
        serving(Settings(shutdown_grace=2), shutdown_trigger=stop.wait) as (service, url),
        trio.open_nursery() as nursery,
    ):
        leaving = trio.CancelScope()

        async def post_then_leave() -> None:
            with leaving:
                await post(url, {"order_id": "left", "amount": 1, "delay_ms": LONG}, outcomes)

        nursery.start_soon(post, url, {"order_id": "kept", "amount": 1, "delay_ms": LONG}, outcomes)
        nursery.start_soon(post_then_leave)
        with trio.fail_after(5):
            await service.tracker.wait_for(lambda n: n == 2)  # the two vendor steps
        stop.set()
        leaving.cancel()  # within the grace: its client leaves
        with trio.fail_after(1.8):  # before the grace ends: poll, the log has no event
            while True:
                if order_line("left"):
                    break
                await trio.sleep(0.01)

    assert outcomes == ["RemoteProtocolError"]  # "kept": cancelled, no reply sent
    orders = [fields(r) for r in caplog.records if r.name == "order_pipeline.orders"]
    kinds = {line["order_id"]: line["kind"] for line in orders}
    assert kinds == {"left": "canceled", "kept": "canceled"}
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.name == "order_pipeline.reporting"
    assert re.fullmatch(
        r"order kept cancelled by the drain: undone payment ok \d+ ms, courier ok \d+ ms",
        warning.getMessage(),
    )
    assert fields(warning) == {"order_id": "kept", "undone": {"payment": "ok", "courier": "ok"}}


@pytest.mark.postgres
async def test_an_order_the_drain_gave_up_on_whose_final_record_meets_a_lock_is_not_recovered(
    schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """As `test_an_order_whose_client_left_and_whose_final_record_meets_a_lock_is_not_recovered`
    (test_durability), for an order the drain gave up on (its grace over): its final record
    held behind a row lock, the order over a lease old and running under this process's
    live lease while the drain waits for another order's undoing (6 s), its process
    recovered it at every look. It is left to its held record: `canceled`, reported once."""
    from .test_durability import looked
    from .test_store import postgres_stores, row_locked

    settings = Settings(
        port=0, lease_timeout=1.0, drain_delay=0, shutdown_grace=0.5, compensation_timeout=10
    )
    long = {"payment": 0, "vendor": 0, "courier": 60_000}
    held = {"order_id": "o-held", "amount": 70, "delay_ms": long}
    slow = {**held, "order_id": "o-slow", "compensation_delay_ms": {"vendor": 6_000}}
    outcomes: list[int | str] = []

    async def post_under(key: str, body: dict[str, Any]) -> None:
        try:
            async with httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client:
                headers = {"Idempotency-Key": key}
                outcomes.append(
                    (await client.post("/order", json=body, headers=headers)).status_code
                )
        except httpx.TransportError as exc:
            outcomes.append(type(exc).__name__)

    async with postgres_stores(postgres_url(schema=schema), 1, timeout=0.3) as (store,):
        assembly = assemble(settings, store=store)
        stop, drained = trio.Event(), trio.Event()

        async def serve_until_drained(task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(assembly, settings, shutdown_trigger=stop.wait, task_status=task_status)
            drained.set()

        with caplog.at_level(logging.INFO):
            async with trio.open_nursery() as nursery:
                await nursery.start(assembly.desk.maintain)  # looks a second apart
                (url,) = await nursery.start(serve_until_drained)
                nursery.start_soon(post_under, "k-held", held)
                nursery.start_soon(post_under, "k-slow", slow)
                with trio.fail_after(5):
                    for key in ("k-held", "k-slow"):
                        while not await store.net_charge(key):  # noqa: ASYNC110 # no event
                            await trio.sleep(0.01)
                    await assembly.tracker.wait_for(lambda n: n == 2)  # the two couriers'
                async with row_locked(schema, "k-held"):
                    stop.set()  # the grace ends half a second later
                    with trio.fail_after(5):
                        await assembly.tracker.wait_for(lambda n: n == 1)  # o-slow's undoing
                    await looked(assembly.desk, 4)  # o-held over a lease old at two looks
                    meanwhile = await store.get("k-held")
                    draining = not drained.is_set()
                with trio.fail_after(10):
                    await drained.wait()
                await store.renew_lease(assembly.desk.owner, 1.0)  # carries the held record
                nursery.cancel_scope.cancel()
        stored = await store.get("k-held")
        charged = await store.net_charge("k-held")

    assert outcomes == ["RemoteProtocolError"] * 2  # cancelled, no reply sent
    assert draining
    assert meanwhile is not None
    assert meanwhile.state == RUNNING
    assert stored is not None
    assert (stored.state, stored.kind) == (FINISHED, "canceled")
    assert charged == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "order_pipeline.orders"]
    assert sorted(line.split(" ", 3)[1:3] for line in lines) == [
        ["o-held", "canceled"],
        ["o-slow", "canceled"],
    ]
    assert "left running" not in caplog.text


async def test_a_reply_in_the_drain_says_close_and_its_linger_holds_only_what_the_drain_waits_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An HTTP/1.1 reply sent in the drain says `Connection: close` (it said nothing, and its
    connection was closed after it), and the connection, closed (its EOF sent), lingers for
    its client's end only while the drain waits for another: a client that never ends its
    connection (a raw socket) held the drain's end for the linger (2 s; 5 s here) after the
    last order. While the other order runs, what the client sends on after its reply is
    read and dropped (no reset): the linger's purpose kept where it costs the drain nothing."""
    monkeypatch.setattr(connections, "LINGER_S", 5.0)
    settings = Settings(access_log=False, shutdown_grace=5)
    drain = trio.Event()
    short = b'{"order_id": "short", "amount": 1}'  # 200 ms: its vendor's delay
    long = json.dumps({"order_id": "long", "amount": 1, "delay_ms": LONG}).encode()
    async with AsyncExitStack() as clients:  # open until the server has ended
        async with serving(settings, shutdown_trigger=drain.wait) as (service, url):
            answered, left = [
                await clients.enter_async_context(await trio.open_tcp_stream(*address(url)))
                for _ in range(2)
            ]
            with trio.fail_after(5):
                await left.send_all(request(long, close=False))
                await service.tracker.wait_for(lambda n: n == 1)  # its vendor step
                await answered.send_all(request(short, close=False))
                await service.tracker.wait_for(lambda n: n == 1 + 3)
                drain.set()
                reply = parse(await receive_a_reply(answered))
                await answered.send_all(b" " * BYTES_PAST_THE_BUFFERS)  # the drain still waits
            await left.aclose()  # its order is cancelled: the drain waits for nothing more
            left_at = trio.current_time()
        held = trio.current_time() - left_at
    assert (reply.status, reply.headers.get("connection"), held < 0.5) == (200, "close", True)


async def test_the_hard_deadline_holds_while_a_stalled_store_is_released_and_closed(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Another process holds the SQLite file's write lock: after SIGTERM the server's last
    store calls (the lease's renewal under way, then its release) each wait up to the busy
    timeout (5 s); the hard deadline (grace 0 + compensations 1 + 5 s) still ends the
    process, exit 1, instead of waiting for them (over 8 s)."""
    db = tmp_path / "stalled.db"
    server = await start_server(
        "--no-access-log", "--store", f"sqlite:///{db}",
        "--shutdown-grace", "0", "--compensation-timeout", "1",
        check_exit=False, expect_errors=True,
    )  # fmt: skip # flags and their values in pairs
    locker = await trio.to_thread.run_sync(
        functools.partial(sqlite3.connect, db, timeout=10, isolation_level=None)
    )
    try:
        await trio.to_thread.run_sync(locker.execute, "BEGIN IMMEDIATE")
        # A renewal (every second) is waiting for the lock by then, for 3.5 s more at least:
        # the lease's release waits behind it. Only time tells: nothing outside the server
        # shows its writer waiting in SQLite's busy loop (no line, no metric, no lock held).
        await trio.sleep(2.5)
        code, took = await exit_after_signal(server, signal.SIGTERM)
    finally:
        await trio.to_thread.run_sync(locker.close)

    assert code == 1, (took, messages(server))
    assert 6 <= took < 8, took  # at 6 s, before the stalled calls end
    assert "drain did not finish by its hard deadline: exiting" in messages(server)


async def test_spans_a_collector_never_takes_hold_the_exit_one_export_timeout_at_most(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tracing to a collector that accepts connections but never answers, one export's
    timeout 1 s, each span a batch of its own: the 40 spans of 10 orders still queued at
    SIGTERM are sent for 1 s at most, then dropped, and the drained server exits 0 in a few
    seconds. (Left to the SDK's flush at interpreter exit, it took 30 s, past the hard
    deadline, with a second SIGTERM ignored.)"""
    collector = trio.socket.socket()
    await collector.bind(("127.0.0.1", 0))
    collector.listen(100)  # the kernel accepts its connections; nothing ever reads them
    with collector:
        monkeypatch.setenv(
            "OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{collector.getsockname()[1]}"
        )
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
        monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1")
        server = await start_server("--no-access-log", check_exit=False, expect_errors=True)
        outcomes: list[int | str] = []
        async with trio.open_nursery() as nursery:
            for n in range(10):
                order = {"order_id": f"o-{n}", "amount": 1, "delay_ms": LONG | {"vendor": 0}}
                nursery.start_soon(post, server.url, order, outcomes)
        code, took = await exit_after_signal(server, signal.SIGTERM)

    assert outcomes == [200] * 10
    assert code == 0
    assert took < 1 + 5, took  # the flush's 1 s, and the drain's and interpreter's own
    assert (
        "drained orders: 0, cancelled: 0, cancelled by their clients: 0; exit status 0"
        in messages(server)
    )
