"""An asyncio rewrite of `POST /order`, the comparison point of the load benchmark.

FastAPI on uvicorn: an `asyncio.TaskGroup` per order for the three steps inside
`asyncio.timeout` (the 10 s deadline), the first failing step cancelling its
siblings, an `asyncio.Semaphore` as the courier pool, and the steps that had
succeeded compensated when the order fails (each within `asyncio.timeout(5)`,
run as a task the order's cancellation cannot reach). The same defaults, the
same body validation essentials, the same kinds, statuses and reply shape as
the service, so that wrk's order.lua and benchmarks/slot_after_disconnect.py
drive both alike. What it leaves out, on purpose: no store (compare it with the
service's `--store memory`), no Idempotency-Key, no metrics, no log line per
order, no `GET /order/{key}`, no courier queue limit, no duplicate-key check.

It is written as such a rewrite usually is: uvicorn does not cancel a handler
whose client has gone, so neither does this one, and an order whose client
disconnected runs on to its end (holding its courier slot). `--cancel-on-disconnect`
adds what the service does instead: a task waiting for `http.disconnect` that
cancels the order.

`--workers N` forks N uvicorn workers on one listening socket, as `uvicorn --workers N`
does (with the socket made so that TCP_NODELAY holds: see `bound`). asyncio accepts
every pending connection on each wake-up, so a burst of keep-alive connections (wrk's)
may all land on one worker; `--reuseport` gives each worker its own SO_REUSEPORT
socket instead, and the kernel spreads them.

FastAPI rather than bare Starlette because that is what such a rewrite is written in,
and what the comparison should charge for; its one endpoint takes the raw `Request`
and validates the body by hand like the service's converter does, since a pydantic
model would answer 422 (not 400) and coerce `"12"`, `true` or `1.0` into an amount.

Requirements, bench-only (not the package's; the nox `loadtest` session installs
them): fastapi>=0.110 and uvicorn>=0.29 (run with fastapi 0.165.0, starlette 1.10.0,
uvicorn 0.54.0 on Python 3.11.7). Plain uvicorn: h11 and the standard asyncio loop,
as hypercorn uses h11 (uvicorn[standard] would bring httptools and uvloop). orjson
is the package's already. Python 3.11 or newer (TaskGroup, asyncio.timeout); Linux
(`--workers N` forks; `--reuseport` relies on Linux's SO_REUSEPORT balancing).

Usage: python benchmarks/asyncio_service.py [--port 0] [--workers 1]
           [--courier-pool-size 5] [--payment-delay-ms 150] [--vendor-delay-ms 200]
           [--courier-delay-ms 100] [--cancel-on-disconnect] [--reuseport]
Prints `Running on http://127.0.0.1:PORT (...)` once every worker accepts
connections, and exits 0 on SIGTERM or SIGINT after the requests in flight end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import select
import signal
import socket
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

HOST: Final = "127.0.0.1"
BACKLOG: Final = 4096  # the service's LISTEN_BACKLOG
STEP_NAMES: Final = ("payment", "vendor", "courier")
FIELDS: Final = frozenset(
    {"order_id", "amount", "fail_step", "delay_ms", "fail_compensation", "compensation_delay_ms"}
)
ORDER_ID_MAX_CHARS: Final = 128
MAX_DELAY_MS: Final = 600_000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_BODY: Final = 64 * 1024
DEADLINE_S: Final = 10.0
COMPENSATION_DEADLINE_S: Final = 5.0
COMPENSATION_DELAYS_MS: Final = {"payment": 80, "vendor": 50, "courier": 30}

# kind: (HTTP status, message, Retry-After) -- the service's kinds.py, the ones used here.
KINDS: Final[dict[str, tuple[int, str, bool]]] = {
    "payment_declined": (400, "order failed", False),
    "vendor_unavailable": (503, "order failed", True),
    "no_courier": (503, "order failed", True),
    "timeout": (504, "order did not complete before its deadline", False),
    "canceled": (408, "order was canceled", False),
    "internal": (500, "internal error", False),
    "compensation_failed": (500, "order failed and could not be fully undone", False),
    "bad_request": (400, "bad request", False),
    "not_found": (404, "no such endpoint", False),
    "method_not_allowed": (405, "method not allowed", False),
    "payload_too_large": (413, "request body too large", False),
    "unsupported_media_type": (
        415,
        "request body's Content-Encoding is not supported: send it uncompressed",
        False,
    ),
    "http_error": (500, "http error", False),
}
STEP_KINDS: Final = {"payment": "payment_declined", "vendor": "vendor_unavailable",
                     "courier": "no_courier"}  # fmt: skip


class Invalid(ValueError):
    def __init__(self, message: str, order_id: str | None = None) -> None:
        super().__init__(message)
        self.message, self.order_id = message, order_id


class StepError(Exception):
    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class _StepFailed(Exception):
    """Raised out of a step's task so that its TaskGroup cancels the siblings."""


