"""The first minutes of a newcomer and of an operator: start-up failures, the start-up line,
`--version`, and the last line at exit.

A start-up failure is run as the real command (`python -m order_pipeline serve`), since
what is pinned is what a person sees: the exit status and stderr.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import order_pipeline
import order_pipeline.__main__
from order_pipeline.cli import parse_command
from order_pipeline.handoff import LIFELINE_FD_ENV, LISTEN_FD_ENV, MULTIPROC_ENV, READY_FD_ENV
from order_pipeline.store import open_store

from .pg import postgres_url, table_locked, with_params
from .server_process import (
    RUNNING,
    ServerProcess,
    StartServer,
    post,
    wait_for_steps_in_flight,
)

VERSION = importlib.metadata.version("order-pipeline")
ROOT = Path(__file__).parents[1]
EXIT_TIMEOUT_S = 30
SLOW = {"payment": 2000, "vendor": 2000, "courier": 2000}


def run_serve(*flags: str, store: str = "memory") -> subprocess.CompletedProcess[str]:
    """`python -m order_pipeline serve` with `flags`, to its exit (`--store memory` serves one
    worker only)."""
    argv = [sys.executable, "-m", "order_pipeline", "serve", "--store", store, *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=EXIT_TIMEOUT_S, check=False)


@pytest.fixture(name="taken_port")
def _taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket listens on."""
    with socket.create_server(("127.0.0.1", 0)) as other:
        yield other.getsockname()[1]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_one_line_and_status_1(
    taken_port: int, workers: str, tmp_path: Path
) -> None:
    """Port in use, with or without --workers: one line naming the address and cause, status 1."""
    store = f"sqlite:///{tmp_path / 'orders.db'}"
    done = run_serve("--port", str(taken_port), "--workers", workers, store=store)

    assert (done.returncode, done.stderr) == (
        1,
        f"order-pipeline: cannot listen on 127.0.0.1:{taken_port}: address already in use\n",
    )


def test_a_misspelt_variable_is_warned_of_at_start(taken_port: int) -> None:
    """ORDER_PIPELINE_RETENTON (a typo) would leave --retention at a day unsaid: the first
    line warns of it, naming the variable meant; other names under the prefix are no typo."""
    env = {
        **os.environ,
        "ORDER_PIPELINE_RETENTON": "600",
        "ORDER_PIPELINE_TEST_POSTGRES": "postgresql://db/test",
    }
    argv = [sys.executable, "-m", "order_pipeline", "serve", "--store", "memory"]
    argv += ["--port", str(taken_port)]  # exits once it has said what it would at start
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=EXIT_TIMEOUT_S, check=False, env=env
    )

    warnings = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert [(w["level"], w["message"]) for w in warnings] == [
        (
            "warning",
            "ORDER_PIPELINE_RETENTON is no setting: ignored (meant ORDER_PIPELINE_RETENTION?)",
        )
    ]
    assert done.returncode == 1


@pytest.mark.parametrize(
    ("handoff", "message"),
    [
        ({}, "ORDER_PIPELINE_LISTEN_FD is set without PROMETHEUS_MULTIPROC_DIR"),
        (
            {"PROMETHEUS_MULTIPROC_DIR": "."},
            "ORDER_PIPELINE_LISTEN_FD='0' is not a socket",
        ),
        (
            {"PROMETHEUS_MULTIPROC_DIR": ".", "ORDER_PIPELINE_LISTEN_FD": "x"},
            "ORDER_PIPELINE_LISTEN_FD='x' is not an open file descriptor",
        ),
    ],
)
def test_a_worker_s_handoff_set_by_hand_is_one_line_and_status_2(
    handoff: dict[str, str], message: str
) -> None:
    """ORDER_PIPELINE_LISTEN_FD is how a supervisor hands a worker its socket, not a setting;
    set by hand (copied from a worker's environment, say) it was a traceback."""
    handed = {READY_FD_ENV, LIFELINE_FD_ENV, MULTIPROC_ENV}
    env = {k: v for k, v in os.environ.items() if k not in handed}
    env |= {LISTEN_FD_ENV: "0", **handoff}
    argv = [sys.executable, "-m", "order_pipeline", "serve", "--store", "memory"]
    done = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,  # fd 0: no socket
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT_S,
        check=False,
        env=env,
    )

    assert (done.returncode, done.stderr) == (
        2,
        f"order-pipeline: {message}; only `serve --workers` sets ORDER_PIPELINE_LISTEN_FD,"
        " for its workers: unset it\n",
    )


