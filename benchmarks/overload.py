"""2,000 simultaneous orders against a live server with pool 5: how many are shed, how fast.

Usage: python benchmarks/overload.py URL [ORDERS]. The server should run with
--courier-pool-size 5 --courier-delay-ms 100 --courier-queue-limit 1000 and a
deadline long enough for the admitted orders (--request-timeout 30). Prints a
Markdown table. Only talks to the URL given (use 127.0.0.1).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from urllib.parse import urlsplit

import trio
import trio.testing


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def post_order(host: str, port: int, n: int) -> int:
    """One order on its own connection (Connection: close); returns the HTTP status.

    A raw socket, so the client costs next to nothing: an HTTP client's
    connection pool with thousands of connections measured itself, not the server.
    """
    body = b'{"order_id": "load-%d", "amount": 1}' % n
    request = (
        b"POST /order HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
    ) % (host.encode(), len(body), body)
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(request)
        reply = b""
        while chunk := await stream.receive_some(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


async def main(url: str, orders: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, orders * 2 + 100)), hard))
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    latencies: dict[int, list[float]] = {}
    start = trio.Event()

    async def order(n: int) -> None:
        await start.wait()
        began = time.perf_counter()
        status = await post_order(host, port, n)
        latencies.setdefault(status, []).append(time.perf_counter() - began)

    async with trio.open_nursery() as nursery:
        for n in range(orders):
            nursery.start_soon(order, n)
        await trio.testing.wait_all_tasks_blocked()
        start.set()

    print("| status | orders | p50 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    for status, values in sorted(latencies.items()):
        ms = [v * 1000 for v in values]
        print(
            f"| {status} | {len(ms)} | {statistics.median(ms):.0f} | "
            f"{percentile(ms, 99):.0f} | {max(ms):.0f} |"
        )


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2000)
