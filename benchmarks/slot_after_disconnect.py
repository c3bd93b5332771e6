"""How long a courier slot stays taken after the client of the order holding it disconnects.

With a courier pool of 1: order A (courier 5,000 ms, the other steps 0 ms) is sent
on a raw socket; once it holds the one slot (300 ms later), order B (every step
0 ms) is sent on a new connection and waits for that slot; 100 ms later A's socket
is closed. The time from that close to B's reply is how long the slot stayed held
after A's client left (an upper bound: B's reply's own trip is in it): a few ms for
a server that cancels an order when its client goes, about 5 s - 400 ms for one
that lets it run on. B's courier `duration_ms`, which includes its wait for the
slot, gives the server's own view (from B's start, about 100 ms before the close).

Usage:
  python benchmarks/slot_after_disconnect.py     # the service, the asyncio rewrite, it cancelling
  python benchmarks/slot_after_disconnect.py [options] -- SERVER ARGV...
`--port 0` and `--courier-pool-size 1` are added to SERVER ARGV unless it has them;
the server must print `Running on http://127.0.0.1:PORT` (tests/launch.py starts it)
and stop on SIGTERM. Prints one JSON object a line per server:
{"server": ..., "slot_held_after_disconnect_s": X, ...} (X: the median over --repeat);
the server is `service`, `asyncio`, `asyncio_cancel_on_disconnect` or --name.

The script needs the standard library only (and tests/launch.py); the asyncio
rewrite needs fastapi and uvicorn in the interpreter that runs it (see
benchmarks/asyncio_service.py). Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
REPLY_TIMEOUT_S = 30.0
WAITING_S = 0.1


def service_argv() -> list[str]:
    return [sys.executable, "-m", "order_pipeline", "serve", "--port", "0", "--store", "memory",
            "--no-access-log", "--courier-pool-size", "1"]  # fmt: skip


def asyncio_argv(*flags: str) -> list[str]:
    return [sys.executable, str(ROOT / "benchmarks" / "asyncio_service.py"), "--port", "0",
            "--courier-pool-size", "1", *flags]  # fmt: skip


def name_of(argv: list[str]) -> str:
    """A short, stable name for the server (loadtest.py keys its figures by it)."""
    joined = " ".join(argv)
    if "order_pipeline" in joined:
        return "service"
    if "asyncio_service" in joined:
        return "asyncio_cancel_on_disconnect" if "--cancel-on-disconnect" in argv else "asyncio"
    return joined


def request(order: dict[str, Any]) -> bytes:
    body = json.dumps(order).encode()
    head = (
        "POST /order HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def send(port: int, order: dict[str, Any]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT_S)
    sock.sendall(request(order))
    return sock


def read_reply(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """Status and JSON body of the reply (`Connection: close`: it ends at EOF)."""
    chunks = []
    with sock:
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while time.monotonic() < deadline:  # bounded; each recv has the socket's timeout too
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():  # not expected, but cheap to read
        plain, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            plain, rest = plain + rest[:size], rest[size + 2 :]
        body = plain
    return status, json.loads(body)


def courier_ms(reply: dict[str, Any]) -> int:
    courier: int = next(s["duration_ms"] for s in reply["steps"] if s["name"] == "courier")
    return courier


def once(port: int, courier_delay_ms: int, hold_ms: int, number: int) -> dict[str, float]:
    zero = {"payment": 0, "vendor": 0, "courier": 0}
    holder = send(port, {"order_id": f"holder-{number}", "amount": 1,
                         "delay_ms": {**zero, "courier": courier_delay_ms}})  # fmt: skip
    time.sleep(hold_ms / 1000)  # by now it holds the pool's one slot
    sent = time.monotonic()
    waiter = send(port, {"order_id": f"next-{number}", "amount": 1, "delay_ms": zero})
    time.sleep(WAITING_S)  # by now it waits for that slot
    holder.close()  # FIN, as a client that gives up does
    closed = time.monotonic()
    status, reply = read_reply(waiter)
    replied = time.monotonic()
    if status != 200:
        raise SystemExit(f"the second order got {status}: {reply}")
    return {
        # From the close to the waiting order's reply: an upper bound, the reply's trip included.
        "slot_held_s": round(replied - closed, 4),
        # The server's own figure: the waiting order's courier step, its wait for the slot in it,
        # from its start (about WAITING_S before the close) to the slot.
        "waiting_order_courier_s": courier_ms(reply) / 1000,
        "sent_before_close_s": round(closed - sent, 4),
    }


def measure(argv: list[str], name: str, courier_delay_ms: int, hold_ms: int, repeat: int
            ) -> dict[str, Any]:  # fmt: skip
    if str(ROOT) not in sys.path:  # tests/launch.py: the start-up loadtest.py and nox use too
        sys.path.insert(0, str(ROOT))
    from tests import launch

    log = Path(tempfile.mkstemp(prefix="slot-after-disconnect-", suffix=".log")[1])
    try:
        process, url = launch.start(argv, log, cwd=ROOT)
    except launch.NotStarted as error:
        raise SystemExit(f"{argv} did not start: {error}") from None
    port = urlsplit(url).port
    assert port is not None
    try:
        status, reply = read_reply(send(port, {"order_id": "warm-up", "amount": 1, "delay_ms": {
            "payment": 0, "vendor": 0, "courier": 0}}))  # fmt: skip
        if status != 200:
            raise SystemExit(f"{name}: the warm-up order got {status}: {reply}")
        runs = [once(port, courier_delay_ms, hold_ms, n) for n in range(repeat)]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            exit_code: int | None = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            exit_code = None
    log.unlink(missing_ok=True)
    return {
        "server": name,
        "slot_held_after_disconnect_s": statistics.median(r["slot_held_s"] for r in runs),
        "runs": runs,
        "courier_delay_ms": courier_delay_ms,
        "held_before_disconnect_ms": hold_ms,
        "exit_code_on_sigterm": exit_code,
        "argv": argv,
    }


def main() -> None:
    parser = argparse.ArgumentParser(usage=__doc__.split("Usage:\n", 1)[1].split("\n`", 1)[0])
    parser.add_argument("--name", help="what to call the server in the output")
    parser.add_argument("--courier-ms", type=int, default=5000, help="order A's courier delay")
    parser.add_argument("--hold-ms", type=int, default=300, help="from A sent to A's close")
    parser.add_argument("--repeat", type=int, default=1, choices=range(1, 21), metavar="1..20")
    parser.add_argument("server", nargs=argparse.REMAINDER, help="-- SERVER ARGV...")
    args = parser.parse_args()
    argv = args.server[1:] if args.server[:1] == ["--"] else args.server
    if argv:
        if "--port" not in argv:
            argv = [*argv, "--port", "0"]
        if "--courier-pool-size" not in argv:
            argv = [*argv, "--courier-pool-size", "1"]
        servers = [(argv, args.name or name_of(argv))]
    else:
        defaults = [service_argv(), asyncio_argv(), asyncio_argv("--cancel-on-disconnect")]
        servers = [(server, name_of(server)) for server in defaults]
    for server, name in servers:
        print(json.dumps(measure(server, name, args.courier_ms, args.hold_ms, args.repeat)),
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
