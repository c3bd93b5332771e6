"""The metrics' shape: no `_created` series; the process metrics, alone, with workers, and
of a store process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from order_pipeline import metrics
from order_pipeline.metrics import Metrics, retire_worker
from order_pipeline.server import assemble
from order_pipeline.store import StoreProcess

from .server_process import StartServer

PROCESS_SERIES = (
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_start_time_seconds",
)


STORE_PROCESS_SERIES = tuple(f"order_pipeline_store_{name}" for name in PROCESS_SERIES)


def series(text: str) -> dict[str, float]:
    """Each unlabelled series' value, by name."""
    return {
        name: float(value)
        for name, _, value in (line.partition(" ") for line in text.splitlines())
        if name[:1].isalpha() and "{" not in name
    }


def check_shape(text: str) -> None:
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1].isalpha()}
    assert not [name for name in names if name.endswith("_created")]
    assert set(PROCESS_SERIES) <= names
    assert "order_pipeline_orders_total" in names
    assert not [name for name in names if name.startswith("order_pipeline_store_process_")]


async def test_no_created_series_and_the_process_metrics() -> None:
    """One process: counters without `_created`, and CPU, memory, open files, start time."""
    client = assemble().app.test_client()
    await client.post("/order", json={"order_id": "m-1", "amount": 1})

    check_shape(await (await client.get("/metrics")).get_data(as_text=True))


async def test_with_workers_too(start_server: StartServer) -> None:
    """With --workers 2 the scrape has the same shape (process metrics of the worker answering)."""
    server = await start_server("--workers", "2", "--no-access-log")
    async with httpx.AsyncClient(base_url=server.url) as client:
        await client.post("/order", json={"order_id": "m-2", "amount": 1})
        check_shape((await client.get("/metrics")).text)


async def test_a_store_process_has_process_metrics_of_its_own(tmp_path: Path) -> None:
    """A server's store process: its CPU, memory, open files and start time, under
    `order_pipeline_store_process_`, while it runs; none once it has ended."""
    lost: list[str] = []
    async with StoreProcess(f"sqlite:///{tmp_path / 'orders.db'}", lost.append) as store:
        metrics = assemble(store=store).metrics
        pid = store.pid
        figures = series(metrics.exposition()[0].decode())

        assert pid is not None
        assert pid != os.getpid()
        assert set(STORE_PROCESS_SERIES) <= set(figures)
        assert figures["order_pipeline_store_process_resident_memory_bytes"] > 1_000_000
        # Started after the server, as its child: its own figures, not the server's.
        assert (
            figures["order_pipeline_store_process_start_time_seconds"]
            >= figures["process_start_time_seconds"]
        )
        assert figures["order_pipeline_store_process_open_fds"] < figures["process_open_fds"]
    assert store.pid is None
    assert not set(STORE_PROCESS_SERIES) & set(series(metrics.exposition()[0].decode()))
    assert lost == []


def test_a_worker_s_scrape_has_its_store_process_s_metrics(tmp_path: Path) -> None:
    """With workers (multiprocess mode) the scrape is built afresh: the store process's
    metrics are in it too."""
    metrics = Metrics(str(tmp_path))
    metrics.watch_store_process(os.getppid)

    figures = series(metrics.exposition()[0].decode())

    assert set(STORE_PROCESS_SERIES) <= set(figures)
    assert set(PROCESS_SERIES) <= set(figures)


async def test_only_requests_to_post_an_order_count_as_refused_orders() -> None:
    """A 404 or a 405 elsewhere is no order: only the framework's refusals of POST /order (a
    body over the limit, here) count in orders_total."""
    client = assemble().app.test_client()
    assert (await client.get("/nope")).status_code == 404
    assert (await client.get("/order")).status_code == 405
    assert (await client.post("/order", data=b" " * (64 * 1024 + 1))).status_code == 413

    text = await (await client.get("/metrics")).get_data(as_text=True)

    counted = [
        line for line in text.splitlines() if line.startswith("order_pipeline_orders_total{")
    ]
    assert counted == [
        'order_pipeline_orders_total{http_status="413",kind="payload_too_large"} 1.0'
    ]


