"""Hostile clients over real sockets: each gets a clear 4xx or a closed connection, never a 5xx.

All cases run at once against one real server process (the `start_server`
fixture fails the test if the server logs an unhandled error); after the
barrage a normal order must still succeed.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
from collections.abc import Callable, Iterable

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import httpx
import hyperframe.frame
import pytest
import trio

from order_pipeline.http.asgi import TARGET_NOT_SERVED

from .rawhttp import Reply, address, exchange, parse, post, read_all, request
from .server_process import ServerProcess, StartServer, wait_for_steps_in_flight
from .timings import NO_DELAY

NORMAL = {"order_id": "normal", "amount": 1, "delay_ms": NO_DELAY}
HEALTHZ = [(":method", "GET"), (":path", "/healthz"), (":scheme", "http"),
           (":authority", "127.0.0.1")]  # fmt: skip
CHUNK = b"%x\r\n%s\r\n"


class RawH2:
    """One HTTP/2 connection driven frame by frame with h2's client: what httpx would not
    send (DATA after a reply, a stream during a drain), and each stream's status, end and
    reset as they come."""

    def __init__(self, stream: trio.SocketStream, *, as_given: bool = False) -> None:
        """`as_given`: header fields are sent as they are, even those h2 would refuse."""
        self.stream = stream
        config = h2.config.H2Configuration(
            client_side=True,
            normalize_outbound_headers=not as_given,
            validate_outbound_headers=not as_given,
        )
        self.conn = h2.connection.H2Connection(config)
        self.conn.initiate_connection()
        self.statuses: dict[int, int] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.goaway: int | None = None  # the error code of the server's GOAWAY
        self.last_stream_id: int | None = None  # and the last stream it says it took

    def post(self, body: bytes | None, *extra: tuple[str, str], end: bool = True) -> int:
        """A `POST /order` stream, with `body` (within the first window) unless None."""
        sid = self.conn.get_next_available_stream_id()
        headers = [(":method", "POST"), (":path", "/order"), (":scheme", "http"),
                   (":authority", "127.0.0.1"), *extra]  # fmt: skip
        self.conn.send_headers(sid, headers)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=end)
        return sid

    def request(self, headers: Iterable[tuple[str | bytes, str | bytes]]) -> int:
        """A stream of `headers` alone (no body), ended; its id."""
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers, end_stream=True)
        return sid

    async def flush(self) -> None:
        await self.stream.send_all(self.conn.data_to_send())

    async def receive(self) -> None:
        """One read, its events taken in (DATA acknowledged); the connection must not end."""
        data = await self.stream.receive_some(65_536)
        assert data, f"the connection ended; answered: {self.statuses}, reset: {self.resets}"
        self.take_in(data)

    async def until_closed(self) -> None:
        """Read until the server closes the connection, taking in what comes before."""
        while data := await self.stream.receive_some(65_536):
            self.take_in(data)

    def take_in(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.statuses[event.stream_id] = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.resets[event.stream_id] = event.error_code
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event.error_code
                self.last_stream_id = event.last_stream_id

    async def until(self, done: Callable[[], bool]) -> None:
        while not done():
            await self.flush()
            await self.receive()


async def an_order_in_flight(client: RawH2, url: str, *, vendor_ms: int) -> int:
    """POST an order on `client` and wait until its steps run (its vendor step takes
    `vendor_ms`); its stream's id."""
    order = {**NORMAL, "order_id": "in-flight", "delay_ms": {**NO_DELAY, "vendor": vendor_ms}}
    stream_id = client.post(json.dumps(order).encode())
    await client.flush()
    await wait_for_steps_in_flight(url, 1)
    return stream_id


async def sent_on_a_waiting_stream(
    server: ServerProcess, frame: Callable[[int], bytes]
) -> tuple[RawH2, int, int, int]:
    """With an order in flight, open a stream whose body is still to come and send
    `frame(that stream)`; then, the order answered, post another order and wait until it
    is answered and the waiting stream reset. (The client, the order's stream, the waiting
    one, the later order's.)"""
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        with trio.fail_after(10):
            first = await an_order_in_flight(client, server.url, vendor_ms=500)
            waiting = client.post(b"{", end=False)  # its body still to come
            await client.flush()
            await stream.send_all(frame(waiting))
            await client.until(lambda: first in client.ended)
            after = client.post(json.dumps(NORMAL).encode())  # the connection serves on
            await client.until(lambda: after in client.ended and waiting in client.resets)
    return client, first, waiting, after


async def accepts_connections(url: str) -> bool:
    try:
        await (await trio.open_tcp_stream(*address(url))).aclose()
    except OSError:
        return False
    return True


async def draining_with_an_order_in_flight(client: RawH2, server: ServerProcess) -> int:
    """Put an order in flight on `client` (its vendor step 1 s), SIGTERM the server, and
    wait until it stops taking connections (its 0 s drain delay over): streams opened on
    `client` from now on meet the drain. The order's stream id."""
    first = await an_order_in_flight(client, server.url, vendor_ms=1000)
    server.process.send_signal(signal.SIGTERM)
    while await accepts_connections(server.url):  # noqa: ASYNC110 # another process
        await trio.sleep(0.01)
    return first


CASES: dict[str, bytes] = {
    "truncated body, then half-close": request(
        b'{"order_id": "t"', extra=b"Content-Length: 100\r\n"
    ),
    "Content-Length shorter than the body": request(
        b'{"order_id": "lie", "amount": 1}', extra=b"Content-Length: 5\r\n"
    ),
    "Content-Length longer than the body": request(
        b'{"order_id": "x"}', extra=b"Content-Length: 40\r\n"
    ),
    "invalid UTF-8": request(b'{"order_id": "\xff\xfe\xfa"}'),
    "10,000 levels of nesting": request(b"[" * 10_000 + b"]" * 10_000),
    "a 1 MB string": request(b'{"order_id": "' + b"a" * 1_000_000 + b'"}'),
    "a number of 10,000 digits": request(b'{"order_id": "n", "amount": ' + b"9" * 10_000 + b"}"),
    "chunked past the size limit": request(
        b"".join(CHUNK % (8192, b" " * 8192) for _ in range(9)) + b"0\r\n\r\n",
        extra=b"Transfer-Encoding: chunked\r\n",
    ),
    "not HTTP at all": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 200,
    "a 1 MB header line": b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: "
    + b"a" * 1_000_000
    + b"\r\n\r\n",
}


async def hostile(url: str, name: str, raw: bytes, outcomes: dict[str, int | str]) -> None:
    with trio.fail_after(20):
        async with await trio.open_tcp_stream(*address(url)) as stream:
            try:
                await stream.send_all(raw)
                if name.endswith("half-close"):
                    await stream.send_eof()
                reply = await read_all(stream)
            except trio.BrokenResourceError:  # the server hung up on us mid-send
                reply = b""
    outcomes[name] = parse(reply).status if reply else "closed"


async def slow_headers(url: str, outcomes: dict[str, int | str]) -> None:
    """One header byte a second: the server must close us at its 3 s header limit."""
    started = trio.current_time()
    with trio.fail_after(15):
        async with await trio.open_tcp_stream(*address(url)) as stream:
            try:
                for byte in b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n":
                    await stream.send_all(bytes([byte]))
                    with trio.move_on_after(1):
                        if await stream.receive_some(1024) == b"":
                            break
            except trio.BrokenResourceError:
                pass
    waited = trio.current_time() - started
    outcomes["headers one byte a second"] = "closed" if 2 <= waited <= 6 else f"held {waited:.1f}s"


async def idle_connections(url: str, outcomes: dict[str, int | str], count: int = 300) -> None:
    """`count` connections: half send nothing, half one keep-alive request; all are closed."""
    closed = 0

    async def one(n: int) -> None:
        nonlocal closed
        async with await trio.open_tcp_stream(*address(url)) as stream:
            if n % 2:
                await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            await read_all(stream)
            closed += 1

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            for n in range(count):
                nursery.start_soon(one, n)
    outcomes[f"{count} idle keep-alive connections"] = "closed" if closed == count else closed


async def test_hostile_clients_get_4xx_or_a_closed_connection(start_server: StartServer) -> None:
    """Every hostile client gets a 4xx or is disconnected; others are served meanwhile."""
    server = await start_server("--no-access-log")
    outcomes: dict[str, int | str] = {}
    served_meanwhile: list[int] = []

    async with trio.open_nursery() as nursery:
        for name, raw in CASES.items():
            nursery.start_soon(hostile, server.url, name, raw, outcomes)
        nursery.start_soon(slow_headers, server.url, outcomes)
        nursery.start_soon(idle_connections, server.url, outcomes)
        for _ in range(5):
            served_meanwhile.append((await post(server.url, NORMAL)).status)
            await trio.sleep(0.5)

    bad = {k: v for k, v in outcomes.items() if not (v == "closed" or 400 <= int(v) < 500)}
    assert bad == {}
    assert set(outcomes) == {*CASES, "headers one byte a second", "300 idle keep-alive connections"}
    assert served_meanwhile == [200] * 5
    after = await post(server.url, NORMAL)
    assert (after.status, after.json()["status"]) == (200, "ok")


