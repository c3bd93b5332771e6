"""ASGI middleware: request IDs, the caller's trace, letting hypercorn finish each response,
and closing a connection whose request was framed two ways.

`with_request_ids` gives every request an ID (the client's plain `X-Request-ID`,
or a fresh one), puts it in the `request_id` context variable for the logs, and
echoes it on every response, errors Quart answers itself included. It replaced
Quart `before_request` / `after_request` hooks, which cost more per request
(docs/performance.md). A W3C `traceparent` header (with its `tracestate`)
becomes the OpenTelemetry context of the request's task, which Trio copies into
every task the request starts: the order's span continues the caller's trace.

`refusing_targets_not_served` answers 400 to a request whose target is neither a path nor
an http(s) URI (RFC 9112 §3.2), nor `*` for OPTIONS, before Quart makes a path of it (nor
one whose authority Quart's parse would fail on).

`finish_responses_shielded`: hypercorn runs its end-of-response bookkeeping
(close the connection on `Connection: close`, or start the keep-alive idle
timer) inside the app's final `send`. Quart-Trio cancels its request nursery as
soon as hypercorn reports the stream closed, which happens during that same
`send`, so the bookkeeping was cut short: connections were never closed and
never timed out (found by tests/test_connections.py). Shielding the final `send`
lets it complete; hypercorn already shields its socket writes, so this adds no
new way to block.
"""

from __future__ import annotations

import re
from typing import Any, Final
from urllib.parse import urlsplit

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    HTTPScope,
    Scope,
)
from opentelemetry import context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..kinds import BAD_REQUEST
from ..logs import request_id
from ..model import new_id
from ..serialization import encode_error

__all__ = [
    "REQUEST_ID_HEADER",
    "TRACEPARENT_HEADER",
    "closing_after_ambiguous_framing",
    "finish_responses_shielded",
    "refusing_targets_not_served",
    "with_request_ids",
]

REQUEST_ID_HEADER: Final = b"x-request-id"
TRACEPARENT_HEADER: Final = b"traceparent"
TRACESTATE_HEADER: Final = b"tracestate"
_CONNECTION_CLOSE: Final = (b"connection", b"close")
# A client's request ID is echoed only if it is short and plain; otherwise we make one.
_VALID_REQUEST_ID: Final = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")
# The propagator's own limits on both headers; longer ones are ignored here, before it
# would log a warning for each such request.
_TRACE_HEADER_MAX: Final = 512
_TRACE_CONTEXT: Final = TraceContextTextMapPropagator()
# A target served besides a path (origin-form, RFC 9112 §3.2): an http or https URI
# (absolute-form, which a server must accept: Quart drops its scheme and authority), with a
# host (RFC 9110 §4.2.1: one without is invalid). `*` (asterisk-form) is OPTIONS's alone
# (`_served`).
_ABSOLUTE_TARGET: Final = re.compile(rb"https?://[^/?#]", re.IGNORECASE)
TARGET_NOT_SERVED: Final = "the request target must be a path (/...) or an http or https URI"


def _ids_of(scope: HTTPScope) -> tuple[bytes, dict[str, list[str]] | None]:
    """The request's ID, and its W3C trace-context headers if it has one traceparent: the
    propagator would continue the first of two, which name no one parent."""
    given: bytes | None = None
    carrier: dict[str, list[str]] | None = None
    parents = 0
    for name, value in scope["headers"]:  # ASGI header names are lower-case
        if name == REQUEST_ID_HEADER:
            if given is None:  # the first one decides
                given = bytes(value) if _VALID_REQUEST_ID.fullmatch(value) else b""
        elif name == TRACEPARENT_HEADER:
            parents += 1  # counted however long: two are no parent (test_traceparent_duplicated)
            if len(value) <= _TRACE_HEADER_MAX:
                carrier = carrier or {}
                carrier.setdefault("traceparent", []).append(value.decode("latin-1"))
        elif name == TRACESTATE_HEADER and len(value) <= _TRACE_HEADER_MAX:
            carrier = carrier or {}
            carrier.setdefault("tracestate", []).append(value.decode("latin-1"))
    if carrier is not None:
        if parents != 1 or "traceparent" not in carrier:
            carrier = None  # no one parent to continue
        elif sum(len(v) + 1 for v in carrier.get("tracestate", ())) > _TRACE_HEADER_MAX + 1:
            del carrier["tracestate"]  # too long in all: the parent without it
    return given or new_id().encode(), carrier


