"""The composition root: build the services, the pipeline and the app, and serve them.

`serve` has hypercorn's shape: start it with `await nursery.start(serve, ...)`
and it hands back the addresses it really bound (port 0 becomes a real port).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable

import attrs
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve
from quart_trio import QuartTrio

from .http import create_app
from .orchestrator import Pipeline, Step
from .services import CourierPool, CourierService, PaymentService, StepTracker, VendorService

__all__ = ["Service", "Settings", "build_service", "hypercorn_config", "serve"]

log = logging.getLogger(__name__)

# Hypercorn has one timer for "headers not yet complete" and "idle between
# requests" (keep_alive_timeout, started at connect). We set it to the
# reference's 3 s header limit, so a slow-header client cannot hold a
# connection; idle keep-alive connections are closed after 3 s too.
HEADER_AND_IDLE_TIMEOUT_S = 3.0


@attrs.frozen
class Settings:
    """Everything an operator can set; the CLI fills it from flags."""

    host: str = "127.0.0.1"
    port: int = 8080
    request_timeout: float = 10.0
    compensation_timeout: float = 5.0
    courier_pool_size: int = 5


@attrs.frozen
class Service:
    """The assembled service: the app, plus the parts tests and operators observe."""

    app: QuartTrio
    pipeline: Pipeline
    pool: CourierPool
    tracker: StepTracker


def build_service(settings: Settings) -> Service:
    pool = CourierPool(settings.courier_pool_size)
    tracker = StepTracker()
    payment, vendor, courier = PaymentService(), VendorService(), CourierService(pool)
    steps = [
        Step("payment", payment.charge, payment.refund),
        Step("vendor", vendor.notify, vendor.cancel),
        Step("courier", courier.assign, courier.release),
    ]
    pipeline = Pipeline(
        [tracker.track(s) for s in steps],
        timeout=settings.request_timeout,
        compensation_timeout=settings.compensation_timeout,
    )
    return Service(create_app(pipeline), pipeline, pool, tracker)


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    config.keep_alive_timeout = HEADER_AND_IDLE_TIMEOUT_S
    # read_timeout would also run while an order is processed: leave it off.
    config.read_timeout = None
    # Let in-flight orders finish on shutdown: a full deadline, then their compensations.
    config.graceful_timeout = settings.request_timeout + settings.compensation_timeout + 1
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def wait_for_signal() -> None:
    """Return on the first SIGTERM or SIGINT: hypercorn's graceful-shutdown trigger."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


async def serve(
    service: Service,
    settings: Settings,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `service` until `shutdown_trigger` returns (default: SIGTERM or SIGINT).

    Hypercorn logs each address it listens on ("Running on ...") and hands the
    list to `task_status`, so a caller can bind port 0 and learn the real port.
    """
    await hypercorn_serve(
        service.app,
        hypercorn_config(settings),
        shutdown_trigger=shutdown_trigger or wait_for_signal,
        task_status=task_status,
    )
