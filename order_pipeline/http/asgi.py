"""ASGI middleware: request IDs, and letting hypercorn finish each response.

`with_request_ids` gives every request an ID (the client's plain `X-Request-ID`,
or a fresh one), puts it in the `request_id` context variable for the logs, and
echoes it on every response, errors Quart answers itself included. It replaced
Quart `before_request` / `after_request` hooks, which cost more per request
(docs/performance.md).

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
import uuid
from typing import Any, Final

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    ASGISendEvent,
    HTTPScope,
    Scope,
)

from ..logs import request_id

__all__ = ["REQUEST_ID_HEADER", "finish_responses_shielded", "with_request_ids"]

REQUEST_ID_HEADER: Final = b"x-request-id"
# A client's request ID is echoed only if it is short and plain; otherwise we make one.
_VALID_REQUEST_ID: Final = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")


def _request_id_of(scope: HTTPScope) -> bytes:
    for name, value in scope["headers"]:  # ASGI header names are lower-case
        if name == REQUEST_ID_HEADER:
            if _VALID_REQUEST_ID.fullmatch(value):
                return bytes(value)
            break
    return uuid.uuid4().hex.encode()


def with_request_ids(app: Any) -> Any:
    """Wrap an ASGI app so each HTTP request has an ID, in the logs and on the response."""

    async def wrapped(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        given = _request_id_of(scope)
        request_id.set(given.decode("ascii"))
        header = (REQUEST_ID_HEADER, given)

        async def send_with_id(message: ASGISendEvent) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], header]}
            await send(message)

        await app(scope, receive, send_with_id)

    return wrapped


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
