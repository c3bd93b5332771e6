"""An ASGI wrapper that lets hypercorn finish each response, whatever Quart-Trio cancels.

Hypercorn runs its end-of-response bookkeeping (close the connection on
`Connection: close`, or start the keep-alive idle timer) inside the app's
final `send`. Quart-Trio cancels its request nursery as soon as hypercorn
reports the stream closed, which happens during that same `send`, so the
bookkeeping was cut short: connections were never closed and never timed out
(found by tests/test_connections.py). Shielding the final `send` lets it
complete; hypercorn already shields its socket writes, so this adds no new way
to block.
"""

from __future__ import annotations

from typing import Any

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope

__all__ = ["finish_responses_shielded"]


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
