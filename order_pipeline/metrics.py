"""Prometheus metrics of the service, in one place.

The three gauges (steps in flight, courier slots in use, orders waiting for a
courier) are read from the tracker and the pool when scraped, not written on
every change: a gauge write takes a lock, and twelve of them per order were 5 %
of an order's instructions (docs/performance.md).

With several workers, the supervisor sets `PROMETHEUS_MULTIPROC_DIR` before a
worker imports prometheus-client, and the worker's entry point hands the same
directory to `Metrics`: every worker writes its figures to files there, and
any worker's `/metrics` reports the sum over all of them. The gauges use
`livesum`, so a worker that has exited stops counting; each worker writes its
own gauges every `LIVE_REFRESH_S` (`refresh_live_forever`), so another
worker's share in a scrape is at most that old. A worker that has exited
keeps counting in the counters and histograms (a counter never goes down),
but not in files of its own: the supervisor adds its figures to one file of
every exited worker's (`retire_worker`), so the directory, and the time a
scrape takes to read it, stays bounded however often workers are restarted
(one file pair per restart grew it without end: 6,000 files made each scrape
block its worker for 0.6 s). Scrapes read the directory under a shared lock,
the retirement writes it under an exclusive one: a scrape sees a dead worker's
figures once, never twice or not at all. prometheus-client makes a worker's file
(at its start, and at its first histogram's first figure) before it gives the
file its size: one of 0 bytes holds no figure yet, and is left out of a scrape
(prometheus-client's reader raised struct.error on it, the scrape a 500:
prometheus/client_python#1199) and removed with its worker if it died then.

No `_created` series: they read like counts of orders, and say only when the
process started, which `process_start_time_seconds` says once. The standard
process metrics (CPU, memory, open files, start time) are the answering
process's: with several workers, the worker that answered the scrape
(prometheus-client's multiprocess mode cannot sum them). A server's store
process (PostgreSQL) has the same metrics under `order_pipeline_store_process_`.
"""

from __future__ import annotations

import fcntl
import glob
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, Final

import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from .model import OrderResult

__all__ = ["Metrics", "retire_worker"]

LIVE_REFRESH_S: Final = 1.0
# The multiprocess directory's lock (not a `.db`, which prometheus-client would read), and
# the pid part of the files holding every exited worker's counters and histograms.
LOCK_FILE: Final = "scrape.lock"
RETIRED: Final = "retired"
LATENCY_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.5, 1, 2.5, 5, 10, 30,
)  # fmt: skip # the buckets on one line


class Metrics:
    """The service's metrics, registered in a registry of their own (so tests can build many)."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        # Process-wide in prometheus-client (see the module docstring); untyped upstream.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self._store_process: Callable[[], int | None] | None = None
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._live: list[tuple[Gauge, Callable[[], int]]] = []
        r = self.registry
        self.orders = Counter(
            "order_pipeline_orders", "Orders answered, by outcome kind and HTTP status.",
            ["kind", "http_status"], registry=r,
        )  # fmt: skip # name, help, labels and options read as one declaration
        self.order_seconds = Histogram(
            "order_pipeline_order_duration_seconds", "Order latency, compensations included.",
            ["kind"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip # name, help, labels and options read as one declaration
        self.step_seconds = Histogram(
            "order_pipeline_step_duration_seconds", "Step latency, by step and status.",
            ["step", "status"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip # name, help, labels and options read as one declaration
        self.compensations = Counter(
            "order_pipeline_compensations", "Compensations run, by step and outcome.",
            ["step", "status"], registry=r,
        )  # fmt: skip # name, help, labels and options read as one declaration
        self.shed = Counter(
            "order_pipeline_orders_shed",
            "Courier steps refused at once because too many orders waited for a courier.",
            registry=r,
        )
        self.canceled = Counter(
            "order_pipeline_orders_canceled",
            "Orders cancelled from outside (client gone, or shutdown grace exceeded).",
            registry=r,
        )
        self.steps_in_flight = Gauge(
            "order_pipeline_steps_in_flight", "Steps and compensations running now.",
            multiprocess_mode="livesum", registry=r,
        )  # fmt: skip # name, help, labels and options read as one declaration
        self.courier_slots_in_use = Gauge(
            "order_pipeline_courier_slots_in_use", "Courier pool slots held now.",
            multiprocess_mode="livesum", registry=r,
        )  # fmt: skip # name, help, labels and options read as one declaration
        self.courier_waiting = Gauge(
            "order_pipeline_courier_waiting", "Orders waiting for a courier slot now.",
            multiprocess_mode="livesum", registry=r,
        )  # fmt: skip # name, help, labels and options read as one declaration

    def observe_order(self, result: OrderResult, kind: str, http_status: int) -> None:
        """An order that ran; `kind` is its label ("ok" for success)."""
        self.count_order(kind, http_status)
        self._child(self.order_seconds, kind).observe(result.duration_ms / 1000)
        if result.cancelled:
            self.canceled.inc()
        for step in result.steps:
            # Timed by a process that died (or by nobody: `unknown`), or never ended.
            if not result.recovered and step.duration_ms is not None:
                self._child(self.step_seconds, step.name, step.status).observe(
                    step.duration_ms / 1000
                )
            if step.compensation is not None:
                self._child(self.compensations, step.name, step.compensation.status).inc()

    def count_order(self, kind: str, http_status: int) -> None:
        self._child(self.orders, kind, str(http_status)).inc()

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: the lookup costs more than the increment."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def pool_shed(self) -> None:
        self.shed.inc()

    def read_live(
        self,
        steps_in_flight: Callable[[], int],
        courier_slots_in_use: Callable[[], int],
        courier_waiting: Callable[[], int],
    ) -> None:
        """Where the gauges' figures come from; they are read at scrape time."""
        self._live = [
            (self.steps_in_flight, steps_in_flight),
            (self.courier_slots_in_use, courier_slots_in_use),
            (self.courier_waiting, courier_waiting),
        ]

    def watch_store_process(self, pid: Callable[[], int | None]) -> None:
        """Report the store process's CPU, memory and files as well, read at scrape time
        from /proc of `pid()` (no series while it returns None)."""
        self._store_process = pid
        self._store_collector(self.registry)

    def _store_collector(self, registry: CollectorRegistry) -> None:
        if self._store_process is not None:
            read = self._store_process
            # prometheus-client reads /proc/{pid}: "none" is no process, so no series
            ProcessCollector("order_pipeline_store", lambda: read() or "none", registry=registry)

    def refresh_live(self) -> None:
        for gauge, read in self._live:
            gauge.set(read())

    async def refresh_live_forever(self) -> None:
        """Keep this worker's gauge files fresh for scrapes answered by other workers."""
        while True:
            self.refresh_live()
            await trio.sleep(LIVE_REFRESH_S)

    def exposition(self) -> tuple[bytes, str]:
        """The text format: this process's figures, or every worker's in multiprocess mode."""
        self.refresh_live()
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        registry.register(_Workers(self.multiprocess_dir))
        ProcessCollector(registry=registry)
        self._store_collector(registry)
        with _locked(self.multiprocess_dir, exclusive=False):
            return generate_latest(registry), CONTENT_TYPE_LATEST


