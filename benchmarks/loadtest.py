"""The load benchmark: the service against its two floors, with wrk, in one run.

Usage: python benchmarks/loadtest.py [--duration 15] [--rounds 3] [--out docs]
       python benchmarks/loadtest.py --render docs/loadtest.json  (the docs again, no run)
Starts, one after another on 127.0.0.1 with the same hypercorn settings, the
bare-ASGI floor, the Quart-Trio floor and the service; drives each with wrk
and benchmarks/order.lua; then runs benchmarks/inflight.py (the service and the
Trio floor). It does all of that `--rounds` times and reports medians, since a
shared machine's speed drifts by tens of per cent within minutes. Writes
docs/loadtest.json (or loadtest.json in `--out`), rewrites the results section of
docs/performance.md and draws docs/latency.svg (those two whatever `--out` says).
Ratios are what to read: every figure comes from the same run on the same machine.
No test asserts a time.

The PostgreSQL scenarios need psycopg (`pip install -e '.[postgres]'`) and a server:
ORDER_PIPELINE_TEST_POSTGRES (default postgresql://postgres@127.0.0.1:5432/test), as for
the tests; each start of the service gets a new schema there, dropped after the run.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "benchmarks" / "order.lua"
DOC = ROOT / "docs" / "performance.md"
SVG = ROOT / "docs" / "latency.svg"
BEGIN, END = "<!-- loadtest:begin -->", "<!-- loadtest:end -->"

S1_FLAGS = ["--payment-delay-ms", "1", "--vendor-delay-ms", "1", "--courier-delay-ms", "1",
            "--courier-pool-size", "128"]  # fmt: skip # flags and values in pairs
DEFAULT_FLAGS = ["--courier-pool-size", "128"]
COMMON = ["--no-access-log"]  # the one log line per order stays: it is part of the service
POSTGRES_URL = os.environ.get(
    "ORDER_PIPELINE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
# In a scenario's command, `--store FRESH_POSTGRES` stands for POSTGRES_URL on a new schema.
FRESH_POSTGRES = "postgresql (a new schema)"


def start(argv: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    """Start a server (the service or a floor); return it once its log says where it listens."""
    if str(ROOT) not in sys.path:  # for tests/launch.py: the start-up the tests and nox use too
        sys.path.insert(0, str(ROOT))
    from tests import launch

    log = Path(tempfile.mkstemp(prefix="loadtest-", suffix=".log")[1])
    try:
        return launch.start(argv, log, cwd=ROOT)
    except launch.NotStarted as error:
        raise SystemExit(f"{argv} did not start: {error}") from None


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def wrk(url: str, connections: int, duration: int, fail_fraction: float = 0.0) -> dict[str, Any]:
    return wrk_together([url], connections, duration, fail_fraction)


def wrk_together(
    urls: list[str],
    connections: int,
    duration: int,
    fail_fraction: float = 0.0,
    midway: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One wrk per URL, all at once, each with `connections`; their summaries as one, with
    what `midway` (called halfway through) returns.

    Requests, req/s and errors are summed; a latency percentile is the highest of the runs'
    (the slower host's: percentiles of separate runs cannot be merged exactly).
    """
    env = {**os.environ, "FAIL_FRACTION": str(fail_fraction)}
    runs = []
    for url in urls:
        command = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "30s",
                   "-s", str(LUA), url]  # fmt: skip # the wrk command on one line, as typed
        runs.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env))
    seen: dict[str, Any] = {}
    if midway is not None:
        time.sleep(duration / 2)
        seen = midway()
    outs = [run_.communicate()[0] for run_ in runs]  # every wrk ends before any is judged
    summaries: list[dict[str, Any]] = []
    for run_, out in zip(runs, outs, strict=True):
        if run_.returncode != 0:
            raise subprocess.CalledProcessError(run_.returncode, run_.args, out)
        summaries.append(json.loads(out.split("WRK_JSON ", 1)[1].splitlines()[0]))
    if len(summaries) == 1:
        return {**summaries[0], **seen}
    highest = ("duration_s", "p50_ms", "p90_ms", "p99_ms", "max_ms")
    return {
        key: max(s[key] for s in summaries) if key in highest else sum(s[key] for s in summaries)
        for key in summaries[0]
    } | seen


