"""The composition root: build the services, the pipeline and the app, and serve them.

`assemble` is the only place where concrete services meet the orchestrator and
the app. `serve` has hypercorn's shape: start it with
`await nursery.start(serve, ...)` and it hands back the addresses it really
bound (port 0 becomes a real port).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Final

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from quart_trio import QuartTrio

from .http import create_app
from .metrics import Metrics
from .orchestrator import Pipeline, Step
from .orders import OrderDesk
from .reporting import OrderReporter
from .services import CourierPool, CourierService, PaymentService, StepTracker, VendorService
from .settings import Settings
from .store import MemoryStore, OrderStore

__all__ = ["Assembly", "Readiness", "Settings", "assemble", "hypercorn_config", "serve"]

log = logging.getLogger(__name__)

# Connections the kernel may queue before they are accepted; hypercorn's default
# of 100 resets clients in a burst (2,000 at once did). The kernel caps it at somaxconn.
LISTEN_BACKLOG: Final = 4096


@attrs.define(eq=False)
class Readiness:
    """Whether the server takes new orders; false from the moment it starts draining."""

    drain_started: trio.Event = attrs.field(factory=trio.Event)

    def is_ready(self) -> bool:
        return not self.drain_started.is_set()

    def start_draining(self) -> None:
        self.drain_started.set()


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
) -> Assembly:
    """Build every part from `settings`, around an open `store` (by default one in memory).

    `metrics` is given by a worker that shares its figures with the others.
    """
    settings = settings or Settings()
    store = store or MemoryStore()
    metrics = metrics or Metrics()
    reporter = OrderReporter(metrics, store)
    readiness = Readiness()
    pool = CourierPool(settings.courier_pool_size, settings.courier_queue_limit, metrics)
    tracker = StepTracker()
    metrics.read_live(lambda: tracker.in_flight, lambda: pool.in_use, lambda: pool.waiting)
    payment = PaymentService(settings.payment_delay_ms, ledger=store)
    vendor = VendorService(settings.vendor_delay_ms)
    courier = CourierService(pool, settings.courier_delay_ms)
    steps = [
        Step("payment", payment.charge, payment.refund),
        Step("vendor", vendor.notify, vendor.cancel),
        Step("courier", courier.assign, courier.unassign),
    ]
    pipeline = Pipeline(
        [tracker.track(s) for s in steps],
        timeout=settings.request_timeout,
        compensation_timeout=settings.compensation_timeout,
        on_finish=reporter.finished,
        on_step=reporter.step_ended,
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


async def wait_for_signal() -> None:
    """Return on the first SIGTERM or SIGINT: hypercorn's graceful-shutdown trigger."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: draining", signal.Signals(signum).name)
            return


async def serve(
    assembly: Assembly,
    settings: Settings,
    *,
    listen_fd: int | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `assembly` until `shutdown_trigger` returns (default: SIGTERM or SIGINT), then drain.

    Draining: no new connections are accepted, `/readyz` answers 503, and
    orders in flight get `settings.shutdown_grace` seconds to finish (and
    compensate) before they are cancelled. Hypercorn logs each address it
    listens on ("Running on ...") and hands the list to `task_status`.
    """

    async def trigger() -> None:
        await (shutdown_trigger or wait_for_signal)()
        assembly.readiness.start_draining()

    await hypercorn_serve(
        assembly.app,
        hypercorn_config(settings, listen_fd),
        shutdown_trigger=trigger,
        task_status=task_status,
    )