async def test_specific_hostile_answers(start_server: StartServer) -> None:
    """The cases with a definite answer get exactly it."""
    server = await start_server("--no-access-log")

    async def status(raw: bytes) -> int:
        return parse(await exchange(server.url, raw)).status

    assert await status(CASES["invalid UTF-8"]) == 400
    assert await status(CASES["10,000 levels of nesting"]) == 400
    assert await status(CASES["a number of 10,000 digits"]) == 400
    assert await status(CASES["Content-Length shorter than the body"]) == 400
    # Two Content-Lengths that agree frame the body one way: read as one. Two that differ
    # cannot frame it: hypercorn's bare 400.
    body = json.dumps(NORMAL).encode()
    for lengths, answer in (((len(body), len(body)), 200), ((len(body), 3), 400)):
        extra = b"".join(b"Content-Length: %d\r\n" % n for n in lengths)
        assert await status(request(body, extra=extra)) == answer
    # A keep-alive request: the reply says the connection closes (the body was not read).
    chunks = b"".join(CHUNK % (8192, b" " * 8192) for _ in range(9)) + b"0\r\n\r\n"
    chunked = request(chunks, extra=b"Transfer-Encoding: chunked\r\n", close=False)
    too_large = parse(await exchange(server.url, chunked))
    assert (too_large.status, too_large.headers.get("connection")) == (413, "close")


async def test_a_request_framed_two_ways_is_answered_then_its_connection_closed(
    start_server: StartServer,
) -> None:
    """RFC 9112 §6.1: a request with both Transfer-Encoding and Content-Length is read by its
    chunks, and its connection is closed after the answer, so that bytes a proxy in front
    framed by the Content-Length are never read as a next request (request smuggling)."""
    server = await start_server("--no-access-log", "--store", "memory")
    body = b'{"order_id": "s-1", "amount": 5}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    framing = b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"
    smuggled = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"

    answer = await exchange(server.url, request(chunked, extra=framing, close=False) + smuggled)

    assert answer.count(b"HTTP/1.1 ") == 1  # the smuggled request was not served
    reply = parse(answer)
    assert (reply.status, reply.json()["order_id"]) == (200, "s-1")
    assert reply.headers["connection"] == "close"


async def test_a_reply_that_closes_its_connection_is_sent_whole_whatever_follows(
    start_server: StartServer,
) -> None:
    """A 413 goes out as soon as the Content-Length says too much, with `Connection: close`;
    bytes after that body (a pipelined request, even a stray CRLF) were a protocol error to
    hypercorn, which closed the connection mid-reply: the client got the 413's head and none
    of the body its Content-Length promised. Now the reply is whole, and nothing after it
    is served."""
    server = await start_server("--no-access-log", "--store", "memory")
    too_large = request(b" " * 70_000, close=False)
    pipelined = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"

    for after in (pipelined, b"\r\n"):
        answer = await exchange(server.url, too_large + after)
        reply = parse(answer)
        assert (reply.status, reply.headers["connection"]) == (413, "close")
        assert reply.json()["error"]["kind"] == "payload_too_large"
        assert answer.count(b"HTTP/1.1 ") == 1


async def test_empty_lines_before_a_request_line_are_ignored(start_server: StartServer) -> None:
    """RFC 9112 §2.2: a server should ignore empty lines before a request line. A CRLF some
    clients send after a POST's body, on a keep-alive connection, was h11's protocol error
    when the next request came: a bare 400 and the connection closed, the request behind it
    never served. Now the lines are dropped however they arrive (a CR and its LF in two
    reads too), and each request is answered."""
    server = await start_server("--no-access-log", "--store", "memory")
    body = json.dumps(NORMAL).encode()
    get = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    closing = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"

    answer = await exchange(
        server.url, b"\r\n\n" + request(body, close=False) + b"\r\n" + get + b"\r\n\r\n" + closing
    )
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"200", b"200"], answer

    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        with trio.fail_after(5):
            await stream.send_all(get)
            assert (await one_reply(stream)).status == 200
            for part in (b"\r", b"\n\r", b"\n", closing):  # a CR alone waits for its LF
                await stream.send_all(part)
                await trio.sleep(0.05)  # each its own read, most of the time
            answer = await read_all(stream)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200"], answer


async def test_a_body_too_large_to_take_is_refused_before_the_client_sends_it(
    start_server: StartServer,
) -> None:
    """`Expect: 100-continue` asks whether to send the body; one whose Content-Length is over
    the limit would be refused, so the answer is the 413 at once (RFC 9110 §10.1.1), not a
    100 that has the client send it all first (curl asks so of every body over 1 MB). A
    body within the limit gets its 100, and its order runs."""
    server = await start_server("--no-access-log", "--store", "memory")
    expect = b"Expect: 100-continue\r\n"
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        too_large = request(b"", extra=expect + b"Content-Length: 70000\r\n")
        await stream.send_all(too_large)  # its head alone: the client waits
        with trio.fail_after(5):
            reply = parse(await read_all(stream))
    assert (reply.status, reply.json()["error"]["kind"]) == (413, "payload_too_large")

    body = json.dumps(NORMAL).encode()
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        await stream.send_all(request(b"", extra=expect + b"Content-Length: %d\r\n" % len(body)))
        with trio.fail_after(5):
            assert (await stream.receive_some(65_536)).startswith(b"HTTP/1.1 100 ")
            await stream.send_all(body)
            reply = parse(await read_all(stream))
    assert (reply.status, reply.json()["order_id"]) == (200, "normal")

    # Framed by its chunks, a request's Content-Length is no size (RFC 9112 §6.1): it gets
    # its 100 however large that says, where it waited for none (curl: a second).
    framing = expect + b"Transfer-Encoding: chunked\r\nContent-Length: 70000\r\n"
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        await stream.send_all(request(b"", extra=framing))
        with trio.fail_after(5):
            assert (await stream.receive_some(65_536)).startswith(b"HTTP/1.1 100 ")
            await stream.send_all(CHUNK % (len(body), body) + b"0\r\n\r\n")
            reply = parse(await read_all(stream))
    assert (reply.status, reply.json()["order_id"]) == (200, "normal")


async def test_an_http2_request_hypercorn_fails_on_ends_its_connection_alone(
    start_server: StartServer,
) -> None:
    """HTTP/2 (cleartext, prior knowledge) with a body over the limit: the 413 goes out before
    the body is in, and hypercorn's h2 code failed on the rest (a KeyError; it ended the whole
    server, then its connection alone). Now the rest is dropped: the client gets its 413, an
    order in flight on another connection is answered, and the server serves on."""
    server = await start_server("--no-access-log")
    in_flight = {**NORMAL, "order_id": "in-flight", "delay_ms": {**NO_DELAY, "vendor": 1000}}
    answers = []
    refused = []

    async def order() -> None:
        answers.append(await post(server.url, in_flight))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(order)
        await wait_for_steps_in_flight(server.url, 1)
        async with httpx.AsyncClient(base_url=server.url, http1=False, http2=True) as h2:
            # Whether httpx reads the 413 before its body is all sent is its own affair.
            with contextlib.suppress(httpx.HTTPError):
                refused.append((await h2.post("/order", content=b"x" * 200_000)).status_code)
            assert (await h2.get("/healthz")).status_code == 200  # the connection serves on

    assert [(a.status, a.json()["status"]) for a in answers] == [(200, "ok")]
    assert refused in ([], [413])
    assert (await post(server.url, NORMAL)).status == 200
    assert server.process.returncode is None


WEBSOCKET_KEY = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"


def websocket_handshake(path: bytes, key: bytes, connection: bytes = b"Upgrade") -> bytes:
    """A WebSocket handshake (RFC 6455 §4.1) on `path`, valid but for `key` (or its lack)."""
    return (
        b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: %s\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\n%s\r\n" % (path, connection, key)
    )


async def one_reply(stream: trio.SocketStream) -> Reply:
    """Read one HTTP/1.1 reply, whole by its Content-Length, leaving the connection open."""
    data = b""
    while True:
        _, ended, body = data.partition(b"\r\n\r\n")
        if ended and len(body) >= int(parse(data).headers["content-length"]):
            return parse(data)
        chunk = await stream.receive_some(65_536)
        assert chunk, f"closed before the reply was whole: {data!r}"
        data += chunk


@pytest.mark.parametrize("key", [WEBSOCKET_KEY, b""], ids=["valid", "no Sec-WebSocket-Key"])
async def test_a_websocket_handshake_is_served_as_any_request(
    start_server: StartServer, key: bytes
) -> None:
    """No path takes a WebSocket, and a server may ignore `Upgrade` (RFC 9110 §7.8): a
    handshake is served as the GET it also is (by the app: JSON, `X-Request-ID`), and its
    connection serves on, the request behind it answered, or closes if asked to. Hypercorn
    made it a WebSocket: a valid one got the app's error for one (a JSON 400 on /healthz),
    its connection closed; one without `Sec-WebSocket-Key` a bare 400, and its connection
    was held, its idle timer stopped, for as long as its client liked (asked to close or
    not)."""
    server = await start_server("--no-access-log", "--store", "memory")
    behind = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    answers = {b"/healthz": (200, None), b"/nope": (404, "not_found"),
               b"/order": (405, "method_not_allowed")}  # fmt: skip
    for path, (status, kind) in answers.items():
        with trio.fail_after(5):  # a connection held is held for good
            served_on = await exchange(server.url, websocket_handshake(path, key) + behind)
            closing = websocket_handshake(path, key, connection=b"Upgrade, close")
            reply = parse(await exchange(server.url, closing))
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", served_on)
        assert statuses == [b"%d" % status, b"200"], served_on
        assert (reply.status, reply.headers["connection"]) == (status, "close")
        assert "x-request-id" in reply.headers
        assert reply.json().get("error", {}).get("kind") == kind