class Order:
    __slots__ = ("amount", "compensation_delay_ms", "delay_ms", "fail_compensation",
                 "fail_step", "order_id")  # fmt: skip

    def __init__(self, doc: dict[str, Any]) -> None:
        self.order_id: str = doc["order_id"]
        self.amount: int = doc.get("amount", 0)
        self.fail_step: str | None = doc.get("fail_step")
        self.fail_compensation: str | None = doc.get("fail_compensation")
        self.delay_ms: dict[str, int] = doc.get("delay_ms", {})
        self.compensation_delay_ms: dict[str, int] = doc.get("compensation_delay_ms", {})


def _order_id_fault(value: Any) -> str | None:
    if type(value) is not str:
        return "must be a string"
    if not value.strip():
        return "must not be blank"
    if len(value) > ORDER_ID_MAX_CHARS:
        return f"must be at most {ORDER_ID_MAX_CHARS} characters"
    return None


def _integer_fault(value: Any, low: int, high: int) -> str | None:
    if type(value) is not int or not low <= value <= high:  # bool, float and "12" are refused
        return f"must be an integer from {low} to {high}"
    return None


def parse_order(body: bytes) -> Order:
    """A valid order from the body, or `Invalid` naming the first fault and where it is."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Invalid(f"body is not valid JSON: {exc}") from None
    if type(doc) is not dict:
        raise Invalid("body must be a JSON object")
    doc = {key: value for key, value in doc.items() if value is not None}  # null is absent
    order_id = doc.get("order_id")
    readable = order_id if _order_id_fault(order_id) is None else None
    if unknown := doc.keys() - FIELDS:
        raise Invalid(f"unknown field(s): {', '.join(sorted(map(repr, unknown)))} @ $", readable)
    if order_id is None:
        raise Invalid("required field missing @ $.order_id")
    if fault := _order_id_fault(order_id):
        raise Invalid(f"{fault} @ $.order_id")
    if "amount" in doc and (fault := _integer_fault(doc["amount"], INT64_MIN, INT64_MAX)):
        raise Invalid(f"{fault} @ $.amount", readable)
    for field in ("fail_step", "fail_compensation"):
        if field in doc and doc[field] not in STEP_NAMES:
            raise Invalid(f"must be one of {', '.join(STEP_NAMES)} @ $.{field}", readable)
    for field in ("delay_ms", "compensation_delay_ms"):
        delays = doc.get(field, {})
        if type(delays) is not dict:
            raise Invalid(f"must be an object @ $.{field}", readable)
        for step, value in delays.items():
            if step not in STEP_NAMES:
                fault = f"must be one of {', '.join(STEP_NAMES)}"
                raise Invalid(f"{fault} @ $.{field}[{step!r}]", readable)
            if fault := _integer_fault(value, 0, MAX_DELAY_MS):
                raise Invalid(f"{fault} @ $.{field}[{step!r}]", readable)
    return Order(doc)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


class Services:
    """The three simulated steps and their compensations, over one courier pool."""

    def __init__(self, pool_size: int, payment_ms: int, vendor_ms: int, courier_ms: int) -> None:
        self.pool = asyncio.Semaphore(pool_size)
        self.delays_ms = {"payment": payment_ms, "vendor": vendor_ms, "courier": courier_ms}

    async def _sleep(self, order: Order, step: str) -> None:
        delay = order.delay_ms.get(step, self.delays_ms[step])
        if delay:
            await asyncio.sleep(delay / 1000)

    async def run(self, order: Order, step: str) -> None:
        if step == "courier":
            async with self.pool:  # the delay runs while holding a courier slot
                await self._sleep(order, step)
        else:
            await self._sleep(order, step)
        if order.fail_step == step or (step == "payment" and order.amount <= 0):
            raise StepError(STEP_KINDS[step])

    async def undo(self, order: Order, step: str) -> None:
        delay = order.compensation_delay_ms.get(step, COMPENSATION_DELAYS_MS[step])
        if delay:
            await asyncio.sleep(delay / 1000)
        if order.fail_compensation == step:
            raise StepError(f"{step}_compensation_failed")


class OrderRun:
    """One order's steps: results in the order payment, vendor, courier."""

    def __init__(self, services: Services, order: Order) -> None:
        self.services, self.order = services, order
        self.results: list[dict[str, Any]] = [
            {"name": name, "status": "canceled", "duration_ms": 0} for name in STEP_NAMES
        ]
        self.failure: str | None = None

    async def step(self, index: int) -> None:
        name = STEP_NAMES[index]
        started = time.monotonic()
        status, detail = "canceled", None  # left so by a CancelledError
        try:
            await self.services.run(self.order, name)
            status = "ok"
        except Exception as exc:
            status = "error"
            detail = exc.kind if isinstance(exc, StepError) else "internal"
            if self.failure is None:
                self.failure = detail
            raise _StepFailed from None  # the TaskGroup cancels the siblings
        finally:
            result = self.results[index]
            result["status"], result["duration_ms"] = status, _ms(time.monotonic() - started)
            if detail is not None:
                result["detail"] = detail

    async def undo(self, index: int) -> None:
        started = time.monotonic()
        status = "timeout"  # left so when the compensation deadline cancels it
        try:
            await self.services.undo(self.order, STEP_NAMES[index])
            status = "ok"
        except Exception:
            status = "error"
        finally:
            self.results[index]["compensation"] = {
                "status": status,
                "duration_ms": _ms(time.monotonic() - started),
            }

    async def compensate(self) -> bool:
        """Undo every step that succeeded, concurrently, within 5 s; True if all were undone."""
        undo = [i for i, result in enumerate(self.results) if result["status"] == "ok"]
        if not undo:
            return True
        try:
            async with asyncio.timeout(COMPENSATION_DEADLINE_S), asyncio.TaskGroup() as group:
                for index in undo:
                    group.create_task(self.undo(index))
        except TimeoutError:
            pass
        return all(self.results[i]["compensation"]["status"] == "ok" for i in undo)