async def test_a_port_another_server_with_workers_serves_is_in_use_too(
    start_server: StartServer, tmp_path: Path
) -> None:
    """--workers 2 on the port of a running --workers 2: one line, status 1, as for any port
    in use, rather than joining the first's SO_REUSEPORT sockets and sharing its
    connections; the first still serves."""
    first = await start_server("--workers", "2", "--no-access-log")
    port = int(first.url.rpartition(":")[2])
    store = f"sqlite:///{tmp_path / 'second.db'}"
    serve = [sys.executable, "-m", "order_pipeline", "serve", "--store", store]
    with trio.fail_after(EXIT_TIMEOUT_S):
        done = await trio.run_process(
            [*serve, "--port", str(port), "--workers", "2"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )

    assert (done.returncode, done.stderr.decode()) == (
        1,
        f"order-pipeline: cannot listen on 127.0.0.1:{port}: address already in use\n",
    )
    for _ in range(4):  # fresh connections: each may land on either worker
        async with httpx.AsyncClient(base_url=first.url) as client:
            assert (await client.get("/healthz")).status_code == 200


def test_a_host_that_does_not_resolve_is_one_line_and_status_1() -> None:
    """An unresolvable --host: one line naming it and the resolver's answer, status 1."""
    done = run_serve("--host", "nosuch.invalid", "--port", "0")

    assert done.returncode == 1
    assert done.stderr.startswith(
        "order-pipeline: cannot listen on nosuch.invalid:0: cannot resolve the host ("
    )
    assert done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr


def test_a_port_without_permission_is_one_line_and_status_1() -> None:
    """A port this user may not bind (1, for a user other than root): one line, status 1."""
    try:
        socket.create_server(("127.0.0.1", 1)).close()
    except PermissionError:
        pass
    except OSError as exc:
        pytest.skip(f"port 1 cannot be tried here: {exc}")
    else:
        pytest.skip("this user may bind port 1 (root, or a low ip_unprivileged_port_start)")
    done = run_serve("--port", "1")

    assert (done.returncode, done.stderr) == (
        1,
        "order-pipeline: cannot listen on 127.0.0.1:1: permission denied\n",
    )


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`--version` prints the installed distribution's version; the package exposes the same."""
    with pytest.raises(SystemExit) as exited:
        parse_command(["--version"], environ={})

    assert (exited.value.code, capsys.readouterr().out) == (0, f"order-pipeline {VERSION}\n")
    assert order_pipeline.__version__ == VERSION


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["orders"]], ids=lambda c: c[0])
def test_a_ctrl_c_while_the_modules_load_ends_the_command_quietly(
    command: list[str], tmp_path: Path
) -> None:
    """Ctrl+C in the command's first half-second (its modules loading, here right after
    Trio's, as `-X importtime` reports them): no traceback; the process ends by SIGINT, as
    an interrupted command does (a supervisor counts a worker ended so as drained)."""
    store = f"sqlite:///{tmp_path / 'orders.db'}"
    argv = [sys.executable, "-m", "order_pipeline", *command, "--store", store]
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as command_process:
        assert command_process.stderr is not None
        try:
            for line in command_process.stderr:  # one line per module imported, as it is
                if re.search(r"\|\s+trio$", line.rstrip()):
                    break
            command_process.send_signal(signal.SIGINT)
            _, stderr = command_process.communicate(timeout=EXIT_TIMEOUT_S)
        finally:
            command_process.kill()  # ended already, unless the test failed: never left running

    assert command_process.returncode == -signal.SIGINT
    assert "Traceback" not in stderr, stderr[-2000:]


# Run as `python -c`: the command, a Ctrl+C coming while an extension's initialisation
# (orjson's, which imports modules of its own) imports a module.
INTERRUPTED_IN_AN_EXTENSION = """
import os, signal, sys

class Interrupting:
    extension_loading = False

    def find_spec(self, name, path=None, target=None):
        if name == "orjson.orjson":
            Interrupting.extension_loading = True
        elif Interrupting.extension_loading:
            Interrupting.extension_loading = False
            print("SIGINT while orjson's initialisation imports", name, file=sys.stderr)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, Interrupting())
sys.argv = ["order-pipeline", *sys.argv[1:]]
from order_pipeline.__main__ import run
run()
"""


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["orders"]], ids=lambda c: c[0])
def test_a_ctrl_c_inside_an_extension_s_initialisation_ends_the_command_quietly(
    command: list[str], tmp_path: Path
) -> None:
    """A KeyboardInterrupt raised inside orjson's module initialisation (its import of a module
    of its own, as a Ctrl+C can land there) crashed the command with SIGSEGV. SIGINT is held
    back while the modules load: the command ends by SIGINT once they are loaded."""
    store = f"sqlite:///{tmp_path / 'orders.db'}"
    argv = [sys.executable, "-c", INTERRUPTED_IN_AN_EXTENSION, *command, "--store", store]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=EXIT_TIMEOUT_S, check=False)

    assert "SIGINT while orjson's initialisation imports" in done.stderr  # it came there
    assert done.returncode == -signal.SIGINT, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