async def test_a_websocket_handshake_does_not_hold_the_drain(start_server: StartServer) -> None:
    """A handshake without `Sec-WebSocket-Key` got its bare 400 and its connection was never
    idle again: the drain waited for it to the end of its grace (15 s). Served as any
    request, its connection is idle after the reply, and the drain closes it at once."""
    server = await start_server("--no-access-log", "--store", "memory")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        await stream.send_all(websocket_handshake(b"/healthz", b""))
        with trio.fail_after(5):
            reply = await one_reply(stream)
            server.process.send_signal(signal.SIGTERM)
            assert await read_all(stream) == b""
            assert await server.process.wait() == 0
    assert reply.status == 200


@pytest.mark.parametrize("value", [b"websocket\x1f", b"websocket\xa0", b"\x85websocket"])
async def test_a_websocket_upgrade_whose_value_hypercorn_strips_is_served_as_any_request(
    start_server: StartServer, value: bytes
) -> None:
    """Hypercorn strips an `Upgrade` value as text (`str.strip`: \\x1c-\\x1f, \\x85, \\xa0
    too), which h11 keeps as the value's own bytes: such a handshake was still made a WebSocket
    (a bare 400, the connection held for good) though `Upgrade: websocket` was ignored."""
    server = await start_server("--no-access-log", "--store", "memory")
    handshake = websocket_handshake(b"/healthz", b"").replace(b"websocket", value)
    behind = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    with trio.fail_after(5):  # a connection held is held for good
        served_on = await exchange(server.url, handshake + behind)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", served_on) == [b"200", b"200"], served_on


async def test_a_doubled_slash_is_a_json_404(start_server: StartServer) -> None:
    """A doubled slash is a path no route takes: a JSON 404 (it was a 308 to a URL built from
    the Host header)."""
    server = await start_server("--no-access-log", "--store", "memory")
    raw = b"GET /order//k-1 HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n"
    reply = parse(await exchange(server.url, raw))
    assert (reply.status, reply.json()["error"]["kind"]) == (404, "not_found")


async def test_a_target_neither_a_path_nor_an_http_uri_is_400(start_server: StartServer) -> None:
    """RFC 9112 §3.2: a request's target is a path (origin-form), or an absolute URI, which a
    server must accept, and which here names an http or https resource. Quart made a path of
    anything: `healthz` and `order/x` (no leading slash) were served as `/healthz` and
    `/order/x`, and `ftp://t/order` ran an order. Such a target is now 400 `bad_request`,
    its connection closed; an http(s) URI is served as its path, as before. Leading slashes
    are one (`//healthz`: Werkzeug strips them to match); `*` is OPTIONS's alone (below).
    The 400 is the refusal's own (its message), not one a later layer gives such a target."""
    server = await start_server("--no-access-log", "--store", "memory")

    async def answer(
        method: bytes, target: bytes, body: bytes = b"", *, close: bytes = b""
    ) -> tuple[int, str, str]:
        head = b"%s %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n%s\r\n"
        raw = head % (method, target, len(body), close) + body
        reply = parse(await exchange(server.url, raw))  # the server closes the connection
        error = reply.json()["error"] if reply.status >= 400 else {}
        kind = error.get("kind", "")
        if error.get("message") == TARGET_NOT_SERVED:
            kind += ": not served"
        return reply.status, kind, reply.headers.get("connection", "")

    refused = (400, "bad_request: not served", "close")
    order = json.dumps({**NORMAL, "order_id": "ftp"}).encode()
    assert await answer(b"GET", b"healthz") == refused
    assert await answer(b"GET", b"order/x") == refused
    assert await answer(b"GET", b"ftp://t/healthz") == refused
    assert await answer(b"POST", b"ftp://t/order", order) == refused
    assert await answer(b"GET", b"mailto:x") == refused
    assert await answer(b"GET", b"http:///healthz") == refused  # no host: RFC 9110 §4.2.1
    assert await answer(b"GET", b"https://?x") == refused
    assert await answer(b"GET", b"http://#x") == refused
    assert await answer(b"GET", b"*healthz") == refused  # only `*` itself is asterisk-form
    close = b"Connection: close\r\n"
    for served in (b"http://t/healthz", b"HTTPS://other/healthz", b"//healthz"):
        assert await answer(b"GET", served, close=close) == (200, "", "close")
    assert not [line for line in server.log_lines() if line["logger"] == "order_pipeline.orders"]


async def test_the_asterisk_form_is_an_options_target_alone(start_server: StartServer) -> None:
    """`*` as a target (asterisk-form) is for OPTIONS alone (RFC 9112 §3.2.4): any other
    method with it is 400 `bad_request`, the refusal's own, its connection closed, as for a
    target not served; it was a 404 (a path no route takes). `OPTIONS *` asks after the
    server itself, a ping (RFC 9110 §9.3.7): it is still a 404, an answer, the server having
    no options of its own to state, and its connection goes on. `*?x` is no asterisk-form."""
    server = await start_server("--no-access-log", "--store", "memory")

    async def answer(method: bytes, target: bytes) -> tuple[int, str, str]:
        raw = b"%s %s HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n" % (method, target)
        reply = parse(await exchange(server.url, raw))  # the server closes the connection
        error = reply.json()["error"]
        not_served = ": not served" if error["message"] == TARGET_NOT_SERVED else ""
        return reply.status, error["kind"] + not_served, reply.headers.get("connection", "")

    refused = (400, "bad_request: not served", "close")
    for method in (b"GET", b"POST", b"DELETE"):
        assert await answer(method, b"*") == refused, method
    assert await answer(b"OPTIONS", b"*?x") == refused
    options = b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n"
    then = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    raw = await exchange(server.url, options + then)
    assert raw.startswith(b"HTTP/1.1 404 "), raw[:200]
    assert b'"kind":"not_found"' in raw
    assert raw.count(b"HTTP/1.1 200 ") == 1


async def test_a_target_not_served_over_http2_is_400_and_ends_only_its_stream(
    start_server: StartServer,
) -> None:
    """Over HTTP/2 a target neither a path nor an http(s) URI is 400 too, and `*` but for
    OPTIONS: its stream ends with the whole reply (not reset), and the connection serves
    the next stream."""
    server = await start_server("--no-access-log", "--store", "memory")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream, as_given=True)  # h2 would refuse to send such a :path

        def get(path: str) -> int:
            return client.request([(":method", "GET"), (":path", path), (":scheme", "http"),
                                   (":authority", "t")])  # fmt: skip

        refused, asterisk, served = get("healthz"), get("*"), get("/healthz")
        with trio.fail_after(10):
            await client.until(lambda: {refused, asterisk, served} <= client.ended)
    assert client.statuses == {refused: 400, asterisk: 400, served: 200}
    assert client.resets == {}
    assert client.goaway is None


async def test_an_http_uri_whose_host_does_not_parse_is_400_not_500(
    start_server: StartServer,
) -> None:
    """An http(s) URI as the target whose authority Python's `urlsplit` refuses (a `[` not
    closed, a `]` not opened, a bracketed host no IP address, a decoded host that NFKC turns
    into a delimiter) made Quart's own parse of it raise ValueError: a 500 and an error line
    with its traceback (`Error in ASGI Framework`), over HTTP/1.1 and HTTP/2, for a client's
    fault. It is a target not served: 400, the refusal's own; over HTTP/2 on its stream
    alone, the order in flight beside it answered. A bracketed IPv6 host is served."""
    server = await start_server("--no-access-log", "--store", "memory")
    targets = [b"http://[::1/healthz", b"http://%5B::1/healthz", b"https://t]/order",
               b"http://[x]/healthz", b"http://u@[/healthz",
               b"http://%EF%BC%9F.t/healthz"]  # fmt: skip

    async def answer(target: bytes) -> tuple[int, str]:
        raw = b"GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" % target
        reply = parse(await exchange(server.url, raw))
        return reply.status, reply.json()["error"]["message"] if reply.status == 400 else ""

    for target in targets:
        assert await answer(target) == (400, TARGET_NOT_SERVED), target
    assert await answer(b"http://[::1]/healthz") == (200, "")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream, as_given=True)
        with trio.fail_after(10):
            first = await an_order_in_flight(client, server.url, vendor_ms=500)
            rest = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"t")]
            refused = [client.request([(b":path", target), *rest]) for target in targets]
            await client.until(lambda: {first, *refused} <= client.ended)
    assert client.statuses == {first: 200, **dict.fromkeys(refused, 400)}
    assert client.resets == {}
    assert [x["message"] for x in server.log_lines() if x["level"] == "error"] == []


def h2c_upgrade(settings: bytes) -> bytes:
    """A `GET /healthz` asking to go on in HTTP/2 (h2c) with `settings` as its HTTP2-Settings."""
    return (
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: %s\r\n\r\n" % settings
    )


@pytest.mark.parametrize(
    "settings",
    [b"not base64!", b"AAAAAAAAAAAA", b"AASAAAAA"],
    ids=["not base64url", "9 bytes", "a window over 2^31-1"],
)
async def test_an_h2c_upgrade_with_http2_settings_h2_refuses_gets_a_400(
    start_server: StartServer, settings: bytes
) -> None:
    """An h2c upgrade (RFC 7540 §3.2) whose HTTP2-Settings is no SETTINGS payload h2 takes
    (not base64url, not 6 bytes a setting, a value out of range) got its 101, then h2's
    error failed the connection: a traceback logged as an error ("a connection failed").
    It gets a 400 instead of the 101, and its connection is closed; a good one gets its 101."""
    server = await start_server("--no-access-log", "--store", "memory")
    reply = parse(await exchange(server.url, h2c_upgrade(settings)))
    assert (reply.status, reply.headers["connection"]) == (400, "close")
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    good = client.initiate_upgrade_connection()
    assert good is not None
    with trio.fail_after(10):
        async with await trio.open_tcp_stream(*address(server.url)) as stream:
            await stream.send_all(h2c_upgrade(good))
            assert (await stream.receive_some(65_536)).startswith(b"HTTP/1.1 101")