def busiest_worker_share(supervisor: int, port: int) -> dict[str, Any]:
    """The largest share of the server's established connections that one worker holds, read
    from /proc: each worker's socket inodes against /proc/net/tcp's connections on `port`."""
    workers = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError):  # a process that ended meanwhile
            if int(stat.read_text().rpartition(")")[2].split()[1]) == supervisor:
                workers.append(int(stat.parent.name))
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, _, state, *_, inode = line.split()[1:10]
            if int(local.rpartition(":")[2], 16) == port and state == "01":
                established.add(int(inode))
    counts = [len(_socket_inodes(pid) & established) for pid in workers]
    return {"busiest_worker_share": max(counts) / max(sum(counts), 1), "workers": len(counts)}


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(int(link[len("socket:[") : -1]))
    return inodes


def postgres_admin() -> Any:
    """A connection (autocommit) to POSTGRES_URL, or SystemExit saying what is missing."""
    try:
        import psycopg
    except ImportError:
        raise SystemExit(
            "the PostgreSQL scenarios need psycopg: pip install -e '.[postgres]'"
        ) from None
    try:
        return psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5)
    except psycopg.Error as error:
        raise SystemExit(
            f"the PostgreSQL scenarios need a server: none answers at {POSTGRES_URL}"
            f" ({' '.join(str(error).split())}); set ORDER_PIPELINE_TEST_POSTGRES"
        ) from None


