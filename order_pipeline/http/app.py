"""The Quart-Trio app: `POST /order`, health, readiness, metrics, OpenAPI, and JSON for every error.

Errors are answered here, at the transport boundary, as plain responses; no
exception group reaches Quart's error-handler lookup (which would miss it and
answer 500), and no traceback reaches a client.
"""

from __future__ import annotations

import importlib.resources
import logging
from collections.abc import Callable
from typing import Final, Protocol

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..model import INTERNAL, ErrorInfo, OrderRequest, OrderResult, Reply
from ..serialization import InvalidOrder, dump_reply, parse_order
from .asgi import with_request_ids
from .errors import KIND_BY_HTTP_STATUS, OUTCOMES, outcome_of

__all__ = ["MAX_BODY_BYTES", "OrderProcessor", "create_app"]

MAX_BODY_BYTES: Final = 64 * 1024
BODY_TIMEOUT_S: Final = 10

log = logging.getLogger(__name__)

OnRejected = Callable[[str, int, "str | None"], None]
"""Hears an order refused before it ran: (kind, HTTP status, order_id if readable)."""


class OrderProcessor(Protocol):
    """What the transport needs: something that turns an order into its result."""

    async def process(self, order: OrderRequest) -> OrderResult: ...


def _json(body: bytes, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status, headers, content_type="application/json")


def _reply(reply: Reply, status: int, headers: dict[str, str] | None = None) -> Response:
    if status == 503:
        headers = {**(headers or {}), "Retry-After": "1"}
    return _json(dump_reply(reply), status, headers)


def error_response(
    kind: str, message: str | None = None, *, order_id: str | None = None
) -> Response:
    outcome = outcome_of(kind)
    error = ErrorInfo(kind, message or outcome.message)
    return _reply(Reply("error", order_id, error=error), outcome.status)


def result_response(result: OrderResult) -> Response:
    if result.kind is None:
        return _reply(Reply("ok", result.order_id, result.steps), 200)
    outcome = outcome_of(result.kind)
    error = ErrorInfo(result.kind, outcome.message)
    return _reply(Reply("error", result.order_id, result.steps, error), outcome.status)


def _openapi_document() -> bytes:
    return importlib.resources.files(__package__).joinpath("openapi.json").read_bytes()


def _no_rejections(kind: str, status: int, order_id: str | None) -> None:
    pass


def create_app(
    processor: OrderProcessor,
    *,
    is_ready: Callable[[], bool] = lambda: True,
    metrics: Callable[[], tuple[bytes, str]] | None = None,
    on_rejected: OnRejected = _no_rejections,
) -> QuartTrio:
    """Build the app around `processor`; the app itself holds no order state.

    `is_ready` answers `/readyz` (False while draining); `metrics` renders
    `/metrics`; `on_rejected` hears each order refused before it ran.
    """
    app = QuartTrio(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["BODY_TIMEOUT"] = BODY_TIMEOUT_S
    # Quart's documented way to add ASGI middleware; its test client goes through it too.
    app.asgi_app = with_request_ids(app.asgi_app)  # type: ignore[method-assign]
    openapi = _openapi_document()

    @app.post("/order", provide_automatic_options=False)
    async def order() -> Response:
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        try:
            parsed = parse_order(body)
        except InvalidOrder as exc:
            on_rejected(exc.kind, outcome_of(exc.kind).status, exc.order_id)
            return error_response(exc.kind, exc.message, order_id=exc.order_id)
        return result_response(await processor.process(parsed))

    @app.get("/healthz", provide_automatic_options=False)
    async def healthz() -> Response:
        return _json(b'{"status":"ok"}', 200)

    @app.get("/readyz", provide_automatic_options=False)
    async def readyz() -> Response:
        if is_ready():
            return _json(b'{"status":"ready"}', 200)
        return _json(b'{"status":"draining"}', 503, {"Retry-After": "1"})

    @app.get("/metrics", provide_automatic_options=False)
    async def metrics_text() -> Response:
        if metrics is None:
            return error_response("not_found")
        body, content_type = metrics()
        return Response(body, 200, content_type=content_type)

    @app.get("/openapi.json", provide_automatic_options=False)
    async def openapi_json() -> Response:
        return _json(openapi, 200)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        kind = KIND_BY_HTTP_STATUS.get(status, "http_error")
        message = outcome_of(kind).message if kind in OUTCOMES else exc.name.lower()
        if request.path == "/order" and request.method == "POST":
            on_rejected(kind, status, None)
        # Keep Werkzeug's headers (Allow on a 405) but not its HTML content type.
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return _reply(Reply("error", error=ErrorInfo(kind, message)), status, headers)

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
        return error_response(INTERNAL)

    return app