async def test_an_h2c_upgrade_with_http2_settings_not_base64url_unpadded_gets_a_400(
    start_server: StartServer,
) -> None:
    """HTTP2-Settings is base64url with no padding (RFC 7540 §3.2.1's text, narrower than
    its grammar's token68). h2 decodes it as base64 would, leniently: `+` and `/` (base64's
    own), padding, a character of neither alphabet dropped, nothing at all (no setting);
    each got its 101. Each is refused as settings h2 does not take are: a 400, and the
    connection closed."""
    server = await start_server("--no-access-log", "--store", "memory")
    for settings in (b"AAMA+ABk", b"AAMA/ABk", b"AAMAAABk==", b"AAMA.AABk", b"AAMA~AABk", b""):
        reply = parse(await exchange(server.url, h2c_upgrade(settings)))
        assert (reply.status, reply.headers["connection"]) == (400, "close"), settings


@pytest.mark.parametrize("count", [0, 2], ids=["none", "two"])
async def test_an_h2c_upgrade_without_one_http2_settings_is_served_in_http1(
    start_server: StartServer, count: int
) -> None:
    """A server must not upgrade to h2c a request with no HTTP2-Settings, or more than one
    (RFC 7540 §3.2.1); hypercorn upgraded it (101) on `Upgrade: h2c` alone. Such a request
    is served in HTTP/1.1, as any whose upgrade a server ignores, and its connection goes
    on in HTTP/1.1: the request behind it is served too."""
    server = await start_server("--no-access-log", "--store", "memory")
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = client.initiate_upgrade_connection()
    assert settings is not None
    upgrade = (
        b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\n%s\r\n" % (b"HTTP2-Settings: %s\r\n" % settings * count)
    )
    behind = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    raw = await exchange(server.url, upgrade + behind)
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:100]
    assert raw.count(b"HTTP/1.1 200 ") == 2


async def test_http2_settings_h2_refuses_are_400_only_where_hypercorn_would_upgrade(
    start_server: StartServer,
) -> None:
    """Hypercorn upgrades a request to h2c on `Upgrade: h2c` in any case, and only without a
    body (one it ignores the upgrade of is served in HTTP/1.1). So an HTTP2-Settings h2 does
    not take is a 400 on `Upgrade: H2C` too, and nothing where no upgrade would be: with no
    `Upgrade`, or with a Content-Length or chunks, such a request is served."""
    server = await start_server("--no-access-log", "--store", "memory")

    async def status(head: bytes, body: bytes = b"") -> int:
        raw = (
            b"GET /healthz HTTP/1.1\r\nHost: t\r\nHTTP2-Settings: not base64!\r\n"
            b"%sConnection: Upgrade, HTTP2-Settings, close\r\n\r\n%s" % (head, body)
        )
        return parse(await exchange(server.url, raw)).status

    assert await status(b"Upgrade: H2C\r\n") == 400
    assert await status(b"") == 200
    assert await status(b"Upgrade: h2c\r\nContent-Length: 0\r\n") == 200
    chunked = b"Upgrade: h2c\r\nTransfer-Encoding: chunked\r\n"
    assert await status(chunked, b"0\r\n\r\n") == 200


async def test_an_http2_body_over_the_limit_leaves_the_other_streams_orders_alone(
    start_server: StartServer,
) -> None:
    """HTTP/2 multiplexes orders on one connection (a proxy may carry many clients' on it). A
    body over the limit, by its Content-Length, gets its 413 before the rest of it arrives;
    the rest, DATA of a stream hypercorn has closed, failed its h2 code (a KeyError) and so
    ended the connection: every other order on it was cancelled. Now only that stream ends."""
    server = await start_server("--no-access-log", "--store", "memory")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        with trio.fail_after(10):
            first = await an_order_in_flight(client, server.url, vendor_ms=500)
            # Its Content-Length is over the limit: the 413 comes before the rest of the body.
            too_large = client.post(b"x" * 1_000, ("content-length", "70000"), end=False)
            await client.until(lambda: too_large in client.statuses)
            client.conn.send_data(too_large, b"x" * 1_000)  # the client sends on, as clients do
            await client.until(lambda: first in client.ended)
    assert client.statuses == {first: 200, too_large: 413}


async def test_an_http2_body_over_the_limit_in_small_frames_leaves_the_connection_alone(
    start_server: StartServer,
) -> None:
    """The same body over the limit sent in many small DATA frames, all in one read: the
    413 went out, and its stream closed, while the server still took in that read's frames,
    and the next one failed hypercorn's h2 code (a KeyError) and ended the connection (a soak
    run with httpx over HTTP/2 met it 3 times in 5,000 orders). Only that stream ends."""
    server = await start_server("--no-access-log", "--store", "memory")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        with trio.fail_after(10):
            first = await an_order_in_flight(client, server.url, vendor_ms=500)
            too_large = client.post(None, ("content-length", "70000"))
            for _ in range(60):
                client.conn.send_data(too_large, b"x" * 1_000)
            await client.until(lambda: {first, too_large} <= client.ended)
    assert client.statuses == {first: 200, too_large: 413}


async def test_an_http2_body_longer_than_its_content_length_ends_its_stream_alone(
    start_server: StartServer,
) -> None:
    """DATA beyond a stream's Content-Length (or short of it at END_STREAM) makes a malformed
    request, a stream error (RFC 9113 §8.1.1); h2 raised it as a connection error, so the
    GOAWAY cancelled and undid every other order on the connection. Now that stream alone is
    reset (PROTOCOL_ERROR), runs nothing, and the order in flight beside it is answered."""
    server = await start_server("--no-access-log", "--store", "memory")
    body = json.dumps({**NORMAL, "order_id": "lying"}).encode()
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        with trio.fail_after(10):
            first = await an_order_in_flight(client, server.url, vendor_ms=500)
            longer = client.post(body, ("content-length", str(len(body) - 5)))
            shorter = client.post(body, ("content-length", str(len(body) + 5)))
            await client.until(lambda: first in client.ended)
            after = client.post(json.dumps(NORMAL).encode())  # the connection serves on
            await client.until(lambda: after in client.ended and len(client.resets) == 2)
    assert client.statuses == {first: 200, after: 200}
    error = h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert client.resets == {longer: error, shorter: error}
    assert not [x for x in server.log_lines() if x.get("order_id") == "lying"]


async def test_an_http2_body_short_of_its_content_length_at_a_headers_end_is_reset_alone(
    start_server: StartServer,
) -> None:
    """A stream ended by a HEADERS frame (trailers, or the request's own HEADERS with
    END_STREAM) with less DATA than its Content-Length is as malformed as one ended by DATA
    (RFC 9113 §8.1.1), but h2 counts the length at a DATA frame's end alone: the order ran on
    the short body (200), and a POST whose HEADERS ended it at once was refused as an empty
    body (400). Now each is reset PROTOCOL_ERROR alone, running nothing, and the order in
    flight beside them is answered; a body as long as its Content-Length, then trailers, runs."""
    server = await start_server("--no-access-log", "--store", "memory")
    body = json.dumps({**NORMAL, "order_id": "lying"}).encode()
    whole = json.dumps({**NORMAL, "order_id": "whole"}).encode()
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        with trio.fail_after(10):
            first = await an_order_in_flight(client, server.url, vendor_ms=500)
            short = client.post(body, ("content-length", str(len(body) + 5)), end=False)
            client.conn.send_headers(short, [("x-trailer", "1")], end_stream=True)
            head = [(":method", "POST"), (":path", "/order"), (":scheme", "http"),
                    (":authority", "127.0.0.1"), ("content-length", "5")]  # fmt: skip
            empty = client.request(head)
            exact = client.post(whole, ("content-length", str(len(whole))), end=False)
            client.conn.send_headers(exact, [("x-trailer", "1")], end_stream=True)
            await client.until(lambda: {first, exact} <= client.ended)
            after = client.post(json.dumps(NORMAL).encode())  # the connection serves on
            await client.until(lambda: after in client.ended and len(client.resets) >= 2)
    assert client.statuses == {first: 200, exact: 200, after: 200}
    error = h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert client.resets == {short: error, empty: error}
    assert not [x for x in server.log_lines() if x.get("order_id") == "lying"]