def on_schema(url: str, schema: str) -> str:
    """`url` with `schema` first on the search_path (where the store makes its tables)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query["options"] = f"{query.get('options', '')} -csearch_path={schema}".strip()
    return parts._replace(query=urlencode(query, quote_via=quote)).geturl()


@contextmanager
def fresh_store(argv: list[str]) -> Iterator[list[str]]:
    """The service's command with a new store: a SQLite file (the default, unless a store is
    named), or for `--store FRESH_POSTGRES` a new schema on POSTGRES_URL, dropped afterwards."""
    if "order_pipeline" not in argv:
        yield argv
    elif FRESH_POSTGRES in argv:
        schema = f"loadtest_{uuid.uuid4().hex[:16]}"
        with postgres_admin() as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        try:
            url = on_schema(POSTGRES_URL, schema)
            yield [url if arg == FRESH_POSTGRES else arg for arg in argv]
        finally:
            with postgres_admin() as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")
    elif "--store" in argv:
        yield argv
    else:
        yield [*argv, "--store", f"sqlite:///{tempfile.mkdtemp(prefix='loadtest-')}/orders.db"]


def measure(
    argv: list[str], connections: int, duration: int, fail: float = 0.0, hosts: int = 1
) -> dict[str, Any]:
    """`hosts` processes of `argv` on one new store, each driven by a wrk of `connections`."""
    with fresh_store(argv) as command:
        processes: list[subprocess.Popen[bytes]] = []
        try:
            urls = []
            for _ in range(hosts):
                process, url = start(command)
                processes.append(process)
                urls.append(url)
            wrk_together(urls, connections, 2)  # warm up: imports, caches, first connections
            midway = None
            if "--workers" in command:
                port = int(urls[0].rpartition(":")[2])
                midway = functools.partial(busiest_worker_share, processes[0].pid, port)
            return wrk_together(urls, connections, duration, fail, midway)
        finally:
            for process in processes:
                stop(process)


def service(*flags: str) -> list[str]:
    return [sys.executable, "-m", "order_pipeline", "serve", "--port", "0", *COMMON, *flags]


def floor(name: str, *flags: str) -> list[str]:
    return [sys.executable, str(ROOT / "benchmarks" / "floors.py"), name, *flags]


def asyncio_rewrite(*flags: str) -> list[str]:
    """benchmarks/asyncio_service.py: the API on FastAPI and uvicorn, no store, no log lines."""
    return [sys.executable, str(ROOT / "benchmarks" / "asyncio_service.py"), "--port", "0", *flags]


# Its workers get a socket each: on one shared socket asyncio hands a burst of connections
# (wrk's 64 at once) all to whichever worker wakes first, as `uvicorn --workers 2` would.
ASYNCIO_2_WORKERS = ["--workers", "2", "--reuseport"]


# name: (server command, wrk connections, share of orders made to fail)
SCENARIOS: dict[str, tuple[list[str], int, float]] = {
    "floor_server_S1": (floor("bare"), 64, 0.0),
    "floor_framework_S1": (floor("quart"), 64, 0.0),
    "S1": (service(*S1_FLAGS), 64, 0.0),
    # S1 and S2 with nothing durable: what the SQLite store (the default) costs.
    "S1_memory_store": (service(*S1_FLAGS, "--store", "memory"), 64, 0.0),
    # The floors again under S2's load, each waiting 200 ms (S2's critical path) per request.
    "floor_server_S2": (floor("bare", "--sleep-ms", "200"), 100, 0.0),
    "floor_framework_S2": (floor("quart", "--sleep-ms", "200"), 100, 0.0),
    "S2": (service(*DEFAULT_FLAGS), 100, 0.0),
    "S2_memory_store": (service(*DEFAULT_FLAGS, "--store", "memory"), 100, 0.0),
    "S3": (service("--courier-pool-size", "5"), 100, 0.0),
    "S4": (service(*DEFAULT_FLAGS), 100, 1 / 3),
    "S5_2_workers": (service(*S1_FLAGS, "--workers", "2"), 64, 0.0),
    # Not one of the scenarios: S2 again with a second worker, for its headroom.
    "S2_2_workers": (service(*DEFAULT_FLAGS, "--workers", "2"), 100, 0.0),
    # Issue 14's "S2-like" row: S2's orders from 256 connections opened at once, on one
    # worker and on two (each worker's share of the connections is read halfway through).
    "S2_256": (service(*DEFAULT_FLAGS), 256, 0.0),
    "S2_256_2_workers": (service(*DEFAULT_FLAGS, "--workers", "2"), 256, 0.0),
    # The asyncio rewrite (FastAPI on uvicorn, a TaskGroup per order): no store, no log line
    # per order, no metrics, so read it against S1_memory_store and S2_memory_store.
    "asyncio_S1": (asyncio_rewrite(*S1_FLAGS), 64, 0.0),
    "asyncio_S1_2_workers": (asyncio_rewrite(*S1_FLAGS, *ASYNCIO_2_WORKERS), 64, 0.0),
    "asyncio_S2": (asyncio_rewrite(*DEFAULT_FLAGS), 100, 0.0),
    "asyncio_S2_2_workers": (asyncio_rewrite(*DEFAULT_FLAGS, *ASYNCIO_2_WORKERS), 100, 0.0),
    # S1 and S2 on a PostgreSQL store (each start on a new schema), against the memory store.
    "S1_postgres_store": (service(*S1_FLAGS, "--store", FRESH_POSTGRES), 64, 0.0),
    "S2_postgres_store": (service(*DEFAULT_FLAGS, "--store", FRESH_POSTGRES), 100, 0.0),
    # S1 on two hosts sharing one PostgreSQL schema: two server processes on their own ports,
    # each driven by its own wrk of 32 connections at the same time (64 in all, as S1), their
    # req/s summed. Both servers, both wrk and PostgreSQL share one machine's cores, so this
    # shows what a second host costs the database and the store, not how two machines scale.
    "S1_postgres_2_hosts": (service(*S1_FLAGS, "--store", FRESH_POSTGRES), 32, 0.0),
}
# Scenarios run on more than one host (server process), each with a wrk of its own.
HOSTS: dict[str, int] = {"S1_postgres_2_hosts": 2}


def in_process(what: str) -> dict[str, Any]:
    """CPU per order (2 s steps) and memory per in-flight order, each in a fresh process."""
    figures: dict[str, Any] = {}
    for mode in ([], ["--memory"]):
        done = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "inflight.py"), what, *mode],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip # one call, its options on one line
        figures.update(json.loads(done.stdout))
    return figures


def durable() -> dict[str, Any]:
    """benchmarks/durable.py: 20,000 orders in flight on each store, 10,000 recovered."""

    def one(*args: str) -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "durable.py"), *args],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip # one call, its options on one line
        figures: dict[str, Any] = json.loads(done.stdout)
        return figures

    return {
        "sqlite": one("inflight", "--store", "sqlite"),
        "memory": one("inflight", "--store", "memory"),
        "recovery": one("recovery"),
    }


def closed_loop_wait(run: dict[str, Any], connections: int = 100) -> float:
    """The mean time (ms) each of `connections` clients waits for an answer at `run`'s rate."""
    return 1000 * connections / run["rps"]


