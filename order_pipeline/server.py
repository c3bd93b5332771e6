"""The composition root: build the services, the pipeline and the app, and serve them.

`serve` has hypercorn's shape: start it with `await nursery.start(serve, ...)`
and it hands back the addresses it really bound (port 0 becomes a real port).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from quart_trio import QuartTrio

from .http import create_app
from .http.asgi import finish_responses_shielded
from .http.errors import outcome_of
from .logs import log_order
from .metrics import Metrics
from .model import OrderResult
from .orchestrator import Pipeline, Step
from .serialization import converter
from .services import CourierPool, CourierService, PaymentService, StepTracker, VendorService
from .settings import Settings
from .supervisor import LISTEN_BACKLOG, LISTEN_FD_ENV, hard_deadline, supervise

__all__ = ["Service", "Settings", "build_service", "hypercorn_config", "run_server", "serve"]

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class Readiness:
    """Whether the server takes new orders; false from the moment it starts draining."""

    drain_started: trio.Event = attrs.field(factory=trio.Event)

    def is_ready(self) -> bool:
        return not self.drain_started.is_set()

    def start_draining(self) -> None:
        self.drain_started.set()


@attrs.frozen
class Service:
    """The assembled service: the app, plus the parts tests and operators observe."""

    app: QuartTrio
    pipeline: Pipeline
    pool: CourierPool
    tracker: StepTracker
    metrics: Metrics
    readiness: Readiness


def _order_fields(
    order_id: str | None, kind: str | None, http_status: int, duration_ms: int, steps: Any
) -> dict[str, Any]:
    """The fields of an order's log line, for orders run and orders refused alike."""
    return {
        "order_id": order_id,
        "status": "ok" if kind is None else "error",
        "kind": kind or "ok",
        "http_status": http_status,
        "duration_ms": duration_ms,
        "steps": [converter.unstructure(s) for s in steps],
    }


def build_service(settings: Settings | None = None) -> Service:
    settings = settings or Settings()
    metrics = Metrics()
    readiness = Readiness()
    pool = CourierPool(settings.courier_pool_size, settings.courier_queue_limit, metrics)
    tracker = StepTracker()
    metrics.read_live(lambda: tracker.in_flight, lambda: pool.in_use, lambda: pool.waiting)
    payment = PaymentService(settings.payment_delay_ms)
    vendor = VendorService(settings.vendor_delay_ms)
    courier = CourierService(pool, settings.courier_delay_ms)
    steps = [
        Step("payment", payment.charge, payment.refund),
        Step("vendor", vendor.notify, vendor.cancel),
        Step("courier", courier.assign, courier.release),
    ]

    def finished(result: OrderResult) -> None:
        status = 200 if result.kind is None else outcome_of(result.kind).status
        log_order(
            _order_fields(result.order_id, result.kind, status, result.duration_ms, result.steps)
        )
        metrics.observe_order(result, status)

    def rejected(kind: str, status: int, order_id: str | None) -> None:
        log_order(_order_fields(order_id, kind, status, 0, ()))
        metrics.count_order(kind, status)

    pipeline = Pipeline(
        [tracker.track(s) for s in steps],
        timeout=settings.request_timeout,
        compensation_timeout=settings.compensation_timeout,
        on_finish=finished,
    )
    app = create_app(
        pipeline, is_ready=readiness.is_ready, metrics=metrics.exposition, on_rejected=rejected
    )
    return Service(app, pipeline, pool, tracker, metrics, readiness)


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    listen_fd = os.environ.get(LISTEN_FD_ENV)
    # A worker of the supervisor serves the socket it inherited.
    config.bind = [f"fd://{listen_fd}"] if listen_fd else [f"{settings.host}:{settings.port}"]
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
    service: Service,
    settings: Settings,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `service` until `shutdown_trigger` returns (default: SIGTERM or SIGINT), then drain.

    Draining: no new connections are accepted, `/readyz` answers 503, and
    orders in flight get `settings.shutdown_grace` seconds to finish (and
    compensate) before they are cancelled. Hypercorn logs each address it
    listens on ("Running on ...") and hands the list to `task_status`.
    """

    async def trigger() -> None:
        await (shutdown_trigger or wait_for_signal)()
        service.readiness.start_draining()

    await hypercorn_serve(
        finish_responses_shielded(service.app),
        hypercorn_config(settings),
        shutdown_trigger=trigger,
        task_status=task_status,
    )


# Young-generation collections per allocation: CPython's default (700) makes the
# collector run every few requests; see docs/performance.md for what this bought.
GC_THRESHOLDS: Final = (50_000, 20, 100)


def tune_garbage_collector() -> None:
    """Freeze what start-up built (modules, the app) out of the collector's way; collect less."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def run_server(settings: Settings) -> None:
    """The process's main: supervise workers, or serve here and exit at a hard deadline."""
    if settings.workers > 1:
        await supervise(settings)
        return
    service = build_service(settings)
    tune_garbage_collector()
    async with trio.open_nursery() as nursery:

        async def exit_at_hard_deadline() -> None:
            await service.readiness.drain_started.wait()
            await trio.sleep(hard_deadline(settings))
            log.error("drain did not finish by its hard deadline: exiting")
            os._exit(1)

        nursery.start_soon(exit_at_hard_deadline)
        if service.metrics.multiprocess:
            nursery.start_soon(service.metrics.refresh_live_forever)
        await serve(service, settings)
        nursery.cancel_scope.cancel()