class _Workers(Collector):
    """Every worker's figures, as prometheus-client's `MultiProcessCollector` reads them from
    the directory's files, less the files of 0 bytes (being made: see the module docstring)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Iterable[Metric]:
        files = [f for f in glob.glob(os.path.join(self.directory, "*.db")) if _sized(f)]
        merged: Iterable[Metric] = MultiProcessCollector.merge(files, accumulate=True)  # type: ignore[no-untyped-call]  # untyped upstream
        return merged


def _sized(path: str) -> bool:
    """Whether a metrics file has been given its size (it never shrinks). One gone is not: a
    dead worker's gauges are removed unlocked (`mark_process_dead`)."""
    try:
        return os.path.getsize(path) > 0
    except FileNotFoundError:
        return False


class _Busy(Exception):
    """The lock is held the other way (a scrape under way, or stopped)."""


@contextmanager
def _locked(directory: str, *, exclusive: bool) -> Iterator[None]:
    """The multiprocess directory's lock: shared by scrapes, which wait for it (a retirement
    holds it for milliseconds); exclusive to `retire_worker`, which does not wait (_Busy):
    a worker stopped (SIGSTOP) in a scrape must not stop its supervisor."""
    fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB if exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            raise _Busy() from None
        yield
    finally:
        os.close(fd)  # releases the lock


def retire_worker(pid: int, directory: str) -> bool:
    """Worker `pid` has exited: its gauges stop counting (prometheus-client's
    `mark_process_dead`), and its counters and histograms are added to the files of every
    exited worker's, then its own removed, so that the directory does not grow with
    every restart. Called by the supervisor, once the worker is gone. False if a scrape
    held the lock: the worker's files are left as they are (counted all the same), for the
    caller to try again. OSError (a full filesystem): the files are left as they are."""
    mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]  # untyped upstream
    try:
        with _locked(directory, exclusive=True):
            _retire(pid, directory)
    except _Busy:
        return False
    return True


def _retire(pid: int, directory: str) -> None:
    """Add worker `pid`'s counters and histograms to every exited worker's (locked)."""
    for kind in ("counter", "histogram"):
        dead = os.path.join(directory, f"{kind}_{pid}.db")
        if not os.path.exists(dead):
            continue
        if not _sized(dead):  # made as the worker died, before its size: no figure in it
            os.remove(dead)
            continue
        retired = os.path.join(directory, f"{kind}_{RETIRED}.db")
        totals: dict[str, tuple[float, float]] = {}
        for path in (retired, dead):
            if os.path.exists(path):
                for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(path):  # type: ignore[no-untyped-call]  # untyped upstream
                    totals[key] = (totals.get(key, (0.0, 0.0))[0] + value, timestamp)
        # Written whole beside it, then put in its place: a failure leaves both as they were.
        making = os.path.join(directory, f"{kind}_{RETIRED}.making")
        with suppress(FileNotFoundError):
            os.remove(making)
        # Its space taken first, as much as both files (the merge fits, never growing it): a
        # write to the mmap of a page a full filesystem cannot give is SIGBUS, the end of the
        # supervisor; posix_fallocate says ENOSPC (an OSError: the files are left as they are).
        size = sum(os.path.getsize(path) for path in (retired, dead) if os.path.exists(path))
        fd = os.open(making, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError:
            os.remove(making)
            raise
        finally:
            os.close(fd)
        merged = MmapedDict(making)  # type: ignore[no-untyped-call]  # untyped upstream
        try:
            for key, (value, timestamp) in totals.items():
                merged.write_value(key, value, timestamp)  # type: ignore[no-untyped-call]  # untyped upstream
        finally:
            merged.close()  # type: ignore[no-untyped-call]  # untyped upstream
        os.replace(making, retired)
        os.remove(dead)