async def test_http2_request_headers_h2_refuses_reset_their_stream_alone(
    start_server: StartServer,
) -> None:
    """Request headers h2 refuses (RFC 9113 §8.2: an upper-case name, a connection-specific
    field, a value with a space at an end, a Content-Length not a number) make a malformed
    request, a stream error (§8.1.1); h2 raised a connection error, and its GOAWAY cancelled
    and undid every other order on the connection. Now that stream alone is reset
    (PROTOCOL_ERROR), its order not run, and the order in flight beside it is answered;
    so too for trailers h2 refuses on a stream whose body is under way."""
    server = await start_server("--no-access-log", "--store", "memory")
    refused = [("Upper-Case", "x"), ("connection", "close"), ("te", "chunked"),
               ("transfer-encoding", "chunked"), ("x-pad", " x"), ("x-pad", "x "),
               ("content-length", "ten")]  # fmt: skip
    body = json.dumps({**NORMAL, "order_id": "malformed"}).encode()
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream, as_given=True)
        with trio.fail_after(10):
            first = await an_order_in_flight(client, server.url, vendor_ms=500)
            bad = [client.post(body, field) for field in refused]
            trailed = client.post(body, end=False)
            client.conn.send_headers(trailed, [("connection", "close")], end_stream=True)
            await client.until(lambda: first in client.ended)
            after = client.post(json.dumps(NORMAL).encode())  # the connection serves on
            await client.until(lambda: after in client.ended and trailed in client.resets)
    assert client.statuses == {first: 200, after: 200}
    assert client.resets == dict.fromkeys([*bad, trailed], h2.errors.ErrorCodes.PROTOCOL_ERROR)
    assert not [x for x in server.log_lines() if x.get("order_id") == "malformed"]


async def test_an_http2_request_line_not_ascii_resets_its_stream_alone(
    start_server: StartServer,
) -> None:
    """A :path or :method with a byte that is not ASCII (a raw `é`, where a URI has `%C3%A9`)
    is no request target or method, a malformed request (RFC 9113 §8.1.1); hypercorn decoded
    both as ASCII (a path's part before its query), and its UnicodeDecodeError ended the
    connection (no GOAWAY), cancelling and undoing the order in flight beside it, with an
    error line and its traceback; a query that is not UTF-8 (`?\x80`) got a 500 and an error
    line with its traceback (Quart's decoding), one that is (`?é`) was served. Now each such stream
    alone is reset (PROTOCOL_ERROR), and the order beside it is answered. (HTTP/1.1: h11
    answers each such request line with its bare 400.)"""
    server = await start_server("--no-access-log", "--store", "memory")
    heads: list[list[tuple[str | bytes, str | bytes]]]
    heads = [[(":method", "GET"), (":path", "/order/é")],
             [(":method", "GÉT"), (":path", "/healthz")],
             [(":method", "POST"), (":path", "/order?é")],
             [(":method", "GET"), (":path", b"/healthz?\x80")]]  # fmt: skip
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream, as_given=True)
        with trio.fail_after(10):
            first = await an_order_in_flight(client, server.url, vendor_ms=500)
            rest = [(":scheme", "http"), (":authority", "127.0.0.1")]
            bad = [client.request([*head, *rest]) for head in heads]
            await client.until(lambda: first in client.ended)
            after = client.post(json.dumps(NORMAL).encode())  # the connection serves on
            await client.until(lambda: after in client.ended)
    assert client.statuses == {first: 200, after: 200}
    assert client.resets == dict.fromkeys(bad, h2.errors.ErrorCodes.PROTOCOL_ERROR)
    assert [x["message"] for x in server.log_lines() if x["level"] == "error"] == []


async def test_http2_trailers_h2_refuses_after_the_reply_end_their_stream_alone(
    start_server: StartServer,
) -> None:
    """Trailers h2 refuses that end a stream whose reply is already out (a 413 on its
    Content-Length): their END_STREAM closes the stream before h2 checks the fields, so the
    refusal stayed a connection error, the GOAWAY cancelling and undoing the order in flight
    beside it. The stream is over both ways: the trailers are dropped, the others answered."""
    server = await start_server("--no-access-log", "--store", "memory")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream, as_given=True)
        with trio.fail_after(10):
            first = await an_order_in_flight(client, server.url, vendor_ms=500)
            too_large = client.post(None, ("content-length", "70000"))
            await client.until(lambda: too_large in client.ended)  # its 413, whole
            client.conn.send_headers(too_large, [("connection", "close")], end_stream=True)
            await client.until(lambda: first in client.ended)
            after = client.post(json.dumps(NORMAL).encode())  # the connection serves on
            await client.until(lambda: after in client.ended)
    assert client.statuses == {first: 200, too_large: 413, after: 200}
    assert client.goaway is None


async def test_an_http2_header_block_hpack_cannot_decode_still_ends_the_connection(
    start_server: StartServer,
) -> None:
    """A header block HPACK cannot decode leaves the connection's decoding state unknown,
    so it stays a connection error (RFC 9113 §4.3), a request's or a trailer's."""
    server = await start_server("--no-access-log", "--store", "memory")
    for trailer in (False, True):
        async with await trio.open_tcp_stream(*address(server.url)) as stream:
            client = RawH2(stream)
            sid = client.post(b"{", end=False)
            await client.flush()
            flags = ("END_HEADERS", "END_STREAM")
            garbage = hyperframe.frame.HeadersFrame(sid if trailer else sid + 2, flags=flags)
            garbage.data = b"\xff\xff\xff\xff"  # an index no table has
            await stream.send_all(garbage.serialize())
            with trio.fail_after(10):
                while client.goaway is None:
                    await client.receive()
        assert client.goaway == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert (await post(server.url, NORMAL)).status == 200


async def test_an_http2_body_sent_on_after_its_reply_is_stopped(
    start_server: StartServer,
) -> None:
    """The DATA of a stream already answered (413) is dropped, and acknowledged; the
    acknowledgement reopened the stream's own window too, so a client could upload for ever
    what the server drops. Once the reply is all sent, the stream is reset with NO_ERROR
    (RFC 9113 §8.1): the client stops, well within its first window."""
    server = await start_server("--no-access-log", "--store", "memory")
    sent = 0
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        sid = client.post(None, ("content-length", "10000000"))
        with trio.fail_after(10):
            while sid not in client.resets and sent < 1_000_000:
                room = 0
                if sid in client.ended:  # the 413 is whole: send on, as far as windows allow
                    room = min(client.conn.local_flow_control_window(sid), 16_384)
                    if room:
                        client.conn.send_data(sid, b"x" * room)
                        sent += room
                await client.flush()
                with trio.move_on_after(0.01 if room else 2):
                    await client.receive()
    assert client.statuses == {sid: 413}
    assert client.resets == {sid: h2.errors.ErrorCodes.NO_ERROR}, (
        f"{sent} bytes taken after the 413"
    )
    assert sent <= 65_535
    assert server.process.returncode is None


def a_reply_not_read(client: RawH2) -> int:
    """GET /healthz on `client`, which sets its flow-control window to 0: the reply's body
    cannot be sent, as for a client that reads none of it; the stream's id."""
    client.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    return client.request([(":method", "GET"), (":path", "/healthz"), (":scheme", "http"),
                           (":authority", "127.0.0.1")])  # fmt: skip


async def test_an_http2_reply_not_read_is_given_up_when_its_client_goes(
    start_server: StartServer,
) -> None:
    """A reply held back by its client's flow-control window waited for ever to be sent, even
    once the client had gone: hypercorn's send task ended with the connection, not the wait,
    so the connection kept its socket and tasks (one file descriptor per such client) and a
    drain overran to its hard deadline (exit 1). The reply is now given up with its
    connection."""
    server = await start_server("--no-access-log", "--store", "memory")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        sid = a_reply_not_read(client)
        with trio.fail_after(10):
            await client.until(lambda: sid in client.statuses)
    server.process.send_signal(signal.SIGTERM)
    with trio.fail_after(5):  # the hard deadline is 20 s away
        assert await server.process.wait() == 0


async def test_an_http2_reply_not_read_ends_the_drain_at_its_grace(
    start_server: StartServer,
) -> None:
    """An order whose reply its client does not read (window 0): final and recorded, yet
    its connection held the drain to its hard deadline (exit 1), where HTTP/1.1 sends a
    reply this small at once. At the grace's end the reply is given up and its connection
    closed: the drain ends there, exit 0."""
    server = await start_server("--no-access-log", "--store", "memory", "--shutdown-grace", "1")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        client.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        sid = client.post(json.dumps(NORMAL).encode())
        with trio.fail_after(10):
            await client.until(lambda: sid in client.statuses)
        server.process.send_signal(signal.SIGTERM)
        with trio.fail_after(5):  # the grace is 1 s, the hard deadline 11 s
            while client.goaway is None:
                await client.receive()
            assert await server.process.wait() == 0
    assert (client.statuses, client.ended) == ({sid: 200}, set())
    assert [x["status"] for x in server.log_lines() if x.get("order_id") == "normal"] == ["ok"]


async def test_an_http2_stream_opened_during_the_drain_is_refused_as_not_processed(
    start_server: StartServer,
) -> None:
    """On HTTP/1.1 an order sent once the drain has begun meets a refused connection: surely
    not run. On an HTTP/2 connection already open, hypercorn reset its stream with NO_ERROR,
    which does not say whether it ran; now REFUSED_STREAM says it did not (RFC 9113 §8.7).
    The order in flight on that connection is answered, and the server exits 0."""
    server = await start_server("--no-access-log", "--store", "memory")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        with trio.fail_after(10):
            # Hypercorn stops taking streams as it stops listening, once the (0 s) drain
            # delay ends: a new connection is refused then.
            first = await draining_with_an_order_in_flight(client, server)
            late = client.post(json.dumps({**NORMAL, "order_id": "late"}).encode())
            await client.until(lambda: first in client.ended and late in client.resets)
    assert client.statuses == {first: 200}
    assert client.resets == {late: h2.errors.ErrorCodes.REFUSED_STREAM}
    with trio.fail_after(10):
        assert await server.process.wait() == 0  # the drain's own end: no second signal
    assert not [x for x in server.log_lines() if x.get("order_id") == "late"]