async def _shielded(work: Awaitable[bool]) -> bool:
    """Run `work` to its end even if this task is cancelled meanwhile; then re-raise that."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():  # ends with `work`, which its own 5 s deadline bounds
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return task.result()


async def process(services: Services, order: Order) -> tuple[str | None, list[dict[str, Any]]]:
    """Run the order: its kind (None on success) and its steps; cancellable from outside."""
    run = OrderRun(services, order)
    kind: str | None = None
    cancelled = False
    try:
        async with asyncio.timeout(DEADLINE_S):
            try:
                async with asyncio.TaskGroup() as group:
                    for index in range(len(STEP_NAMES)):
                        group.create_task(run.step(index))
            except* _StepFailed:
                pass
    except TimeoutError:
        kind = "timeout"
    except asyncio.CancelledError:
        cancelled, kind = True, "canceled"
    if not cancelled and run.failure is not None:
        kind = run.failure
    if kind is not None and not await _shielded(run.compensate()):
        kind = "compensation_failed"
    if cancelled:
        raise asyncio.CancelledError  # the compensations ran; the cancellation goes on
    return kind, run.results


def reply(kind: str, order_id: str | None = None, steps: Any = None, message: str = "") -> Response:
    status, default_message, retry_after = KINDS.get(kind, KINDS["internal"])
    body: dict[str, Any] = {"status": "error"}
    if order_id is not None:
        body["order_id"] = order_id
    if steps is not None:
        body["steps"] = steps
    body["error"] = {"kind": kind, "message": message or default_message}
    headers = {"retry-after": "1"} if retry_after else None
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


async def _client_gone(receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> None:
    """Return once the server reports the client disconnected (the body was read already)."""
    while (await receive())["type"] != "http.disconnect":  # each receive waits for an event
        pass


def make_app(services: Services, cancel_on_disconnect: bool) -> FastAPI:
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        response = reply(kind)
        if exc.headers:
            response.headers.update(exc.headers)  # Allow on a 405
        return response

    @app.post("/order")
    async def order(request: Request) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            return reply("payload_too_large")
        body = await request.body()
        if len(body) > MAX_BODY:
            return reply("payload_too_large")
        codings = ",".join(request.headers.getlist("content-encoding")).split(",")
        if any(coding.strip().lower() not in ("", "identity") for coding in codings):
            response = reply("unsupported_media_type")
            response.headers["Accept-Encoding"] = "identity"
            return response
        try:
            parsed = parse_order(body)
        except Invalid as exc:
            return reply("bad_request", exc.order_id, message=exc.message)
        if cancel_on_disconnect:
            work = asyncio.create_task(process(services, parsed))
            watch = asyncio.create_task(_client_gone(request.receive))
            try:
                await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
            finally:
                watch.cancel()
                if not work.done():
                    work.cancel()  # it compensates, then ends cancelled
            try:
                kind, steps = await work
            except asyncio.CancelledError:
                if not work.cancelled():
                    raise
                return reply("canceled", parsed.order_id)  # nobody is there to read it
        else:
            kind, steps = await process(services, parsed)
        if kind is None:
            body = orjson.dumps({"status": "ok", "order_id": parsed.order_id, "steps": steps})
            return Response(body, 200, media_type="application/json")
        return reply(kind, parsed.order_id, steps)

    return app


class _Server(uvicorn.Server):
    """uvicorn's server, telling `on_ready` once it accepts connections."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_ready()