def with_request_ids(app: Any) -> Any:
    """Wrap an ASGI app so each HTTP request has an ID, in the logs and on the response."""

    async def wrapped(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        given, carrier = _ids_of(scope)
        request_id.set(given.decode("ascii"))
        header = (REQUEST_ID_HEADER, given)

        async def send_with_id(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], header]}
            await send(message)

        if carrier is None:
            await app(scope, receive, send_with_id)
            return
        token = context.attach(_TRACE_CONTEXT.extract(carrier, context.get_current()))
        try:
            await app(scope, receive, send_with_id)
        finally:
            context.detach(token)

    return wrapped


def refusing_targets_not_served(app: Any) -> Any:
    """Wrap an ASGI app so a request whose target is neither a path nor an http(s) URI (nor
    `*` for OPTIONS) gets a 400 `bad_request`, its connection closed after it (HTTP/1.1).
    Quart made a path of any target: `healthz` (no leading slash) was served as `/healthz`,
    `ftp://t/order` ran an order, a resource of no scheme this server serves, and `GET *`
    was a 404, though `*` is a target of OPTIONS alone (RFC 9112 §3.2.4). An http(s) URI
    whose authority does not parse (`http://[::1/order`) is none either (`_splits`)."""
    status, body = encode_error(BAD_REQUEST, TARGET_NOT_SERVED)

    async def wrapped(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http" or _served(scope):
            await app(scope, receive, send)
            return
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        if scope["http_version"].startswith("1."):
            headers.append(_CONNECTION_CLOSE)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return wrapped


def _served(scope: HTTPScope) -> bool:
    target = scope.get("raw_path")  # bytes from hypercorn; None from some other servers
    if target == b"*":  # asterisk-form: OPTIONS's alone (RFC 9112 §3.2.4); no route, a 404
        return scope["method"] == "OPTIONS" and not scope["query_string"]
    if target is None or target.startswith(b"/"):  # origin-form
        return True
    return _ABSOLUTE_TARGET.match(target) is not None and _splits(scope["path"])


def _splits(uri: str) -> bool:
    """Whether Quart can take `uri`, an absolute-form target as hypercorn decoded it, to its
    path: its `urlsplit` refuses an authority with a `[` not closed (or a `]` not opened), a
    bracketed host that is no IP address, or one that NFKC normalization gives a delimiter
    (`%EF%BC%9F`, a fullwidth `?`). Quart's ValueError was a 500, with an error line and its
    traceback."""
    try:
        urlsplit(uri)
    except ValueError:
        return False
    return True


def closing_after_ambiguous_framing(app: Any) -> Any:
    """Wrap an ASGI app so a request with both Transfer-Encoding and Content-Length has its
    connection closed after the response (RFC 9112 §6.1). h11 reads such a body by its
    chunks; a proxy in front that framed it by its length would take the rest for a next
    request of its own (request smuggling), which a closed connection never reads."""

    async def wrapped(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http" or not _framed_two_ways(scope):
            await app(scope, receive, send)
            return

        async def send_closing(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], _CONNECTION_CLOSE]}
            await send(message)

        await app(scope, receive, send_closing)

    return wrapped


def _framed_two_ways(scope: HTTPScope) -> bool:
    if not scope["http_version"].startswith("1."):  # HTTP/2 frames bodies itself
        return False
    names = {name for name, _ in scope["headers"]}
    return b"transfer-encoding" in names and b"content-length" in names


def finish_responses_shielded(app: Any) -> Any:
    """Wrap an ASGI app so the last `http.response.body` send cannot be cancelled."""

    async def wrapped(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        async def send_finishing(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                with trio.CancelScope(shield=True):
                    await send(message)
            else:
                await send(message)

        await app(scope, receive, send_finishing)

    return wrapped