@pytest.mark.parametrize("closed_at", ["the drain", "the idle limit"])
async def test_an_idle_http2_connection_is_told_goaway_before_it_is_closed(
    start_server: StartServer, closed_at: str
) -> None:
    """An HTTP/2 connection with no stream open was closed without a GOAWAY at the drain (and
    at the idle limit): a stream its client sent as the close came met a bare close, which
    does not say whether it ran (httpx: `Server disconnected`, a broken pipe), where a
    stream opened on a busy connection is refused as not processed. GOAWAY first names the
    last stream taken (RFC 9113 §6.8, §9.1): a later one surely did not run, and a client
    retries it elsewhere."""
    server = await start_server("--no-access-log", "--store", "memory", "--header-timeout", "1")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        sid = client.post(json.dumps(NORMAL).encode())
        with trio.fail_after(10):
            await client.until(lambda: sid in client.ended)
            if closed_at == "the drain":
                server.process.send_signal(signal.SIGTERM)
            await client.until_closed()
    assert (client.statuses, client.goaway, client.last_stream_id) == (
        {sid: 200}, h2.errors.ErrorCodes.NO_ERROR, sid,
    )  # fmt: skip


@pytest.mark.parametrize("closed_at", ["the drain", "the idle limit"])
@pytest.mark.parametrize("sent", ["the preface alone", "a header block never ended"])
async def test_an_http2_connection_that_opens_no_stream_is_closed_as_an_idle_one(
    start_server: StartServer, closed_at: str, sent: str
) -> None:
    """Hypercorn reads the HTTP/2 preface as an HTTP/1.1 request (`PRI * HTTP/2.0`), which
    stopped the connection's idle timer before it turned to HTTP/2, and only a stream's end
    started it again: a connection that opened no stream was never closed at the idle limit
    (a descriptor held for as long as its client liked) and held a drain to its grace (15 s).
    It is closed as an idle connection is, GOAWAY first, naming no stream."""
    limit = "1" if closed_at == "the idle limit" else "60"
    server = await start_server("--no-access-log", "--store", "memory", "--header-timeout", limit)
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        await client.flush()
        if sent == "a header block never ended":  # no END_HEADERS, no CONTINUATION after it
            block = hyperframe.frame.HeadersFrame(1)
            block.data = client.conn.encoder.encode([(":method", "GET"), (":path", "/healthz")])
            await stream.send_all(block.serialize())
        with trio.fail_after(5):
            if closed_at == "the drain":
                server.process.send_signal(signal.SIGTERM)
            await client.until_closed()
            if closed_at == "the drain":
                assert await server.process.wait() == 0
    assert (client.goaway, client.last_stream_id) == (h2.errors.ErrorCodes.NO_ERROR, 0)


@pytest.mark.parametrize("closed_by", ["its client's reset", "a body short of its length"])
async def test_an_http2_stream_closed_as_it_opens_during_the_drain_is_left_closed(
    start_server: StartServer, closed_by: str
) -> None:
    """A stream opened during the drain whose HEADERS come in one read with its end (the
    client's RST_STREAM, or DATA short of its Content-Length, which resets it) was already
    closed when the drain's REFUSED_STREAM was sent on it: h2 raised StreamClosedError,
    which ended the connection, cancelling and undoing the order in flight on it."""
    server = await start_server("--no-access-log", "--store", "memory")
    body = json.dumps({**NORMAL, "order_id": "late"}).encode()
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        with trio.fail_after(10):
            first = await draining_with_an_order_in_flight(client, server)
            if closed_by == "its client's reset":
                late = client.post(body, end=False)
                client.conn.reset_stream(late)
            else:
                late = client.post(body, ("content-length", str(len(body) + 5)))
            await client.until(lambda: first in client.ended)
    assert client.statuses == {first: 200}
    with trio.fail_after(10):
        assert await server.process.wait() == 0
    assert [x["message"] for x in server.log_lines() if x["level"] == "error"] == []
    assert not [x for x in server.log_lines() if x.get("order_id") == "late"]


async def test_http2_replies_in_flight_at_a_drain_end_whole(start_server: StartServer) -> None:
    """A drain closes an HTTP/2 connection once its last stream is gone; that close raced the
    reply's END_STREAM (framed by hypercorn's send task after a checkpoint), so a client got
    a reply without its end (httpx: RemoteProtocolError, ConnectionTerminated) for an order
    logged ok and counted drained. 24 connections, one order in flight on each."""
    server = await start_server("--no-access-log", "--store", "memory")
    in_flight = {**NORMAL, "delay_ms": {**NO_DELAY, "vendor": 1000}}
    outcomes: list[int | str] = []

    async def order(n: int) -> None:
        async with httpx.AsyncClient(base_url=server.url, http1=False, http2=True) as client:
            try:
                reply = await client.post("/order", json={**in_flight, "order_id": f"d{n}"})
                outcomes.append(reply.status_code)
            except httpx.TransportError as exc:
                outcomes.append(repr(exc))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for n in range(24):
                nursery.start_soon(order, n)
            await wait_for_steps_in_flight(server.url, 24)  # the vendors
            server.process.send_signal(signal.SIGTERM)
        assert await server.process.wait() == 0
    assert outcomes == [200] * 24


async def test_an_http2_connect_request_is_refused_on_its_stream_alone(
    start_server: StartServer,
) -> None:
    """A CONNECT request (RFC 9113 §8.5) has no :path; hypercorn's h2 code failed on it (an
    UnboundLocalError), which ended the connection, cancelling and undoing the order in flight
    beside it. It is answered 405, on its stream alone, and the connection serves on."""
    server = await start_server("--no-access-log", "--store", "memory")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        with trio.fail_after(10):
            first = await an_order_in_flight(client, server.url, vendor_ms=500)
            connect = client.conn.get_next_available_stream_id()
            client.conn.send_headers(connect, [(":method", "CONNECT"), (":authority", "x:443")])
            await client.until(lambda: first in client.ended)
            after = client.post(json.dumps(NORMAL).encode())  # the connection serves on
            await client.until(lambda: after in client.ended)
    assert client.statuses == {first: 200, connect: 405, after: 200}


@pytest.mark.parametrize("closed_at", ["the drain", "the idle limit"])
@pytest.mark.parametrize(
    "version", [[("sec-websocket-version", "13")], []], ids=["valid", "no version"]
)
async def test_an_http2_connect_for_a_websocket_is_served_as_any_request(
    start_server: StartServer, version: list[tuple[str, str]], closed_at: str
) -> None:
    """Hypercorn offered RFC 8441's CONNECT for WebSockets (SETTINGS_ENABLE_CONNECT_PROTOCOL)
    and made each CONNECT with a :path a WebSocket stream: a valid handshake got the app's
    error for one (400), one without `sec-websocket-version` a bare 400, and its stream
    never ended: the connection was never idle, held for good (and a drain to its grace).
    No path takes a WebSocket: none is offered, and such a CONNECT is served as any request
    (no route takes CONNECT: a JSON 405), its connection closed as an idle one."""
    limit = "1" if closed_at == "the idle limit" else "60"
    server = await start_server("--no-access-log", "--store", "memory", "--header-timeout", limit)
    connect = [(":method", "CONNECT"), (":protocol", "websocket"), (":path", "/healthz"),
               (":scheme", "http"), (":authority", "127.0.0.1"), *version]  # fmt: skip
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(sid, connect)
        with trio.fail_after(5):
            await client.until(lambda: sid in client.ended)
            if closed_at == "the drain":
                server.process.send_signal(signal.SIGTERM)
            await client.until_closed()
            if closed_at == "the drain":
                assert await server.process.wait() == 0
    assert client.conn.remote_settings.enable_connect_protocol == 0
    assert (client.statuses, client.goaway, client.last_stream_id) == (
        {sid: 405}, h2.errors.ErrorCodes.NO_ERROR, sid,
    )  # fmt: skip


async def test_an_h2c_upgrade_of_a_connect_is_served_as_any_request(
    start_server: StartServer,
) -> None:
    """An h2c upgrade of a CONNECT request goes on in HTTP/2 as a CONNECT stream with a :path
    (its target), which hypercorn made a WebSocket stream: a bare 400, and the connection
    held for good. It is served as any request: a JSON 405 on its stream (no route takes
    CONNECT), the connection closed at the idle limit."""
    server = await start_server("--no-access-log", "--store", "memory", "--header-timeout", "1")
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = client.initiate_upgrade_connection()
    assert settings is not None
    upgrade = h2c_upgrade(settings).replace(b"GET ", b"CONNECT ", 1)
    with trio.fail_after(5):
        async with await trio.open_tcp_stream(*address(server.url)) as stream:
            await stream.send_all(upgrade + client.data_to_send())
            head, _, rest = (await read_all(stream)).partition(b"\r\n\r\n")
    events = client.receive_data(rest)
    assert head.startswith(b"HTTP/1.1 101 ")
    replies = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert [(e.stream_id, dict(e.headers)[b":status"]) for e in replies] == [(1, b"405")]
    assert any(isinstance(e, h2.events.StreamEnded) and e.stream_id == 1 for e in events)