def serve(args: argparse.Namespace, sock: socket.socket, on_ready: Callable[[], None]) -> None:
    """One worker: uvicorn on the bound socket until SIGTERM or SIGINT, then drain and return."""
    services = Services(
        args.courier_pool_size, args.payment_delay_ms, args.vendor_delay_ms, args.courier_delay_ms
    )
    config = uvicorn.Config(
        make_app(services, args.cancel_on_disconnect),
        log_level="warning",
        access_log=False,
        lifespan="off",
        backlog=BACKLOG,
        timeout_keep_alive=3,  # the service's idle keep-alive limit
        timeout_graceful_shutdown=int(DEADLINE_S + COMPENSATION_DEADLINE_S) + 1,
    )
    # uvicorn re-raises the signal it caught once it has drained: let that be a no-op,
    # so the process exits 0, not killed by its own SIGTERM.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    _Server(config, on_ready).run(sockets=[sock])


def _tell(ready: int) -> None:
    os.write(ready, b".")


class _Stop(Exception):
    pass


def _raise_stop(*_: object) -> None:
    raise _Stop


def bound(port: int, reuseport: bool) -> socket.socket:
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY on an accepted socket only if
    # its proto (inherited from the listener) says TCP. Without it Nagle stays on, and every
    # keep-alive request after the first waits ~40 ms for the client's delayed ACK. uvicorn's
    # own Config.bind_socket (its --workers N path) has that flaw: Kludex/uvicorn#3149.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((HOST, port))
    return sock


def listening(port: int) -> socket.socket:
    """A worker's own socket on `port` (SO_REUSEPORT: the kernel spreads connections)."""
    sock = bound(port, reuseport=True)
    sock.listen(BACKLOG)
    return sock


def supervise(
    args: argparse.Namespace, socket_of_worker: Callable[[], socket.socket], running: str
) -> int:
    """`--workers N`: fork N workers, each serving `socket_of_worker()` (made in the worker);
    print `running` once all serve."""
    ready_r, ready_w = os.pipe()
    workers: list[int] = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:  # the worker
            os.close(ready_r)
            try:
                serve(args, socket_of_worker(), lambda: _tell(ready_w))
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        workers.append(pid)
    os.close(ready_w)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _raise_stop)
    code = 0
    try:
        seen, deadline = 0, time.monotonic() + 30
        while seen < args.workers:  # bounded by the deadline and by EOF
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([ready_r], [], [], left)[0]:
                raise SystemExit("workers did not start within 30 s")
            got = os.read(ready_r, args.workers)
            if not got:
                raise SystemExit("a worker exited before serving")
            seen += len(got)
        print(running, flush=True)
        os.wait()  # a worker died (SIGTERM raises _Stop here instead)
        code = 1
    except _Stop:
        pass
    except SystemExit as exc:
        print(exc, file=sys.stderr, flush=True)
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in workers:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0: the system picks one")
    parser.add_argument("--workers", type=int, default=1, choices=range(1, 65), metavar="1..64")
    parser.add_argument("--courier-pool-size", type=int, default=5, choices=range(1, 129),
                        metavar="1..128")  # fmt: skip
    for step, default in (("payment", 150), ("vendor", 200), ("courier", 100)):
        parser.add_argument(f"--{step}-delay-ms", type=int, default=default)
    parser.add_argument(
        "--cancel-on-disconnect",
        action="store_true",
        help="cancel an order whose client has gone (uvicorn does not)",
    )
    parser.add_argument(
        "--reuseport",
        action="store_true",
        help="with --workers: a socket per worker (SO_REUSEPORT), not one shared socket",
    )
    parser.add_argument("--no-access-log", action="store_true", help="accepted; there is none")
    args = parser.parse_args()

    reuseport = args.reuseport and args.workers > 1
    # With --reuseport this one only holds the port (bound, never listening) for the workers'.
    sock = bound(args.port, reuseport)
    port = sock.getsockname()[1]
    if not reuseport:
        sock.listen(BACKLOG)
    running = (
        f"Running on http://{HOST}:{port} (asyncio rewrite: fastapi on uvicorn "
        f"{uvicorn.__version__}, {args.workers} worker(s), "
        f"{'a socket each (SO_REUSEPORT)' if reuseport else 'one shared socket'}, "
        f"courier pool {args.courier_pool_size} per worker, "
        f"cancel on disconnect {'on' if args.cancel_on_disconnect else 'off'}, pid {os.getpid()})"
    )
    if args.workers == 1:
        serve(args, sock, lambda: print(running, flush=True))
        sys.exit(0)
    sys.exit(supervise(args, (lambda: listening(port)) if reuseport else (lambda: sock), running))


if __name__ == "__main__":
    main()
