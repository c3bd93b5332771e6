"""The two floors the service is measured against, served with the service's own hypercorn settings.

- `bare`: a plain ASGI app answering `POST /order` with a fixed body as large as a
  real answer (the server's floor);
- `quart`: a Quart-Trio endpoint that reads and parses the request like the service,
  then returns the same fixed body (the framework's floor).

`--sleep-ms 200` makes either wait that long before answering, as an order's
critical path does in S2: the floors' own latency above 200 ms under S2's load
is what the stack costs there, before any orchestration.

Usage: python benchmarks/floors.py bare|quart [--port 0] [--sleep-ms 0]. Prints
hypercorn's "Running on ..." line like the service does.
"""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import trio
from quart import Response, request
from quart_trio import QuartTrio

from order_pipeline.http.asgi import finish_responses_shielded
from order_pipeline.server import hypercorn_config
from order_pipeline.settings import Settings


async def wait_for_signal() -> None:
    """Return on the first SIGTERM or SIGINT, as the service's own drain begins."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


# The size of the service's 200 answer to a typical order.
ANSWER = (
    b'{"status":"ok","order_id":"bench-000001","steps":[{"name":"payment","status":"ok",'
    b'"duration_ms":1},{"name":"vendor","status":"ok","duration_ms":1},{"name":"courier",'
    b'"status":"ok","duration_ms":1}]}'
)
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def bare_app(sleep_s: float = 0) -> ASGIApp:
    async def bare(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        more = True
        while more:  # read the whole body, as any server must
            message = await receive()
            more = message.get("more_body", False)
        if sleep_s:
            await trio.sleep(sleep_s)
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": ANSWER})

    return bare


def quart_app(sleep_s: float = 0) -> QuartTrio:
    app = QuartTrio(__name__, static_folder=None)

    @app.post("/order", provide_automatic_options=False)
    async def order() -> Response:
        orjson.loads(await request.get_data(cache=False, as_text=False, parse_form_data=False))
        if sleep_s:
            await trio.sleep(sleep_s)
        return Response(ANSWER, 200, content_type="application/json")

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("floor", choices=["bare", "quart"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--sleep-ms", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = hypercorn_config(Settings(port=args.port, access_log=False))
    sleep_s = args.sleep_ms / 1000
    if args.floor == "bare":
        app = bare_app(sleep_s)
    else:
        app = finish_responses_shielded(quart_app(sleep_s))
    from hypercorn.trio import serve

    trio.run(lambda: serve(app, config, shutdown_trigger=wait_for_signal))


if __name__ == "__main__":
    main()
