"""The composition root: build the services, the pipeline and the app, and serve them.

`assemble` is the only place where concrete services meet the orchestrator and
the app. `serve` has hypercorn's shape: start it with
`await nursery.start(serve, ...)` and it hands back the addresses it really
bound (port 0 becomes a real port).

The drain, as a load balancer sees it: when it begins `/readyz` turns 503 while
the server still accepts and serves for `drain_delay` seconds (so the balancer
takes it out of rotation before connections are refused); then hypercorn stops
accepting and gives the orders in flight `shutdown_grace` seconds. `Readiness`
says where the drain is.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import Final

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from quart_trio import QuartTrio

from . import connections
from .desk import OrderDesk
from .http import create_app
from .metrics import Metrics
from .orchestrator import Pipeline, Step
from .reporting import OrderReporter
from .services import CourierPool, CourierService, PaymentService, StepTracker, VendorService
from .settings import Settings
from .store import MemoryStore, OrderStore, StoreProcess
from .tracing import Tracing

__all__ = ["Assembly", "Readiness", "Settings", "assemble", "hypercorn_config", "serve"]

log = logging.getLogger(__name__)
connections.install()  # hypercorn's connection handling, mended (see connections)

# Connections the kernel may queue before they are accepted; hypercorn's default
# of 100 resets clients in a burst (2,000 at once did). The kernel caps it at somaxconn.
LISTEN_BACKLOG: Final = 4096


@attrs.define(eq=False)
class Readiness:
    """Where the server is in its drain: ready until it starts, then when it cancels orders."""

    drain_started: trio.Event = attrs.field(factory=trio.Event)
    # From this time on (Trio's clock) the drain cancels the orders still running: the end of
    # the grace, set before hypercorn sets its own deadline, or the moment of a second signal.
    cancels_from: float = math.inf
    # A second signal cut the drain short: the process exits 1.
    interrupted: bool = False

    def is_ready(self) -> bool:
        return not self.drain_started.is_set()

    def start_draining(self) -> None:
        self.drain_started.set()

    def interrupt(self) -> None:
        self.cancels_from = min(self.cancels_from, trio.current_time())
        self.interrupted = True

    def cancelled_by_drain(self) -> bool:
        """Whether an order cancelled now was cancelled by the drain, not by its client leaving."""
        return trio.current_time() >= self.cancels_from


@attrs.frozen
class Assembly:
    """The assembled service: the app, plus the parts tests and operators observe."""

    app: QuartTrio
    pipeline: Pipeline
    desk: OrderDesk
    store: OrderStore
    pool: CourierPool
    tracker: StepTracker
    metrics: Metrics
    readiness: Readiness


def assemble(
    settings: Settings | None = None,
    *,
    store: OrderStore | None = None,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
) -> Assembly:
    """Build every part from `settings`, around an open `store` (by default one in memory).

    `metrics` is given by a worker that shares its figures with the others. `tracing` is
    by default the installed tracer provider's, off if there is none (`configure_tracing`).
    """
    settings = settings or Settings()
    store = store or MemoryStore()
    metrics = metrics or Metrics()
    tracing = tracing or Tracing.from_global()
    readiness = Readiness()
    reporter = OrderReporter(metrics, store, cancelled_by_drain=readiness.cancelled_by_drain)
    pool = CourierPool(
        settings.courier_pool_size,
        settings.courier_queue_limit,
        metrics,
        wait_span=tracing.courier_wait,
    )
    tracker = StepTracker()
    metrics.read_live(lambda: tracker.in_flight, lambda: pool.in_use, lambda: pool.waiting)
    if isinstance(store, StoreProcess):
        store_process = store
        metrics.watch_store_process(lambda: store_process.pid)
    payment = PaymentService(settings.payment_delay_ms, ledger=store)
    vendor = VendorService(settings.vendor_delay_ms)
    courier = CourierService(pool, settings.courier_delay_ms)
    steps = [
        Step("payment", payment.charge, payment.refund),
        Step("vendor", vendor.notify, vendor.cancel),
        Step("courier", courier.assign, courier.unassign),
    ]
    pipeline = tracing.instrument(
        Pipeline(
            [tracker.track(s) for s in steps],
            timeout=settings.request_timeout,
            compensation_timeout=settings.compensation_timeout,
            on_finish=reporter.finished,
            on_step=reporter.step_ended,
        )
    )
    desk = OrderDesk(
        pipeline,
        store,
        lease_timeout=settings.lease_timeout,
        retention=settings.retention,
        on_refused=reporter.refused,
    )
    app = create_app(
        desk,
        is_ready=readiness.is_ready,
        metrics=metrics.exposition,
        on_refused=reporter.refused,
    )
    return Assembly(app, pipeline, desk, store, pool, tracker, metrics, readiness)


def hypercorn_config(settings: Settings, listen_fd: int | None = None) -> Config:
    """Hypercorn's settings; `listen_fd` is a socket inherited from the supervisor."""
    config = Config()
    config.bind = (
        [f"fd://{listen_fd}"] if listen_fd is not None else [f"{settings.host}:{settings.port}"]
    )
    config.backlog = LISTEN_BACKLOG
    # Hypercorn has one timer for "headers not yet complete" and "idle between
    # requests", started when the connection is accepted; see Settings.header_timeout.
    config.keep_alive_timeout = settings.header_timeout
    # read_timeout would also run while an order is processed: leave it off.
    config.read_timeout = None
    config.graceful_timeout = settings.shutdown_grace
    config.accesslog = logging.getLogger("hypercorn.access") if settings.access_log else None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve(
    assembly: Assembly,
    settings: Settings,
    *,
    listen_fd: int | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `assembly` until `shutdown_trigger` returns, then drain. By default the drain
    begins when `assembly.readiness.start_draining()` is called (the process does, on SIGTERM).

    Draining: `/readyz` answers 503 at once, but for `settings.drain_delay`
    seconds new connections are still accepted and served, so that a load
    balancer sees the 503 and stops sending before connections are refused;
    then no new connections are accepted, and orders in flight get
    `settings.shutdown_grace` seconds to finish (and compensate) before they
    are cancelled. Cancelling this task cancels them at once (the process does,
    on a second signal). Hypercorn logs each address it listens on
    ("Running on ...") and hands the list to `task_status`.
    """
    readiness = assembly.readiness

    async def drain() -> None:
        await (shutdown_trigger or readiness.drain_started.wait)()
        readiness.start_draining()
        await trio.sleep(settings.drain_delay)
        readiness.cancels_from = trio.current_time() + settings.shutdown_grace

    await hypercorn_serve(
        assembly.app,
        hypercorn_config(settings, listen_fd),
        shutdown_trigger=drain,
        task_status=task_status,
    )