# Run as `python -c`: the command, a Ctrl+C coming as SIGINT is blocked, between the last
# check for signals and the block's own system call (no bytecode runs between the two C calls
# here): the call blocks SIGINT, then raises the KeyboardInterrupt (CPython checks for
# signals after it), so the mask is left blocking SIGINT.
INTERRUPTED_AS_SIGINT_IS_BLOCKED = """
import _signal, _thread, itertools, operator, signal, sys

wrapper = signal.pthread_sigmask

def blocking_as_a_ctrl_c_comes(how, mask):
    signal.pthread_sigmask = wrapper  # once
    print("SIGINT as it is blocked", file=sys.stderr)
    calls = [(_thread.interrupt_main,), (_signal.pthread_sigmask, how, mask)]
    list(itertools.starmap(operator.call, calls))

signal.pthread_sigmask = blocking_as_a_ctrl_c_comes
sys.argv = ["order-pipeline", "orders", *sys.argv[1:]]
from order_pipeline.__main__ import run
run()
"""


def test_a_ctrl_c_as_sigint_is_blocked_ends_the_command_by_sigint(tmp_path: Path) -> None:
    """A Ctrl+C that comes as SIGINT is blocked for the imports raises its KeyboardInterrupt
    from the block itself, made: the quiet end's own SIGINT was then held pending, and the
    command exited 130 instead of ending by SIGINT (a shell running it in a script would
    carry on as after a failure, not stop as after a Ctrl+C)."""
    store = f"sqlite:///{tmp_path / 'orders.db'}"
    argv = [sys.executable, "-c", INTERRUPTED_AS_SIGINT_IS_BLOCKED, "--store", store]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=EXIT_TIMEOUT_S, check=False)

    assert "SIGINT as it is blocked" in done.stderr  # it came there
    assert done.returncode == -signal.SIGINT, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize(
    "raised",
    [
        BaseExceptionGroup("in a nursery", [KeyboardInterrupt(), ValueError("a bug")]),
        BaseExceptionGroup("in a nursery", [KeyboardInterrupt(), SystemExit(1)]),
        SystemExit(2),
    ],
    ids=["with-an-error", "with-an-exit", "an-exit"],
)
def test_only_a_ctrl_c_alone_ends_the_command_quietly(
    raised: BaseException, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error or an exit status raised beside a KeyboardInterrupt (one exception group from
    Trio) is not lost to the quiet end by SIGINT: it goes on as raised."""
    killed: list[int] = []

    def main() -> None:
        raise raised

    monkeypatch.setattr("order_pipeline.main.main", main)
    monkeypatch.setattr(os, "kill", lambda pid, signum: killed.append(signum))
    monkeypatch.setattr(signal, "signal", lambda signum, action: None)  # this process's own

    with pytest.raises(BaseException) as ended:  # noqa: PT011 # exactly `raised`, checked below
        order_pipeline.__main__.run()

    assert (ended.value, killed) == (raised, [])


def test_the_license_is_the_mit_license_pyproject_names() -> None:
    """pyproject.toml says `license = "MIT"`: the LICENSE file is that text, with its holder."""
    text = (ROOT / "LICENSE").read_text()

    assert 'license = "MIT"' in (ROOT / "pyproject.toml").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the order-pipeline authors\n")
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text


def running_lines(server: ServerProcess) -> list[dict[str, Any]]:
    return [line for line in server.log_lines() if RUNNING.search(line["message"])]


async def test_one_start_up_line_says_version_pid_address_and_settings(
    start_server: StartServer,
) -> None:
    """One "Running on" line: the version, the pid, the address bound, the settings in use;
    a clamped pool size is a warning naming the value given and the value used."""
    server = await start_server("--courier-pool-size", "500", "--no-access-log")
    pid = server.process.pid

    (line,) = running_lines(server)
    assert line["message"] == f"Running on {server.url} (order-pipeline {VERSION}, pid {pid})"
    assert line["settings"]["port"] == int(server.url.rpartition(":")[2])
    assert (line["settings"]["courier_pool_size"], line["settings"]["workers"]) == (128, 1)
    warnings = [line["message"] for line in server.log_lines() if line["level"] == "warning"]
    assert warnings == ["courier pool size 500 is outside 1..128: using 128"]


async def test_workers_say_running_once_with_per_worker_totals(start_server: StartServer) -> None:
    """--workers 2: one "Running on" line, the supervisor's, once both workers serve; it says
    the pool size and queue limit are per worker, and their totals."""
    server = await start_server(
        "--workers", "2", "--courier-pool-size", "0", "--courier-queue-limit", "30"
    )
    pid = server.process.pid

    (line,) = running_lines(server)
    assert line["pid"] == pid
    assert line["message"] == (
        f"Running on {server.url} with 2 workers (order-pipeline {VERSION}, pid {pid}); "
        "per worker: courier pool 1, queue limit 30; in all: 2 couriers, 60 waiting orders"
    )
    messages = [line["message"] for line in server.log_lines()]
    started = [m for m in messages if re.fullmatch(r"worker \d started \(pid \d+\)", m)]
    assert len(started) == 2
    assert messages.index(line["message"]) > max(messages.index(m) for m in started)
    warnings = [line for line in server.log_lines() if line["level"] == "warning"]
    assert [(w["pid"], w["message"]) for w in warnings] == [
        (pid, "courier pool size 0 is outside 1..128: using 1")
    ]
    assert await server.stop() == 0
    mine = [line["message"] for line in server.log_lines() if line["pid"] == pid]
    assert mine[-1] == "workers drained (each worker logged its own counts); exit status 0"


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_the_first_and_last_lines_are_logged_at_any_level(
    start_server: StartServer, workers: str
) -> None:
    """`--log-level error`: the "Running on" line still comes (tools wait for it, and it says
    which port 0 picked) and so do the drain's start and the last line, the supervisor's as
    well as each worker's; no other line (not the clamped pool size's warning)."""
    server = await start_server(  # waits for the Running on line
        "--log-level", "error", "--workers", workers, "--courier-pool-size", "0"
    )
    assert await server.stop() == 0
    lines = server.log_lines()
    assert len(running_lines(server)) == 1
    assert {line["level"] for line in lines} == {"info"}
    drained = "drained orders: 0, cancelled: 0, cancelled by their clients: 0; exit status 0"
    messages = [line["message"] for line in lines]
    if workers == "1":
        assert messages[1:] == ["received SIGTERM: draining", drained]
    else:  # the supervisor's drain, each worker's and its last line, then the supervisor's
        pid = server.process.pid
        mine = [line["message"] for line in lines if line["pid"] == pid]
        assert mine[1:] == [
            "received SIGTERM: draining the workers",
            "workers drained (each worker logged its own counts); exit status 0",
        ]
        assert messages.count("received SIGUSR1: draining") == messages.count(drained) == 2
        assert messages[-1] == mine[-1]


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_drain_cut_short_says_why_at_any_level(
    start_server: StartServer, workers: str
) -> None:
    """`--log-level error`, a second SIGTERM with an order in flight: the last line says
    `cancelled: 1; exit status 1`, but the warning that says why (the second signal) was
    left out at that level, so nothing said what cut the drain short. It is logged at any
    level, as the drain's start is: the lone server's or worker's, and the supervisor's."""
    flags = ("--log-level", "error", "--no-access-log", "--workers", workers)
    server = await start_server(*flags, check_exit=False)
    statuses: list[int | str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(post_slow_order, server.url, statuses)
        await wait_for_steps_in_flight(server.url, 3, within=EXIT_TIMEOUT_S)
        server.process.send_signal(signal.SIGTERM)
        # The drain's start (the worker's too), before the second signal.
        draining = "received SIGTERM: draining" if workers == "1" else "received SIGUSR1: draining"
        with trio.fail_after(EXIT_TIMEOUT_S):
            while True:
                if draining in messages_of(server):
                    break
                await trio.sleep(0.02)
        assert await server.stop() == 1

    cut_short = "received SIGTERM while draining: cancelling the orders in flight"
    if workers == "2":
        cut_short = "received SIGUSR2 while draining: cancelling the orders in flight"
        assert "received SIGTERM while draining: cutting the workers' drains short" in (
            messages_of(server)
        )
    assert cut_short in messages_of(server)
    last = "drained orders: 0, cancelled: 1, cancelled by their clients: 0; exit status 1"
    assert last in messages_of(server)


def messages_of(server: ServerProcess) -> list[str]:
    return [line["message"] for line in server.log_lines()]


async def post_slow_order(url: str, statuses: list[int | str]) -> None:
    body = {"order_id": "slow", "amount": 100, "delay_ms": SLOW}
    await post(url, body, statuses, within=EXIT_TIMEOUT_S)


@pytest.mark.parametrize(
    ("grace", "last"),
    [
        ("15", "drained orders: 1, cancelled: 0, cancelled by their clients: 0; exit status 0"),
        ("0", "drained orders: 0, cancelled: 1, cancelled by their clients: 0; exit status 0"),
    ],
)
async def test_the_last_line_counts_drained_and_cancelled_orders(
    start_server: StartServer, grace: str, last: str
) -> None:
    """SIGTERM with one order in flight: the last line says whether it was drained or cancelled."""
    server = await start_server("--no-access-log", "--shutdown-grace", grace, check_exit=False)
    statuses: list[int | str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(post_slow_order, server.url, statuses)
        await wait_for_steps_in_flight(server.url, 3, within=EXIT_TIMEOUT_S)
        code = await server.stop()

    assert code == 0
    assert server.log_lines()[-1]["message"] == last
    if grace == "15":
        assert statuses == [200]


async def test_a_store_on_a_full_disk_says_the_disk_is_full(tmp_path: Path) -> None:
    """A store file on a file system with no space left (a tmpfs of 512 KB filled, in a
    mount namespace of the test's own): SQLite cannot make its -shm file and says `disk I/O
    error`, which an operator reads as a failing disk. The line says the disk is full."""
    async with open_store(f"sqlite:///{tmp_path / 'orders.db'}"):
        pass
    mount = tmp_path / "full"
    mount.mkdir()
    shell = (
        'mount -t tmpfs -o size=512k tmpfs "$1" && cp "$2" "$1/orders.db"'
        ' && { dd if=/dev/zero of="$1/filler" bs=4k 2>/dev/null; true; }'
        f' && exec "{sys.executable}" -m order_pipeline serve --port 0'
        ' --store "sqlite:///$1/orders.db"'
    )
    argv = ["unshare", "--mount", "sh", "-c", shell, "sh", str(mount), str(tmp_path / "orders.db")]
    try:
        done = await trio.to_thread.run_sync(
            functools.partial(
                subprocess.run,
                argv,
                capture_output=True,
                text=True,
                timeout=EXIT_TIMEOUT_S,
                check=False,
            )
        )
    except FileNotFoundError:
        pytest.skip("no unshare")
    if done.stderr.startswith(("mount:", "unshare:")):  # theirs, not the server's
        pytest.skip(f"no tmpfs of our own: {done.stderr!r}")

    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"order-pipeline: {mount}/orders.db: cannot open the store:")
    assert "(no space left: 0 KB free in " in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


@pytest.mark.postgres
@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_read_only_postgresql_database_is_one_line_and_status_2(
    schema: str, workers: str
) -> None:
    """A database the store may not write (a hot standby, `default_transaction_read_only` on
    the role or the database; here the URL sets it for the session as they would) is refused
    at start, in one line, status 2, as one that cannot be reached: not a traceback at the
    first lease, nor a server that answers every order 503. The schema exists already (an
    earlier start made it), so opening it writes nothing."""
    url = postgres_url(schema=schema)
    async with open_store(url):
        pass
    read_only = with_params(url, options="-cdefault_transaction_read_only=on")
    done = await trio.to_thread.run_sync(
        functools.partial(run_serve, "--port", "0", "--workers", workers, store=read_only)
    )

    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("order-pipeline: postgresql://"), done.stderr
    assert "read-only" in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


@pytest.mark.postgres
async def test_a_lease_that_cannot_be_taken_at_start_is_one_line_and_status_2(
    schema: str,
) -> None:
    """The store opens, but this process's first lease cannot be committed (here an
    operator's LOCK TABLE on the leases, held past the store's lock wait): its last line
    names the lease and why, status 2, not an exception group's traceback."""
    url = postgres_url(schema=schema)
    async with open_store(url):
        pass
    async with table_locked(schema, "leases", "ACCESS EXCLUSIVE"):
        done = await trio.to_thread.run_sync(functools.partial(run_serve, "--port", "0", store=url))

    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.splitlines()[-1]  # after the store's own warnings, if any
    assert last.startswith("order-pipeline: cannot take this process's lease: postgresql://")
    assert "lock timeout" in last