def test_retired_workers_are_counted_once_and_a_scrape_holds_their_files(tmp_path: Path) -> None:
    """Two worker processes that counted 3 and 4 orders and exited: retired, their counts are
    in one pair of files and summed (7); a retirement while a scrape holds the directory's
    lock leaves the worker's files alone (False), to be tried again."""
    directory = str(tmp_path)
    count = (
        "import sys; from order_pipeline.metrics import Metrics; m = Metrics(sys.argv[1]);"
        " [m.count_order('ok', 200) for _ in range(int(sys.argv[2]))];"
        " m.order_seconds.labels('ok').observe(0.1); print(__import__('os').getpid())"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory}
    pids = [
        int(subprocess.check_output([sys.executable, "-c", count, directory, n], env=env))
        for n in ("3", "4")
    ]
    scraper = Metrics(directory)

    def counted() -> float:
        text = scraper.exposition()[0].decode()
        return sum(
            float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line.startswith("order_pipeline_orders_total{")
        )

    assert counted() == 7
    with metrics._locked(directory, exclusive=False):  # a scrape under way
        assert not retire_worker(pids[0], directory)
    assert f"counter_{pids[0]}.db" in os.listdir(directory)
    assert all(retire_worker(pid, directory) for pid in pids)
    assert counted() == 7
    assert sorted(os.listdir(directory)) == [
        "counter_retired.db", "histogram_retired.db", metrics.LOCK_FILE,
    ]  # fmt: skip
    assert 'order_pipeline_order_duration_seconds_count{kind="ok"} 2.0' in (
        scraper.exposition()[0].decode()
    )


def test_a_worker_s_file_of_0_bytes_fails_no_scrape_and_no_retirement(tmp_path: Path) -> None:
    """prometheus-client makes a worker's file, then gives it its size: a scrape by another
    worker in between read 0 bytes and raised struct.error (a 500, every figure lost), and so
    did the retirement of a worker that died in between (the supervisor's end). Such a file
    holds no figure: the scrape leaves it out, the retirement removes it."""
    directory = str(tmp_path)
    count = (
        "import sys; from order_pipeline.metrics import Metrics; m = Metrics(sys.argv[1]);"
        " m.count_order('ok', 200)"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory}
    subprocess.run([sys.executable, "-c", count, directory], env=env, check=True)
    dying = 2**22 + 1  # no process's pid (Linux's pid_max is at most 2**22)
    for kind in ("counter", "histogram", "gauge_livesum"):
        (tmp_path / f"{kind}_{dying}.db").touch()

    counted = 'order_pipeline_orders_total{http_status="200",kind="ok"} 1.0'
    assert counted in Metrics(directory).exposition()[0].decode()
    assert retire_worker(dying, directory)
    assert not [name for name in os.listdir(directory) if str(dying) in name]
    assert counted in Metrics(directory).exposition()[0].decode()


# A worker that counted, exited and lost its gauges (mark_process_dead); then the filesystem
# of the metrics directory fills up, and the worker is retired.
RETIRE_ON_A_FULL_DISK = """
import os, subprocess, sys
from prometheus_client.multiprocess import mark_process_dead
from order_pipeline.metrics import retire_worker

directory = sys.argv[1]
count = (
    "import sys; from order_pipeline.metrics import Metrics; m = Metrics(sys.argv[1]);"
    " m.count_order('ok', 200); m.order_seconds.labels('ok').observe(0.1);"
    " print(__import__('os').getpid())"
)
env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory}
pid = int(subprocess.check_output([sys.executable, "-c", count, directory], env=env))
mark_process_dead(pid, directory)
fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT)
try:
    while True:
        os.write(fd, bytes(4096))
except OSError:
    pass
try:
    retire_worker(pid, directory)
except OSError as exc:
    print("OSError", exc.errno == 28, sorted(os.listdir(directory)))
"""


def test_a_retirement_on_a_full_filesystem_raises_not_sigbus(tmp_path: Path) -> None:
    """The merged file is written through an mmap: on a full filesystem (a tmpfs of 512 KB
    here) its first page is SIGBUS, which ended the supervisor (status 135, no drain, its
    directory left behind). Its space is allocated first: an OSError, the files left."""
    script = tmp_path / "retire.py"
    script.write_text(RETIRE_ON_A_FULL_DISK)
    mount = tmp_path / "full"
    mount.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    shell = f'mount -t tmpfs -o size=512k tmpfs "$1" && exec "{sys.executable}" "$2" "$1"'
    argv = ["unshare", "--mount", "sh", "-c", shell, "sh", str(mount), str(script)]
    try:
        done = subprocess.run(argv, capture_output=True, env=env, timeout=60, check=False)
    except FileNotFoundError:
        pytest.skip("no unshare")
    if b"mount" in done.stderr or b"unshare" in done.stderr:
        pytest.skip(f"no tmpfs of our own: {done.stderr!r}")
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert done.stdout.startswith(b"OSError True"), done.stdout
    assert b"counter_" in done.stdout
    assert b".making" not in done.stdout
