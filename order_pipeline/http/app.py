"""The Quart-Trio app: `POST /order`, `GET /order/{key}`, health, readiness, metrics, OpenAPI,
and JSON for every error.

Errors are answered here, at the transport boundary, as plain responses; no
exception group reaches Quart's error-handler lookup (which would miss it and
answer 500), and no traceback reaches a client.
"""

from __future__ import annotations

import importlib.resources
import logging
import re
from collections.abc import Callable
from typing import Final, Protocol
from urllib.parse import quote

from quart import Response, has_request_context, request
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from ..desk import Answer, OnRefused
from ..kinds import (
    BAD_REQUEST,
    HTTP_ERROR,
    INTERNAL,
    NOT_FOUND,
    UNSUPPORTED_MEDIA_TYPE,
    kind_of_status,
    lookup,
)
from ..model import OrderRequest
from ..serialization import InvalidOrder, encode_error, parse_order
from .asgi import (
    closing_after_ambiguous_framing,
    finish_responses_shielded,
    refusing_targets_not_served,
    with_request_ids,
)

__all__ = ["IDEMPOTENCY_KEY", "MAX_BODY_BYTES", "OrderDesk", "create_app"]

MAX_BODY_BYTES: Final = 64 * 1024
BODY_TIMEOUT_S: Final = 10
# Too large, or too slow to arrive: the body was not read to its end, so hypercorn closes
# the connection after the reply.
_BODY_UNREAD: Final = (413, 408)
IDEMPOTENCY_KEY: Final = "Idempotency-Key"
_VALID_KEY: Final = re.compile(r"[A-Za-z0-9._~:-]{1,255}")
# What `quote` leaves alone (RFC 3986's unreserved characters).
_PLAIN_SEGMENT: Final = re.compile(r"[A-Za-z0-9._~-]+")
BAD_KEY: Final = f"{IDEMPOTENCY_KEY} must be 1 to 255 characters of A-Z a-z 0-9 . _ ~ : -"
KEY_TWICE: Final = f"{IDEMPOTENCY_KEY} must be given once"

log = logging.getLogger(__name__)


class OrderDesk(Protocol):
    """What the transport needs: something that runs an order under a key, and looks one up."""

    async def submit(self, order: OrderRequest, key: str | None) -> Answer: ...

    async def look_up(self, key: str) -> Answer: ...


def _json(body: bytes, status: int, headers: Headers | dict[str, str] | None = None) -> Response:
    return Response(body, status, headers, content_type="application/json")


RETRY_AFTER: Final = {"Retry-After": "1"}


def error_response(
    kind: str, message: str | None = None, *, order_id: str | None = None
) -> Response:
    status, body = encode_error(kind, message, order_id=order_id)
    return _json(body, status, RETRY_AFTER if lookup(kind).retry_after else None)


def answer_response(answer: Answer) -> Response:
    # Headers of our own, which the response takes as they are: a dict it would copy through
    # Werkzeug's general `extend` (8,000 instructions a request).
    headers = Headers()
    if answer.retry_after:
        headers.update(RETRY_AFTER)
    if answer.key is not None:
        headers.add("Content-Location", "/order/" + _path_segment(answer.key))
    if answer.replayed:
        headers.add("Idempotent-Replayed", "true")
    return _json(answer.body, answer.status, headers)


def _plain(content_encodings: list[str]) -> bool:
    """Whether a body with these Content-Encoding lines is as sent: none, or only identity."""
    return all(
        coding.strip().lower() in ("", "identity")
        for line in content_encodings
        for coding in line.split(",")
    )


def _path_segment(key: str) -> str:
    """`key` as one path segment; `.` and `..` percent-encoded, which clients would resolve."""
    if key in (".", ".."):
        return key.replace(".", "%2E")
    if _PLAIN_SEGMENT.fullmatch(key):  # every server-made key: quote would return it as it is
        return key
    return quote(key, safe="")


def _openapi_document() -> bytes:
    return importlib.resources.files(__package__).joinpath("openapi.json").read_bytes()


def _no_refusals(kind: str, status: int, order_id: str | None, reason: str) -> None:
    pass