def ratios(runs: dict[str, Any], inflight: dict[str, Any]) -> dict[str, float]:
    """The figures to read, all from one round: every ratio compares runs made minutes apart."""
    s1, s2, s3 = runs["S1"]["rps"], runs["S2"], runs["S3"]
    service, floor_ = inflight["service"], inflight["trio_floor"]
    return {
        "S1 / framework floor": s1 / runs["floor_framework_S1"]["rps"],
        "S1 / server floor": s1 / runs["floor_server_S1"]["rps"],
        # Issue 14's measure of our own cost: the store's records are the store's budget.
        "S1 on the memory store / framework floor": (
            runs["S1_memory_store"]["rps"] / runs["floor_framework_S1"]["rps"]
        ),
        "S2 / closed-loop bound (500/s)": s2["rps"] / 500,
        "S3 / closed-loop bound (50/s)": s3["rps"] / 50,
        "S5: 2 workers / 1 worker": runs["S5_2_workers"]["rps"] / s1,
        "S1 SQLite store / memory store": s1 / runs["S1_memory_store"]["rps"],
        "S2 p50, SQLite store minus memory store (ms)": (
            s2["p50_ms"] - runs["S2_memory_store"]["p50_ms"]
        ),
        # Little's law: a closed loop of N connections that the CPU, not the 200 ms
        # critical path, limits answers each in N / rate on average; so a store that costs
        # CPU moves S2's p50 by this much even if its commits took no time at all.
        "S2 p50 gap, SQLite minus memory, that their rates alone explain (ms)": (
            closed_loop_wait(runs["S2"]) - closed_loop_wait(runs["S2_memory_store"])
        ),
        "S1 PostgreSQL store / memory store": (
            runs["S1_postgres_store"]["rps"] / runs["S1_memory_store"]["rps"]
        ),
        "S2 p50, PostgreSQL store minus memory store (ms)": (
            runs["S2_postgres_store"]["p50_ms"] - runs["S2_memory_store"]["p50_ms"]
        ),
        "S2 p50 gap, PostgreSQL minus memory, that their rates alone explain (ms)": (
            closed_loop_wait(runs["S2_postgres_store"]) - closed_loop_wait(runs["S2_memory_store"])
        ),
        "S1, two hosts on PostgreSQL / one host": (
            runs["S1_postgres_2_hosts"]["rps"] / runs["S1_postgres_store"]["rps"]
        ),
        "S2 (256 connections): 2 workers / 1 worker": (
            runs["S2_256_2_workers"]["rps"] / runs["S2_256"]["rps"]
        ),
        "S2 (256 connections), 2 workers: busiest worker's share of the connections": (
            runs["S2_256_2_workers"]["busiest_worker_share"]
        ),
        "S5: busiest worker's share of the connections": (
            runs["S5_2_workers"]["busiest_worker_share"]
        ),
        "S2 p50 above 200 ms (ms)": s2["p50_ms"] - 200,
        "S2 p99 above 200 ms (ms)": s2["p99_ms"] - 200,
        "S2 / framework floor under S2's load": s2["rps"] / runs["floor_framework_S2"]["rps"],
        "framework floor under S2's load / bound": runs["floor_framework_S2"]["rps"] / 500,
        "framework floor under S2's load: p50 above 200 ms (ms)": (
            runs["floor_framework_S2"]["p50_ms"] - 200
        ),
        "framework floor under S2's load: p99 above 200 ms (ms)": (
            runs["floor_framework_S2"]["p99_ms"] - 200
        ),
        "server floor under S2's load / bound": runs["floor_server_S2"]["rps"] / 500,
        "server floor under S2's load: p50 above 200 ms (ms)": (
            runs["floor_server_S2"]["p50_ms"] - 200
        ),
        "S2, 2 workers / closed-loop bound": runs["S2_2_workers"]["rps"] / 500,
        "S2, 2 workers: p50 above 200 ms (ms)": runs["S2_2_workers"]["p50_ms"] - 200,
        "S2, 2 workers: p99 above 200 ms (ms)": runs["S2_2_workers"]["p99_ms"] - 200,
        "in process: CPU per order (µs)": service["cpu_us_per_order"],
        "in process: memory per in-flight order (KB)": service["kb_per_in_flight_order"],
        "in process: CPU per order / Trio floor": (
            service["cpu_us_per_order"] / floor_["cpu_us_per_order"]
        ),
        "in process: memory per order / Trio floor": (
            service["kb_per_in_flight_order"] / floor_["kb_per_in_flight_order"]
        ),
        "desk, 20,000 in flight: CPU per order, SQLite store (µs)": (
            inflight["durable"]["sqlite"]["cpu_us_per_order"]
        ),
        "desk, 20,000 in flight: CPU per order, memory store (µs)": (
            inflight["durable"]["memory"]["cpu_us_per_order"]
        ),
        "desk, 20,000 in flight: memory per order, SQLite store (KB)": (
            inflight["durable"]["sqlite"]["kb_per_in_flight_order"]
        ),
        "desk, 20,000 in flight: memory per order, memory store (KB)": (
            inflight["durable"]["memory"]["kb_per_in_flight_order"]
        ),
        "recovery of 10,000 interrupted orders (s)": (
            inflight["durable"]["recovery"]["recovered_in_s"]
        ),
        "S1 memory store / asyncio rewrite": (
            runs["S1_memory_store"]["rps"] / runs["asyncio_S1"]["rps"]
        ),
        "S1, 2 workers / asyncio rewrite, 2 workers": (
            runs["S5_2_workers"]["rps"] / runs["asyncio_S1_2_workers"]["rps"]
        ),
        "S2 p50, memory store minus asyncio rewrite (ms)": (
            runs["S2_memory_store"]["p50_ms"] - runs["asyncio_S2"]["p50_ms"]
        ),
        "S2, 2 workers / asyncio rewrite, 2 workers": (
            runs["S2_2_workers"]["rps"] / runs["asyncio_S2_2_workers"]["rps"]
        ),
        "courier slot held after its client disconnects, service (s)": (
            inflight["slot_after_disconnect"]["service"]
        ),
        "courier slot held after its client disconnects, asyncio rewrite (s)": (
            inflight["slot_after_disconnect"]["asyncio"]
        ),
    }