async def test_http2_priority_frames_on_many_streams_leave_the_connection_alone(
    start_server: StartServer,
) -> None:
    """PRIORITY frames may name any stream, idle ones too (RFC 9113 §5.1, §6.3); hypercorn
    keeps each in its priority tree, which refuses a 1,001st: the error failed hypercorn's
    h2 code ("a connection failed"), ending the connection, cancelling and undoing the order
    in flight on it. Priority is a hint: what the tree cannot take is ignored."""
    server = await start_server("--no-access-log", "--store", "memory")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        with trio.fail_after(10):
            first = await an_order_in_flight(client, server.url, vendor_ms=500)
            frames = []
            for n in range(1_001):
                frames.append(hyperframe.frame.PriorityFrame(101 + 2 * n, depends_on=first))
                frames.append(hyperframe.frame.PriorityFrame(first, depends_on=3001 + 2 * n))
            await stream.send_all(b"".join(f.serialize() for f in frames))
            await client.until(lambda: first in client.ended)
            client.conn.highest_outbound_stream_id = 5001  # past the ids named above
            after = client.post(json.dumps(NORMAL).encode())  # the connection serves on
            await client.until(lambda: after in client.ended)
    assert client.statuses == {first: 200, after: 200}


async def test_an_http2_stream_made_to_depend_on_its_own_dependant_leaves_the_connection_alone(
    start_server: StartServer,
) -> None:
    """A stream may be made to depend on one that depends on it (RFC 9113 §5.3.3, from RFC
    7540). The priority tree hypercorn keeps (`priority`) then left that dependant's own
    dependant under two parents; once its reply was sent and it left the tree, the other
    still scheduled it, and hypercorn's send task failed on a stream with no reply ("a
    connection failed"), ending the connection, cancelling and undoing the orders in flight
    on it. Priority is a hint: such a frame is ignored, and the orders are answered."""
    server = await start_server("--no-access-log", "--store", "memory")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        with trio.fail_after(10):
            first = await an_order_in_flight(client, server.url, vendor_ms=500)
            order = {**NORMAL, "order_id": "middle", "delay_ms": {**NO_DELAY, "vendor": 500}}
            middle = client.post(json.dumps(order).encode())
            last = client.post(json.dumps({**NORMAL, "order_id": "last"}).encode())
            await client.flush()
            frames = [
                hyperframe.frame.PriorityFrame(middle, depends_on=first),
                hyperframe.frame.PriorityFrame(last, depends_on=middle),
                hyperframe.frame.PriorityFrame(first, depends_on=middle),  # its own dependant
            ]
            await stream.send_all(b"".join(f.serialize() for f in frames))
            await client.until(lambda: {first, middle, last} <= client.ended)
            after = client.post(json.dumps(NORMAL).encode())  # the connection serves on
            await client.until(lambda: after in client.ended)
    assert client.statuses == {first: 200, middle: 200, last: 200, after: 200}
    assert [x["message"] for x in server.log_lines() if x["level"] == "error"] == []


async def test_an_http2_window_update_of_0_on_a_stream_resets_that_stream_alone(
    start_server: StartServer,
) -> None:
    """A WINDOW_UPDATE of increment 0 on a stream is that stream's error (RFC 9113 §6.9,
    PROTOCOL_ERROR); h2 raised it as the connection's, whose GOAWAY cancelled and undid the
    order in flight beside it. That stream alone is reset, and the connection serves on."""
    server = await start_server("--no-access-log", "--store", "memory")

    def update_of_0(stream_id: int) -> bytes:
        return hyperframe.frame.WindowUpdateFrame(stream_id, window_increment=0).serialize()

    client, first, waiting, after = await sent_on_a_waiting_stream(server, update_of_0)
    assert client.statuses == {first: 200, after: 200}
    assert client.resets == {waiting: h2.errors.ErrorCodes.PROTOCOL_ERROR}
    assert client.goaway is None


async def test_an_http2_window_update_of_0_on_stream_0_stays_a_connection_error(
    start_server: StartServer,
) -> None:
    """On stream 0 a WINDOW_UPDATE of increment 0 is the connection's error (RFC 9113 §6.9)."""
    server = await start_server("--no-access-log", "--store", "memory")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        await client.flush()
        await stream.send_all(hyperframe.frame.WindowUpdateFrame(0).serialize())  # increment 0
        with trio.fail_after(10):
            await client.until_closed()
    assert client.goaway == h2.errors.ErrorCodes.PROTOCOL_ERROR


async def test_an_http2_stream_made_to_depend_on_itself_is_reset_alone(
    start_server: StartServer,
) -> None:
    """A stream may not depend on itself: a stream error PROTOCOL_ERROR (RFC 9113 §5.3.1).
    h2 raised a PRIORITY frame saying so as the connection's error, whose GOAWAY cancelled
    and undid the order in flight beside it. That stream alone is reset (by PRIORITY, or by
    HEADERS with a priority); on a stream not open, which no RST_STREAM may name (§6.4),
    the frame is dropped, priority being a hint. The connection serves on."""
    server = await start_server("--no-access-log", "--store", "memory")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        with trio.fail_after(10):
            first = await an_order_in_flight(client, server.url, vendor_ms=500)
            waiting = client.post(b"{", end=False)  # its body still to come
            await client.flush()
            idle = waiting + 100  # no frame has opened it
            for sid in (waiting, idle):
                itself = hyperframe.frame.PriorityFrame(sid, depends_on=sid)
                await stream.send_all(itself.serialize())
            headed = client.conn.get_next_available_stream_id()
            client.conn.send_headers(headed, HEALTHZ, end_stream=True, priority_weight=16)
            headers, length = hyperframe.frame.Frame.parse_frame_header(
                memoryview(data := client.conn.data_to_send())[:9]
            )
            assert isinstance(headers, hyperframe.frame.HeadersFrame)
            headers.parse_body(memoryview(data)[9 : 9 + length])
            headers.depends_on = headed  # which h2's client will not send
            await stream.send_all(headers.serialize())
            await client.until(lambda: first in client.ended)
            client.conn.highest_outbound_stream_id = idle
            after = client.post(json.dumps(NORMAL).encode())  # the connection serves on
            await client.until(lambda: after in client.ended and len(client.resets) == 2)
    assert client.statuses == {first: 200, after: 200}
    error = h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert client.resets == {waiting: error, headed: error}
    assert client.goaway is None


@pytest.mark.parametrize("length", [4, 6])
async def test_an_http2_priority_frame_of_a_length_other_than_5_resets_its_stream_alone(
    start_server: StartServer, length: int
) -> None:
    """A PRIORITY frame of a length other than 5 is its stream's error FRAME_SIZE_ERROR (RFC
    9113 §6.3); h2 raised it as the connection's, whose GOAWAY cancelled and undid the order
    in flight beside it. That stream alone is reset, and the connection serves on."""
    server = await start_server("--no-access-log", "--store", "memory")

    def priority_of_length(stream_id: int) -> bytes:  # type 2, no flags, then the payload
        return (
            length.to_bytes(3, "big") + b"\x02\x00" + stream_id.to_bytes(4, "big") + bytes(length)
        )

    client, first, waiting, after = await sent_on_a_waiting_stream(server, priority_of_length)
    assert client.statuses == {first: 200, after: 200}
    assert client.resets == {waiting: h2.errors.ErrorCodes.FRAME_SIZE_ERROR}
    assert client.goaway is None


async def test_an_http2_stream_over_the_concurrency_limit_is_refused_alone(
    start_server: StartServer,
) -> None:
    """A stream opened past the server's SETTINGS_MAX_CONCURRENT_STREAMS (100) is a stream
    error (RFC 9113 §5.1.2); h2 raised a connection error, whose GOAWAY cancelled and undid
    the 100 orders in flight on the connection. It is refused alone (REFUSED_STREAM: not
    processed, safe to retry), and the orders are answered."""
    server = await start_server("--no-access-log", "--store", "memory")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        with trio.fail_after(20):
            first = await an_order_in_flight(client, server.url, vendor_ms=1000)
            await client.receive()  # the server's SETTINGS, acknowledged with the next flush
            order = {**NORMAL, "delay_ms": {**NO_DELAY, "vendor": 1000}}
            others = [client.post(json.dumps({**order, "order_id": f"o{n}"}).encode())
                      for n in range(99)]  # fmt: skip
            await client.flush()
            # A client that does not keep to the limit: its h2 takes the server's as 1,000.
            limit = {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1_000}
            client.conn.remote_settings = h2.settings.Settings(False, initial_values=limit)
            extra = client.post(json.dumps({**NORMAL, "order_id": "extra"}).encode())
            await client.until(lambda: {first, *others} <= client.ended)
    assert client.statuses == dict.fromkeys([first, *others], 200)
    assert client.resets == {extra: h2.errors.ErrorCodes.REFUSED_STREAM}


async def test_an_http2_connection_serves_on_past_1000_streams(start_server: StartServer) -> None:
    """Hypercorn ended an HTTP/2 connection at its 1,001st stream (`keep_alive_max_requests`,
    which over HTTP/1.1 closes the connection after a reply): its GOAWAY named that stream
    as taken, but h2 sends nothing after a GOAWAY, so it got no reply, and the client's next
    frame ended the connection, cancelling and undoing the order in flight on it. An
    HTTP/2 connection has no such limit now: every stream is answered."""
    server = await start_server("--no-access-log", "--store", "memory")
    healthz = [(":method", "GET"), (":path", "/healthz"), (":scheme", "http"),
               (":authority", "127.0.0.1")]  # fmt: skip
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        with trio.fail_after(20):
            first = await an_order_in_flight(client, server.url, vendor_ms=5000)
            gets = []
            for _ in range(21):  # 50 at a time: within the 100 streams open at once
                batch = [client.request(healthz) for _ in range(50)]
                gets += batch
                await client.until(lambda: set(batch) <= client.ended)  # noqa: B023 # awaited here
            await client.until(lambda: first in client.ended)
    assert len(gets) == 1_050
    assert client.statuses == dict.fromkeys([first, *gets], 200)
    assert client.goaway is None