def create_app(
    desk: OrderDesk,
    *,
    is_ready: Callable[[], bool] = lambda: True,
    metrics: Callable[[], tuple[bytes, str]] | None = None,
    on_refused: OnRefused = _no_refusals,
) -> QuartTrio:
    """Build the app around `desk`; the app itself holds no order state.

    `is_ready` answers `/readyz` (False while draining); `metrics` renders
    `/metrics`; `on_refused` hears each order refused before it ran. The app
    is complete as returned: the ASGI middleware is installed, so tests
    exercise exactly what hypercorn serves.
    """
    app = QuartTrio(__name__, static_folder=None)
    # Werkzeug redirects a path with "//" (308, HTML, to a URL built from the Host header):
    # here it is a path no route takes, a JSON 404.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    app.config["BODY_TIMEOUT"] = BODY_TIMEOUT_S
    # Quart's documented way to add ASGI middleware; its test client goes through it too.
    app.asgi_app = finish_responses_shielded(  # type: ignore[method-assign] # Quart types it as a method
        with_request_ids(refusing_targets_not_served(closing_after_ambiguous_framing(app.asgi_app)))
    )
    openapi = _openapi_document()

    @app.post("/order", provide_automatic_options=False)
    async def order() -> Response:
        body = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        if not _plain(request.headers.getlist("Content-Encoding")):
            # Compressed (or so it says): read as JSON, it would be refused as not JSON, or,
            # if it were JSON after all, run although the client meant other bytes.
            unsupported = lookup(UNSUPPORTED_MEDIA_TYPE)
            on_refused(UNSUPPORTED_MEDIA_TYPE, unsupported.status, None, unsupported.message)
            refusal = error_response(UNSUPPORTED_MEDIA_TYPE)
            refusal.headers["Accept-Encoding"] = "identity"  # RFC 9110 §15.5.16
            return refusal
        keys = request.headers.getlist(IDEMPOTENCY_KEY)
        key = keys[0] if keys else None
        # Two lines mean "a, b" (RFC 9110), which is not one key: a proxy might take the other.
        if len(keys) > 1 or (key is not None and not _VALID_KEY.fullmatch(key)):
            why = KEY_TWICE if len(keys) > 1 else BAD_KEY
            on_refused(BAD_REQUEST, lookup(BAD_REQUEST).status, None, why)
            return error_response(BAD_REQUEST, why)
        try:
            parsed = parse_order(body)
        except InvalidOrder as exc:
            on_refused(exc.kind, lookup(exc.kind).status, exc.order_id, exc.message)
            return error_response(exc.kind, exc.message, order_id=exc.order_id)
        return answer_response(await desk.submit(parsed, key))

    @app.get("/order/<key>", provide_automatic_options=False)
    async def order_status(key: str) -> Response:
        # Every key an order holds is an Idempotency-Key (a server-made one too: hex), so any
        # other is unknown without asking the store, which may not take it (a NUL: PostgreSQL).
        if not _VALID_KEY.fullmatch(key):
            return error_response(NOT_FOUND, "no order with this key")
        return answer_response(await desk.look_up(key))

    @app.get("/healthz", provide_automatic_options=False)
    async def healthz() -> Response:
        return _json(b'{"status":"ok"}', 200)

    @app.get("/readyz", provide_automatic_options=False)
    async def readyz() -> Response:
        if is_ready():
            return _json(b'{"status":"ready"}', 200)
        return _json(b'{"status":"draining"}', 503, RETRY_AFTER)

    @app.get("/metrics", provide_automatic_options=False)
    async def metrics_text() -> Response:
        if metrics is None:
            return error_response(NOT_FOUND)
        body, content_type = metrics()
        return Response(body, 200, content_type=content_type)

    @app.get("/openapi.json", provide_automatic_options=False)
    async def openapi_json() -> Response:
        return _json(openapi, 200)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        kind = kind_of_status(status)
        message = exc.name.lower() if kind == HTTP_ERROR else lookup(kind).message
        # A WebSocket handshake has no request context (no route takes one: a 404 here).
        in_request = has_request_context()
        if in_request and request.path == "/order" and request.method == "POST":
            on_refused(kind, status, None, message)
        # Keep Werkzeug's headers (Allow on a 405) but not its HTML content type.
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        if status in _BODY_UNREAD and in_request and request.http_version.startswith("1."):
            headers["Connection"] = "close"  # hypercorn closes it: say so (RFC 9110 §15.5.9)
        _, body = encode_error(kind, message)  # the status is the framework's own
        return _json(body, status, headers)

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        where = f"{request.method} {request.path}" if has_request_context() else "a WebSocket"
        log.error("unhandled error in %s", where, exc_info=exc)
        return error_response(INTERNAL)

    return app