def slot_after_disconnect() -> dict[str, Any]:
    """benchmarks/slot_after_disconnect.py: seconds a courier slot stays held after its client
    disconnects, for the service, the asyncio rewrite and the rewrite cancelling on disconnect."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "slot_after_disconnect.py")],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip # one call, its options on one line
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    return {line["server"]: line["slot_held_after_disconnect_s"] for line in lines}


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def run(duration: int, rounds: int) -> dict[str, Any]:
    """Every scenario once per round, rounds one after another; medians over the rounds."""
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    if any(FRESH_POSTGRES in argv for argv, _, _ in SCENARIOS.values()):
        postgres_admin().close()  # no server, or no psycopg: say so now, not minutes in
    each: list[dict[str, Any]] = []
    for number in range(1, rounds + 1):
        runs = {}
        for name, (argv, connections, fail) in SCENARIOS.items():
            runs[name] = measure(argv, connections, duration, fail, HOSTS.get(name, 1))
            print(f"round {number}: {name} {runs[name]['rps']:.0f} req/s", flush=True)
        inflight = {
            "service": in_process("service"),
            "trio_floor": in_process("trio-floor"),
            "durable": durable(),
            "slot_after_disconnect": slot_after_disconnect(),
        }
        each.append({"runs": runs, "in_process": inflight})
    return summarise(machine, duration, each)


def summarise(machine: str, duration: int, each: list[dict[str, Any]]) -> dict[str, Any]:
    """The rounds' raw figures with each round's ratios, and medians over the rounds (also
    what `--render` redoes, so a ratio added later is read off an earlier run)."""
    for r in each:
        r["ratios"] = ratios(r["runs"], r["in_process"])
    figures = {
        name: {key: median([r["runs"][name][key] for r in each]) for key in each[0]["runs"][name]}
        for name in each[0]["runs"]
    }
    return {
        "machine": machine,
        "duration_s": duration,
        "rounds": each,
        "median_runs": figures,
        "ratios": {
            name: {
                "median": median([r["ratios"][name] for r in each]),
                "low": min(r["ratios"][name] for r in each),
                "high": max(r["ratios"][name] for r in each),
            }
            for name in each[0]["ratios"]
        },
    }


# figure: (target as written in the issues, whether a value meets it); figures with no
# target are shown for reading the others.
TARGETS: dict[str, tuple[str, Callable[[float], bool]]] = {
    "S1 / framework floor": ("≥ 0.85", lambda v: v >= 0.85),
    "S1 on the memory store / framework floor": ("≥ 0.9", lambda v: v >= 0.9),
    "S1 / server floor": ("≥ 0.65", lambda v: v >= 0.65),
    "S2 / closed-loop bound (500/s)": ("≥ 0.97", lambda v: v >= 0.97),
    "S3 / closed-loop bound (50/s)": ("≥ 0.97", lambda v: v >= 0.97),
    "S5: 2 workers / 1 worker": ("≥ 1.5", lambda v: v >= 1.5),
    "S2 (256 connections): 2 workers / 1 worker": ("≥ 1.6", lambda v: v >= 1.6),
    "S2 (256 connections), 2 workers: busiest worker's share of the connections": (
        "45 % to 55 %",
        lambda v: 0.45 <= v <= 0.55,
    ),
    "S1 SQLite store / memory store": ("≥ 0.85", lambda v: v >= 0.85),
    "S2 p50, SQLite store minus memory store (ms)": ("≤ 5", lambda v: v <= 5),
    "S1 PostgreSQL store / memory store": ("≥ 0.85", lambda v: v >= 0.85),
    "S2 p50, PostgreSQL store minus memory store (ms)": ("≤ 5", lambda v: v <= 5),
    "recovery of 10,000 interrupted orders (s)": ("≤ 10", lambda v: v <= 10),
    "S2 p50 above 200 ms (ms)": ("≤ 2", lambda v: v <= 2),
    "S2 p99 above 200 ms (ms)": ("≤ 10", lambda v: v <= 10),
    "in process: CPU per order (µs)": ("≤ 100", lambda v: v <= 100),
    "in process: memory per in-flight order (KB)": ("≤ 12", lambda v: v <= 12),
}


def markdown(results: dict[str, Any]) -> str:
    rounds = len(results["rounds"])
    lines = [
        f"Run on {results['machine']}: {rounds} rounds of {results['duration_s']} s per "
        "scenario; each figure is the median over the rounds.",
        "",
        "| run | req/s | p50 ms | p90 ms | p99 ms | non-2xx | socket errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["median_runs"].items():
        errors = r["errors_connect"] + r["errors_read"] + r["errors_write"] + r["errors_timeout"]
        lines.append(
            f"| {name} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['errors_status']:.0f} | {errors:.0f} |"
        )
    lines += [
        "",
        "Each ratio is taken within one round, then the median (and the lowest and highest) "
        "over the rounds.",
        "",
        "| figure | median | lowest to highest | target | met (median) |",
        "|---|---|---|---|---|",
    ]
    for name, value in results["ratios"].items():
        target, ok = TARGETS.get(name, ("—", None))
        met = "—" if ok is None else ("yes" if ok(value["median"]) else "no")
        lines.append(
            f"| {name} | {value['median']:.2f} | {value['low']:.2f} to {value['high']:.2f} | "
            f"{target} | {met} |"
        )
    return "\n".join(lines)


def svg(results: dict[str, Any]) -> str:
    """p50/p90/p99 of every run as grouped bars, log scale: a plot with no plotting library."""
    runs = results["median_runs"]
    width, height, left, bottom = 760, 360, 70, 60
    low, high = math.log10(0.1), math.log10(max(max(r["p99_ms"] for r in runs.values()), 1) * 1.2)

    def y(ms: float) -> float:
        return (
            height
            - bottom
            - (math.log10(max(ms, 0.1)) - low) / (high - low) * (height - bottom - 20)
        )

    group = (width - left - 10) / len(runs)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        f'<text x="{width / 2}" y="14" text-anchor="middle">'
        "latency by run (ms, log scale): p50, p90, p99</text>",
    ]
    parts += [
        f'<line x1="{left}" x2="{width - 10}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
        f'stroke="#ddd"/><text x="{left - 6}" y="{y(tick) + 4:.1f}" '
        f'text-anchor="end">{tick:g}</text>'
        for tick in (0.1, 1, 10, 100, 1000, 10000)
        if math.log10(tick) <= high
    ]
    colours = ("#4c72b0", "#dd8452", "#c44e52")
    for j, label in enumerate(("p50", "p90", "p99")):  # the legend, under the run names
        parts.append(
            f'<rect x="{left + j * 46}" y="{height - 22}" width="10" height="10" '
            f'fill="{colours[j]}"/><text x="{left + 14 + j * 46}" y="{height - 13}">{label}</text>'
        )
    for i, (name, r) in enumerate(runs.items()):
        x0 = left + i * group + group * 0.15
        for j, key in enumerate(("p50_ms", "p90_ms", "p99_ms")):
            top = y(r[key])
            parts.append(
                f'<rect x="{x0 + j * group * 0.23:.1f}" y="{top:.1f}" width="{group * 0.2:.1f}" '
                f'height="{height - bottom - top:.1f}" fill="{colours[j]}"/>'
            )
        # Two lines (all words but the last, then the last), so ten labels fit side by side.
        for line, words in enumerate(name.replace("_", " ").rsplit(" ", 1)):
            parts.append(
                f'<text x="{x0 + group * 0.33:.1f}" y="{height - bottom + 14 + 11 * line}" '
                f'text-anchor="middle" font-size="9">{words}</text>'
            )
    parts.append("</svg>")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="measure nothing: redo the docs from it"
    )
    args = parser.parse_args()
    if args.render:
        earlier = json.loads(args.render.read_text())
        results = summarise(earlier["machine"], earlier["duration_s"], earlier["rounds"])
    else:
        results = run(args.duration, args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loadtest.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    print(table)
    text = DOC.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + table + "\n" + text[end:])
    SVG.write_text(svg(results))


if __name__ == "__main__":
    main()