@pytest.mark.parametrize("stream_id", [201, 206], ids=["below one seen", "even"])
async def test_an_http2_stream_id_the_client_may_not_open_stays_a_connection_error(
    start_server: StartServer, stream_id: int
) -> None:
    """Past the concurrency limit too, a HEADERS frame on a stream id the client may not
    open (not above one already seen, or even: RFC 9113 §5.1.1) is the connection error
    PROTOCOL_ERROR it is below the limit; it was refused as a new stream (REFUSED_STREAM:
    not processed, safe to retry), also on a stream already answered."""
    server = await start_server("--no-access-log", "--store", "memory")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        with trio.fail_after(10):
            await client.flush()
            await client.receive()  # the server's SETTINGS
            for _ in range(100):  # the limit reached: streams without their body
                client.post(None)
            limit = {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1_000}
            client.conn.remote_settings = h2.settings.Settings(False, initial_values=limit)
            client.conn.highest_outbound_stream_id = 201
            refused = client.post(None)
            await client.until(lambda: refused in client.resets)
            frame = hyperframe.frame.HeadersFrame(stream_id, flags=["END_HEADERS"])
            request = [(":method", "GET"), (":path", "/healthz"), (":scheme", "http"),
                       (":authority", "127.0.0.1")]  # fmt: skip
            frame.data = client.conn.encoder.encode(request)
            await stream.send_all(frame.serialize())
            await client.until(lambda: client.goaway is not None)
    assert client.resets == {refused: h2.errors.ErrorCodes.REFUSED_STREAM}
    assert client.goaway == h2.errors.ErrorCodes.PROTOCOL_ERROR


def goaway(error_code: int, last_stream_id: int) -> bytes:
    """A client's GOAWAY, as bytes: h2's client takes its own GOAWAY as the connection's end
    and would refuse the replies it still waits for (python-hyper/h2#1181)."""
    frame = hyperframe.frame.GoAwayFrame(0, last_stream_id=last_stream_id, error_code=error_code)
    return frame.serialize()


@pytest.mark.parametrize("last_stream_id", [0, 3], ids=["0", "the highest"])
async def test_an_http2_client_going_away_gets_the_replies_of_its_open_streams(
    start_server: StartServer, last_stream_id: int
) -> None:
    """A client's GOAWAY(NO_ERROR) says it opens no more streams and takes none of the
    server's (RFC 9113 §6.8), as a client shutting down gracefully sends it; its open streams
    go on. h2 took it as the connection's end: hypercorn closed the connection, cancelling
    and undoing the order in flight on it. Now that order is answered, as is one whose body
    the client sends after its GOAWAY; a stream it opens after its GOAWAY is refused
    (REFUSED_STREAM: not run), and the connection is closed (the server's GOAWAY) once the
    last open stream is answered."""
    server = await start_server("--no-access-log", "--store", "memory")
    body = json.dumps({**NORMAL, "order_id": "body-after"}).encode()
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        with trio.fail_after(10):
            first = await an_order_in_flight(client, server.url, vendor_ms=1000)
            body_after = client.post(body[:5], end=False)
            await client.flush()
            await stream.send_all(goaway(h2.errors.ErrorCodes.NO_ERROR, last_stream_id))
            client.conn.send_data(body_after, body[5:], end_stream=True)
            late = client.post(json.dumps({**NORMAL, "order_id": "late"}).encode())
            await client.until(
                lambda: {first, body_after} <= client.ended and late in client.resets
            )
            await client.until_closed()
    assert client.statuses == {first: 200, body_after: 200}
    assert client.resets == {late: h2.errors.ErrorCodes.REFUSED_STREAM}
    assert client.goaway == h2.errors.ErrorCodes.NO_ERROR
    lines = await server.wait_for_lines(lambda ls: len([x for x in ls if x.get("order_id")]) == 2)
    statuses = {x["order_id"]: x["status"] for x in lines if x.get("order_id")}
    assert statuses == {"in-flight": "ok", "body-after": "ok"}  # not "late"


async def test_an_http2_client_going_away_as_its_reply_comes_gets_it_whole_and_a_goaway(
    start_server: StartServer,
) -> None:
    """A client's GOAWAY(NO_ERROR) sent as the head of its stream's reply comes (one that
    shuts down once its last request is answered): each client gets its reply whole, then
    the server's GOAWAY. The GOAWAY could reach the server once the stream was closed but
    before its reply's END_STREAM was sent (tests/test_connections.py holds it there): no
    stream open, the connection was closed at once, the reply cut off (74 clients of 100 by
    hand; here, with the access log on, 1 to 20 of 20) and the rest closed with no GOAWAY."""
    server = await start_server("--store", "memory")
    cut_off, no_goaway = [], []  # the clients whose reply lost its end; that got no GOAWAY
    for n in range(20):
        async with await trio.open_tcp_stream(*address(server.url)) as stream:
            client = RawH2(stream)
            with trio.fail_after(10):
                sid = client.post(json.dumps({**NORMAL, "order_id": f"o-{n}"}).encode())
                await client.until(lambda: sid in client.statuses)  # noqa: B023 # called here
                await stream.send_all(goaway(h2.errors.ErrorCodes.NO_ERROR, 0))
                await client.until_closed()
        assert client.statuses == {sid: 200}
        if client.ended != {sid}:
            cut_off.append(n)
        if client.goaway != h2.errors.ErrorCodes.NO_ERROR:
            no_goaway.append(n)
    assert (cut_off, no_goaway) == ([], [])


async def test_an_http2_stream_after_its_client_s_goaway_in_the_same_write_is_refused(
    start_server: StartServer,
) -> None:
    """With no stream open, a client's GOAWAY(NO_ERROR) closed the connection at once, and a
    stream in the same write after it was taken on the closed connection: neither run nor
    refused, the connection closed with no reset and no GOAWAY. It is refused
    (REFUSED_STREAM: not run, safe to retry), as after a GOAWAY with streams open, and the
    server closes the connection with its own GOAWAY."""
    server = await start_server("--no-access-log", "--store", "memory")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        preface = client.conn.data_to_send()
        late = client.post(json.dumps({**NORMAL, "order_id": "late"}).encode())
        going_away = goaway(h2.errors.ErrorCodes.NO_ERROR, 0)
        with trio.fail_after(10):
            await stream.send_all(preface + going_away + client.conn.data_to_send())
            await client.until_closed()
    assert (client.resets, client.goaway) == (
        {late: h2.errors.ErrorCodes.REFUSED_STREAM},
        h2.errors.ErrorCodes.NO_ERROR,
    )
    assert (await post(server.url, NORMAL)).status == 200
    lines = await server.wait_for_lines(lambda ls: any(x.get("order_id") for x in ls))
    assert [x["order_id"] for x in lines if x.get("order_id")] == ["normal"]


async def test_an_http2_client_gone_away_that_resets_its_last_stream_is_closed(
    start_server: StartServer,
) -> None:
    """After its GOAWAY(NO_ERROR) the client resets the one stream it had open: nothing is
    left to answer, so the connection is closed then (the server's GOAWAY), as when that
    stream is answered; the order is cancelled, as any whose client resets it."""
    server = await start_server("--no-access-log", "--store", "memory")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        with trio.fail_after(10):
            first = await an_order_in_flight(client, server.url, vendor_ms=1000)
            await stream.send_all(goaway(h2.errors.ErrorCodes.NO_ERROR, 0))
            client.conn.reset_stream(first, h2.errors.ErrorCodes.CANCEL)
            await client.flush()
            await client.until_closed()
    assert (client.statuses, client.goaway) == ({}, h2.errors.ErrorCodes.NO_ERROR)
    lines = await server.wait_for_lines(lambda ls: any(x.get("order_id") for x in ls))
    assert [x["kind"] for x in lines if x.get("order_id") == "in-flight"] == ["canceled"]


@pytest.mark.parametrize(
    "error_code",
    [h2.errors.ErrorCodes.PROTOCOL_ERROR, h2.errors.ErrorCodes.INTERNAL_ERROR],
    ids=["PROTOCOL_ERROR", "INTERNAL_ERROR"],
)
async def test_an_http2_client_going_away_on_an_error_is_a_client_that_left(
    start_server: StartServer, error_code: int
) -> None:
    """A GOAWAY with an error code is its client's connection error, after which that client
    closes the connection (RFC 9113 §5.4.1): no reply would reach it. The connection ends at
    once, and the order in flight on it is cancelled and undone, as for any client that
    leaves; the server serves on."""
    server = await start_server("--no-access-log", "--store", "memory")
    async with await trio.open_tcp_stream(*address(server.url)) as stream:
        client = RawH2(stream)
        with trio.fail_after(10):
            first = await an_order_in_flight(client, server.url, vendor_ms=1000)
            await stream.send_all(goaway(error_code, first))
            await client.until_closed()
    assert (client.statuses, client.goaway) == ({}, None)
    lines = await server.wait_for_lines(lambda ls: any(x.get("order_id") for x in ls))
    [line] = [x for x in lines if x.get("order_id") == "in-flight"]
    assert (line["status"], line["kind"]) == ("error", "canceled")
    undone = [s["compensation"]["status"] for s in line["steps"] if "compensation" in s]
    assert undone == ["ok", "ok"]  # the payment and the courier
    assert (await post(server.url, NORMAL)).status == 200
