"""The Quart-Trio app: `POST /order`, and JSON for every error.

Errors are answered here, at the transport boundary, as plain responses; no
exception group reaches Quart's error-handler lookup (which would miss it and
answer 500), and no traceback reaches a client.
"""

from __future__ import annotations

import logging
from typing import Final, Protocol

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..model import INTERNAL, ErrorInfo, OrderRequest, OrderResult, Reply
from ..serialization import InvalidOrder, dump_reply, parse_order
from .errors import KIND_BY_HTTP_STATUS, OUTCOMES, outcome_of

__all__ = ["MAX_BODY_BYTES", "OrderProcessor", "create_app"]

MAX_BODY_BYTES: Final = 64 * 1024
BODY_TIMEOUT_S: Final = 10

log = logging.getLogger(__name__)


class OrderProcessor(Protocol):
    """What the transport needs: something that turns an order into its result."""

    async def process(self, order: OrderRequest) -> OrderResult: ...


def _json(reply: Reply, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(dump_reply(reply), status, headers, content_type="application/json")


def error_response(
    kind: str,
    message: str | None = None,
    *,
    order_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    outcome = outcome_of(kind)
    error = ErrorInfo(kind, message or outcome.message)
    return _json(Reply("error", order_id, error=error), outcome.status, headers)


def result_response(result: OrderResult) -> Response:
    if result.kind is None:
        return _json(Reply("ok", result.order_id, result.steps), 200)
    outcome = outcome_of(result.kind)
    error = ErrorInfo(result.kind, outcome.message)
    return _json(Reply("error", result.order_id, result.steps, error), outcome.status)


def create_app(processor: OrderProcessor) -> QuartTrio:
    """Build the app around `processor`; the app itself holds no order state."""
    app = QuartTrio(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["BODY_TIMEOUT"] = BODY_TIMEOUT_S

    @app.post("/order", provide_automatic_options=False)
    async def order() -> Response:
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        try:
            parsed = parse_order(body)
        except InvalidOrder as exc:
            return error_response(exc.kind, exc.message, order_id=exc.order_id)
        return result_response(await processor.process(parsed))

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        kind = KIND_BY_HTTP_STATUS.get(status, "http_error")
        message = outcome_of(kind).message if kind in OUTCOMES else exc.name.lower()
        # Keep Werkzeug's headers (Allow on a 405) but not its HTML content type.
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return _json(Reply("error", error=ErrorInfo(kind, message)), status, headers)

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
        return error_response(INTERNAL)

    return app
