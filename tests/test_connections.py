"""Connection handling over a real socket: closing when asked, and when idle."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hyperframe.frame
import pytest
import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.events import Closed, RawData, Updated
from hypercorn.events import Event as ConnectionEvent
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

from order_pipeline import connections
from order_pipeline.server import Settings

from .conftest import serving
from .rawhttp import address, parse, request
from .server_process import wait_for_steps_in_flight

HEADER_TIMEOUT_S = Settings().header_timeout


@pytest.fixture(name="address")
async def _address() -> AsyncIterator[tuple[str, int]]:
    """A real server on 127.0.0.1 (port 0) in this test's nursery."""
    async with serving(Settings(access_log=False)) as (_, url):
        yield address(url)


async def read_until_closed(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def until_our_settings_acknowledged(
    sock: trio.SocketStream, client: h2.connection.H2Connection
) -> None:
    """Read until the server acknowledges `client`'s SETTINGS: it has read our one write."""
    with trio.fail_after(2):
        while not any(
            isinstance(event, h2.events.SettingsAcknowledged)
            for event in client.receive_data(await sock.receive_some(65536))
        ):
            pass


async def test_connection_close_is_honoured(address: tuple[str, int]) -> None:
    """A request with `Connection: close` gets its reply and then the server closes."""
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        with trio.fail_after(1):
            reply = await read_until_closed(stream)
    assert reply.startswith(b"HTTP/1.1 200")
    assert reply.endswith(b'{"status":"ok"}')


@pytest.mark.parametrize("while_it_runs", [False, True], ids=["with it", "while it runs"])
@pytest.mark.parametrize(
    ("version", "behind"),
    [
        (b"HTTP/1.1", b"\r\n"),
        (b"HTTP/1.0", b"\r\n"),
        (b"HTTP/1.1", b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"),
    ],
    ids=["a CRLF after Connection: close", "a CRLF after HTTP/1.0", "a request after close"],
)
async def test_bytes_after_a_request_that_closes_do_not_replace_its_reply(
    version: bytes, behind: bytes, while_it_runs: bool
) -> None:
    """A request that closes its connection (`Connection: close`, or HTTP/1.0), followed by
    more bytes (a CRLF after a POST's body, as old clients send; a request the client should
    not have sent), in the same write or while its order runs: the server processes no
    further request on it (RFC 9112 §9.6), so they are dropped. h11 took them for the
    client's error: its 400 went out in place of the order's reply, and the order was
    cancelled."""
    order = b'{"order_id": "o-1", "amount": 1}'  # 200 ms: its vendor's delay
    head = request(order).replace(b"HTTP/1.1", version, 1)
    async with (
        serving(Settings(access_log=False)) as (service, url),
        await trio.open_tcp_stream(*address(url)) as stream,
    ):
        with trio.fail_after(5):
            if while_it_runs:
                await stream.send_all(head)
                await service.tracker.wait_for(lambda n: n == 3)  # its steps run
                await stream.send_all(behind)
            else:
                await stream.send_all(head + behind)
            reply = parse(await read_until_closed(stream))
    assert reply.status == 200, reply
    assert reply.json()["order_id"] == "o-1"


async def test_idle_keep_alive_connection_is_closed(address: tuple[str, int]) -> None:
    """A keep-alive connection left idle after its reply is closed after the idle limit."""
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        started = trio.current_time()
        with trio.fail_after(HEADER_TIMEOUT_S + 2):
            reply = await read_until_closed(stream)
    assert reply.startswith(b"HTTP/1.1 200")
    assert trio.current_time() - started >= HEADER_TIMEOUT_S - 0.5


async def test_a_connection_its_client_ends_before_a_request_is_closed_at_once(
    address: tuple[str, int],
) -> None:
    """A client that connects and closes (a load balancer's TCP check, a port scan) or
    half-closes before sending a request: hypercorn read the EOF but its idle timer held the
    connection, and its descriptor, in CLOSE-WAIT until the header timeout (20 such
    connections at `--header-timeout 30`: 20 descriptors for 30 s)."""
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_eof()
        started = trio.current_time()
        with trio.fail_after(HEADER_TIMEOUT_S + 2):
            assert await read_until_closed(stream) == b""
    assert trio.current_time() - started < 1


def replies_in(raw: bytes) -> list[tuple[bytes, bytes]]:
    """The status lines and bodies of the HTTP/1.1 replies in `raw`, each checked whole (its
    body as long as its Content-Length)."""
    replies = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        length = int(parse(head + b"\r\n\r\n").headers["content-length"])
        assert len(raw) >= length, f"a reply cut off: {head!r} then {len(raw)} of {length}"
        replies.append((head.partition(b"\r\n")[0], raw[:length]))
        raw = raw[length:]
    return replies


async def test_a_reply_begun_when_its_client_half_closes_is_sent_whole(
    address: tuple[str, int],
) -> None:
    """A request behind an order on its connection, then the client's half-close: the EOF,
    read as the second request is taken in, ends it as its client's leaving (README), but
    its reply's head had gone out (or went out as the EOF was read), and the close cut off
    its body: the client had a `200` head and none of the body its Content-Length promised
    (7 of 10 such connections by hand, the GET pipelined behind the order; pipelined now,
    the EOF is read while the order runs, and cancels it). A reply begun
    is now sent whole before the close, and one not begun is not sent at all (RFC 9112
    §9.3.2: the client retries what is unanswered)."""
    order = b'{"order_id": "o-%d", "amount": 1, "delay_ms": {"payment": 100}}'
    health = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    for n in range(5):
        async with await trio.open_tcp_stream(*address) as stream:
            await stream.send_all(request(order % n, close=False))
            with trio.fail_after(5):
                answered = await receive_a_reply(stream)
                await stream.send_all(health)
                await stream.send_eof()
                replies = replies_in(answered + await read_until_closed(stream))
            statuses = [status for status, _ in replies]
        assert statuses in ([b"HTTP/1.1 200 "], [b"HTTP/1.1 200 "] * 2)


async def receive_a_reply(stream: trio.SocketStream) -> bytes:
    """Read until one HTTP/1.1 reply is whole (its body as long as its Content-Length)."""
    data = b""
    while True:
        _, head_read, body = data.partition(b"\r\n\r\n")
        if head_read and len(body) >= int(parse(data).headers["content-length"]):
            return data
        data += await stream.receive_some(65536)


async def test_requests_pipelined_behind_an_order_are_answered_whole_in_order() -> None:
    """Requests pipelined behind an order, with it and while it runs (read then, and kept
    for after its reply: `_CanRead`), are each answered whole, in the order sent, on the one
    connection, which the last request's `Connection: close` ends."""
    order = b'{"order_id": "o-%d", "amount": 1, "delay_ms": {"payment": 100}}'
    health = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    async with (
        serving(Settings(access_log=False)) as (service, url),
        await trio.open_tcp_stream(*address(url)) as stream,
    ):
        await stream.send_all(request(order % 1, close=False) + health)
        with trio.fail_after(5):
            await service.tracker.wait_for(lambda n: n == 3)  # the first order runs
            await stream.send_all(request(order % 2, close=False) + health)
            await stream.send_all(request(order % 3))
            replies = replies_in(await read_until_closed(stream))
    assert [status for status, _ in replies] == [b"HTTP/1.1 200 "] * 5
    bodies = [json.loads(body) for _, body in replies]
    assert [body.get("order_id", body["status"]) for body in bodies] == [
        "o-1", "ok", "o-2", "ok", "o-3"
    ]  # fmt: skip


async def test_an_http2_client_gone_with_its_reply_held_back_is_closed_at_once(
    address: tuple[str, int],
) -> None:
    """An HTTP/2 reply its client's window holds back is given up when the client ends the
    connection; hypercorn then restarted its idle timer (no stream left: idle), which held
    the connection, and its descriptor, until the header timeout, as before a request."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    client.send_headers(1, [(":method", "GET"), (":path", "/healthz"), (":scheme", "http"),
                            (":authority", "x")], end_stream=True)  # fmt: skip
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(client.data_to_send())
        with trio.fail_after(2):  # the reply's head; its body waits for window
            while not any(
                isinstance(event, h2.events.ResponseReceived)
                for event in client.receive_data(await stream.receive_some(65536))
            ):
                pass
        await stream.send_eof()
        started = trio.current_time()
        with trio.fail_after(HEADER_TIMEOUT_S + 2):
            await read_until_closed(stream)
    assert trio.current_time() - started < 1


SHORT_IDLE_S = 1.0  # the header timeout (the idle limit) of the servers below


def http2_client(*, stream: str) -> h2.connection.H2Connection:
    """An HTTP/2 client's first bytes: its preface, then, by `stream`, no stream ("none"), a
    `GET /healthz` ("answered"), a `POST /order` whose body is still to come that it resets
    ("reset"), or one whose body runs past its Content-Length, reset by the server as
    malformed ("malformed")."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    if stream == "answered":
        client.send_headers(1, [(":method", "GET"), (":path", "/healthz"), (":scheme", "http"),
                                (":authority", "x")], end_stream=True)  # fmt: skip
    headers = [(":method", "POST"), (":path", "/order"), (":scheme", "http"),
               (":authority", "x"), ("content-length", "3")]  # fmt: skip
    if stream == "reset":
        client.send_headers(1, headers)
        client.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
    elif stream == "malformed":
        client.send_headers(1, headers)
        client.send_data(1, b'{"a": 1}')
    return client


@pytest.mark.parametrize("stream", ["none", "answered", "reset", "malformed"])
async def test_an_idle_http2_connection_is_closed_at_the_idle_limit(stream: str) -> None:
    """An HTTP/2 connection with no stream open is closed at the idle limit, as one whose
    last stream was answered is: hypercorn restarted its idle timer only when a stream was
    answered, not when one was reset (by its client, or as malformed), nor when the
    connection began (HTTP/1.1 had stopped it on the preface): such a connection, and its
    descriptor, stayed open for good (12 s and more at a 3 s limit)."""
    settings = Settings(access_log=False, header_timeout=SHORT_IDLE_S)
    async with serving(settings) as (_, url), await trio.open_tcp_stream(*address(url)) as sock:
        await sock.send_all(http2_client(stream=stream).data_to_send())
        started = trio.current_time()
        with trio.fail_after(SHORT_IDLE_S + 2):
            await read_until_closed(sock)
    assert trio.current_time() - started >= SHORT_IDLE_S - 0.5


async def test_an_idle_http2_connection_is_closed_when_the_drain_begins() -> None:
    """An HTTP/2 connection whose client reset its last stream is closed as the drain begins,
    as any idle connection is; it held the drain to the end of its grace (exit 0 only then)."""
    settings = Settings(access_log=False, shutdown_grace=5)
    drain = trio.Event()
    async with (
        serving(settings, shutdown_trigger=drain.wait) as (_, url),
        await trio.open_tcp_stream(*address(url)) as sock,
    ):
        client = http2_client(stream="reset")
        await sock.send_all(client.data_to_send())
        await until_our_settings_acknowledged(sock, client)
        drain.set()
        with trio.fail_after(2):
            await read_until_closed(sock)


async def test_a_request_read_behind_a_reply_the_drain_waits_for_does_not_hold_the_drain() -> None:
    """A request read while the reply before it on an HTTP/1.1 connection is under way
    (pipelined, or sent as that reply's end arrived) waits for the reply's cycle to end (h11
    PAUSED). In a drain the cycle ends in the connection's close, and hypercorn's reader,
    woken, found the request still PAUSED and waited again, for good: the drain held to the
    end of its grace (15.02 s in 8 of 101 SIGTERMs to a server with 200 keep-alive clients,
    and in one during a store outage). The request is not run, as on any connection the
    drain closes; the drain ends with the reply before it."""
    settings = Settings(access_log=False, shutdown_grace=5)
    drain = trio.Event()
    delays = b'"delay_ms": {"payment": 1000, "vendor": 1000, "courier": 0}'
    slow = b'{"order_id": "o-1", "amount": 1, %s}' % delays
    second = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    with trio.fail_after(4):  # within the grace
        async with (
            serving(settings, shutdown_trigger=drain.wait) as (_, url),
            await trio.open_tcp_stream(*address(url)) as sock,
        ):
            await sock.send_all(request(slow, close=False) + second)
            await wait_for_steps_in_flight(url, 2)  # the order runs, the GET waits behind it
            drain.set()
            reply = await read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 200")
    assert reply.count(b"HTTP/1.1") == 1


async def test_a_client_gone_with_a_request_pipelined_behind_its_order_frees_the_connection() -> (
    None
):
    """A client that pipelines requests behind an order, more than the server reads while the
    order runs (`PIPELINED_MAX`), and resets the connection: the server learns of it by the
    order's reply, whose write, failing, closed that stream alone; its app, cancelled as its
    client's leaving, never ended the cycle, and the reader waited for it for good: the
    connection and its socket held until the drain's grace (the drain held to its end:
    15.02 s, 4 of 5 times by hand). The connection now ends once the write fails; the
    requests behind are not run."""
    settings = Settings(access_log=False, shutdown_grace=5)
    drain = trio.Event()
    order = b'{"order_id": "o-%d", "amount": 1, "delay_ms": {"vendor": 200}}'
    health = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    behind = health * (2 * connections.PIPELINED_MAX // len(health))
    with trio.fail_after(4):  # within the grace
        async with serving(settings, shutdown_trigger=drain.wait) as (_, url):
            for _ in range(3):  # the app's end races its cancellation: each way, thrice
                sock = await trio.open_tcp_stream(*address(url))
                await sock.send_all(request(order % 0, close=False) + behind)
                await wait_for_steps_in_flight(url, 3)  # the first order runs
                reset = struct.pack("ii", 1, 0)  # SO_LINGER 0: the close is a reset
                sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
                await sock.aclose()
                await wait_for_steps_in_flight(url, 0)  # it ended: its reply's write failed
            drain.set()  # the drain waits for the connections: one held outlasts the 4 s


async def test_what_a_client_pipelines_behind_a_request_under_way_is_read_up_to_a_bound() -> None:
    """While a request runs, what its client pipelines behind it is read, so that the
    client's end is seen (`test_a_client_gone_with_a_request_pipelined_behind_its_order_...`
    in test_disconnects.py), but only up to `PIPELINED_MAX` bytes kept: a client that
    pipelines without end holds no more of the server's memory than that, and the rest waits
    in its socket, unread, for the reply, as hypercorn left it all."""
    health = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    read = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:
        """A request that runs until its client is gone."""
        while (await receive())["type"] != "http.disconnect":
            pass

    async def read_on(max_bytes: int) -> bytes:
        """The client's socket, pipelining GETs without end."""
        nonlocal read
        await trio.lowlevel.checkpoint()
        read += max_bytes
        return (health * (max_bytes // len(health) + 1))[:max_bytes]

    async def send(event: ConnectionEvent) -> None:
        pass

    async with TaskGroup() as task_group, trio.open_nursery() as reader:
        protocol = connections._H11Protocol(
            ASGIWrapper(app), Config(), WorkerContext(None), task_group,
            ConnectionState({}), False, None, None, send,
        )  # fmt: skip
        protocol.can_read.read_on = read_on
        reader.start_soon(protocol.handle, RawData(health * 2))
        with trio.fail_after(5):  # reads without a bound never block
            await trio.testing.wait_all_tasks_blocked()
        kept = len(protocol.connection.trailing_data[0])
        await protocol.handle(Closed())  # the client is gone: the request, and the wait, end
    assert (kept, read) == (connections.PIPELINED_MAX, connections.PIPELINED_MAX - len(health))


async def reply_ok(scope: Any, receive: Any, send: Any) -> None:
    """An ASGI app whose every reply is `200 ok`."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def h2_protocol(
    app: Any, context: WorkerContext, task_group: TaskGroup, send: Any
) -> connections._H2Protocol:
    """Our HTTP/2 protocol serving the ASGI `app`, writing to `send`, without a socket."""
    return connections._H2Protocol(
        ASGIWrapper(app), Config(), context, task_group,
        ConnectionState({}), False, None, None, send,
    )  # fmt: skip


def client_asking_get() -> h2.connection.H2Connection:
    """An HTTP/2 client whose first stream, 1, is a GET of `/` (sent once its data is)."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                            (":authority", "x")], end_stream=True)  # fmt: skip
    return client


def ends_of(events: list[h2.events.Event]) -> list[str]:
    """The stream ends and GOAWAYs among a client's events, in order, by name."""
    return [
        type(e).__name__
        for e in events
        if isinstance(e, h2.events.StreamEnded | h2.events.ConnectionTerminated)
    ]


async def test_an_http2_client_s_goaway_before_its_reply_s_end_is_sent_waits_for_it() -> None:
    """A client's GOAWAY(NO_ERROR) read once its stream is closed (the reply handed to the
    send task whole) but before the send task has sent the reply's end: no stream open, the
    connection was closed there, and the reply lost its last DATA and END_STREAM. Here the
    send task's write of that DATA is held, as by a socket whose buffer is full, until the
    GOAWAY is in; the reply must go out whole, then the server's GOAWAY, then the close."""
    written = bytearray()  # what reached the client: nothing written after the close
    closed = trio.Event()
    released = trio.Event()
    protocol: connections._H2Protocol

    async def send(event: ConnectionEvent) -> None:
        """The connection's socket: DATA frames wait for `released`."""
        if isinstance(event, RawData):
            if event.data[3] == hyperframe.frame.DataFrame.type:
                await released.wait()
            if not closed.is_set():
                written.extend(event.data)
        elif isinstance(event, Closed):
            closed.set()
            await protocol.handle(Closed())

    client = client_asking_get()
    async with TaskGroup() as task_group:
        protocol = h2_protocol(reply_ok, WorkerContext(None), task_group, send)
        await protocol.initiate()
        await protocol.handle(RawData(client.data_to_send()))
        await trio.testing.wait_all_tasks_blocked()  # the send task, at the reply's DATA
        assert not protocol.streams  # closed by the reply's task
        goaway = hyperframe.frame.GoAwayFrame(0, error_code=h2.errors.ErrorCodes.NO_ERROR)
        async with trio.open_nursery() as reader:
            reader.start_soon(protocol.handle, RawData(goaway.serialize()))
            await trio.testing.wait_all_tasks_blocked()
            released.set()
            with trio.fail_after(5):
                await closed.wait()
    events = client.receive_data(bytes(written))
    data = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    ended = [e.stream_id for e in events if isinstance(e, h2.events.StreamEnded)]
    goaways = [e.error_code for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert (data, ended, goaways) == (b"ok", [1], [h2.errors.ErrorCodes.NO_ERROR])


async def test_an_http2_client_gone_away_that_reads_nothing_is_left_to_the_idle_limit(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A client's GOAWAY(NO_ERROR) read with its stream open, then the reply's last DATA
    write held, as by a client that reads nothing (its socket's buffers full): the reply's
    task waited, polling every 1 ms, for the END_STREAM before closing its stream, so the
    stream stayed open, the idle timer stopped, and nothing ended the wait. Such a client
    held its connection for good (20 of them: 20 connections past a 1 s idle limit, 21 % of
    a core). The stream closes, so the idle timer runs (Updated idle), and its close ends
    the connection."""
    idle = trio.Event()  # the idle timer restarted once the stream was open
    opened = False
    closing = trio.Event()  # the idle timer's close, which ends a write under way
    protocol: connections._H2Protocol

    async def send(event: ConnectionEvent) -> None:
        """The connection's socket, full: a DATA frame's write waits for the close."""
        nonlocal opened
        if isinstance(event, RawData) and event.data[3] == hyperframe.frame.DataFrame.type:
            await closing.wait()
        elif isinstance(event, Updated):
            opened = opened or not event.idle
            if opened and event.idle:
                idle.set()

    client = client_asking_get()
    goaway = hyperframe.frame.GoAwayFrame(0, error_code=h2.errors.ErrorCodes.NO_ERROR)
    async with TaskGroup() as task_group:
        protocol = h2_protocol(reply_ok, WorkerContext(None), task_group, send)
        await protocol.initiate()
        await protocol.handle(RawData(client.data_to_send() + goaway.serialize()))
        with trio.fail_after(HEADER_TIMEOUT_S):
            await idle.wait()
        closing.set()
        await protocol.handle(Closed())  # as the idle timer's close does
    assert not protocol.streams


class FullSocket:
    """A connection's socket whose DATA frame writes wait for `released`, as when full; what
    reaches the client is kept, and nothing after the close."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.released = trio.Event()
        self.closed = False

    async def send_all(self, data: bytes) -> None:
        if data[3:4] == bytes([hyperframe.frame.DataFrame.type]):  # not an HTTP/1.1 write
            await self.released.wait()
        if self.closed:
            raise trio.ClosedResourceError
        self.written.extend(data)

    async def aclose(self) -> None:
        self.closed = True


def served_over(
    socket: FullSocket, app: Any, context: WorkerContext, task_group: TaskGroup
) -> tuple[connections._OneConnection, connections._H2Protocol]:
    """`app` served over HTTP/2 on `socket` as hypercorn's Trio worker does it (its idle timer
    and close included), but without its reads: the connection, and its protocol, to be
    handed the client's."""
    connection = connections._OneConnection(
        ASGIWrapper(app),
        Config(),
        context,
        {},
        socket,  # type: ignore[arg-type]
    )
    connection._task_group = task_group
    protocol = h2_protocol(app, context, task_group, connection.protocol_send)
    wrapper = SimpleNamespace(protocol=protocol, handle=protocol.handle)
    connection.protocol = wrapper  # type: ignore[assignment]
    return connection, protocol


async def test_a_drain_begun_before_a_reply_s_end_is_sent_sends_it_before_the_goaway() -> None:
    """The drain closes an idle HTTP/2 connection at once, GOAWAY first. A stream is closed
    (the connection idle) once its reply is handed to the send task whole, before the send
    task sends the last DATA and its END_STREAM; a drain begun in between closed the
    connection there, and after its GOAWAY h2 refused the END_STREAM: a reply cut off
    though the GOAWAY named its stream taken (by hand, 30 clients reading slowly in a GET
    loop at a drain: 11 or 12 of 30 cut off). Here the last DATA's write is held until the
    drain has begun; the reply must go out whole, then the GOAWAY."""
    socket = FullSocket()
    context = WorkerContext(None)
    client = client_asking_get()
    async with TaskGroup() as task_group:
        _, protocol = served_over(socket, reply_ok, context, task_group)
        await protocol.initiate()
        await protocol.handle(RawData(client.data_to_send()))
        await trio.testing.wait_all_tasks_blocked()  # the send task, at the reply's DATA
        assert not protocol.streams  # closed by the reply's task: the idle timer runs
        await context.terminated.set()  # the drain begins: the idle timer closes
        await trio.testing.wait_all_tasks_blocked()
        socket.released.set()
    events = client.receive_data(bytes(socket.written))
    ends = ends_of(events)
    assert ends == ["StreamEnded", "ConnectionTerminated"]


async def test_a_stream_opened_as_the_idle_timer_fires_is_answered_before_the_close() -> None:
    """The idle timer fires (at the idle limit, or at once as the drain begins) as a new
    stream's request is taken in, before that stream stops the timer: the timer's close,
    shielded, ran on with the stream open, its GOAWAY naming that stream taken, then cut
    it off, the order cancelled as for a client that left (by hand, 30 clients in a GET
    loop at a drain: a stream open at 1 or 2 of the 30 closes, in each of 3 runs). Here the
    close runs with the stream open, as the timer's that fired just before it opened; the
    stream is answered, then the drain's GOAWAY closes the connection."""
    socket = FullSocket()
    socket.released.set()
    context = WorkerContext(None)
    answer = trio.Event()

    async def reply_when_told(scope: Any, receive: Any, send: Any) -> None:
        await answer.wait()
        await reply_ok(scope, receive, send)

    client = client_asking_get()
    async with TaskGroup() as task_group:
        connection, protocol = served_over(socket, reply_when_told, context, task_group)
        await protocol.initiate()
        await protocol.handle(RawData(client.data_to_send()))
        await context.terminated.set()  # the drain begins
        async with trio.open_nursery() as timer:
            timer.start_soon(connection._initiate_server_close)  # it fired as the stream opened
            await trio.testing.wait_all_tasks_blocked()
            answer.set()
    events = client.receive_data(bytes(socket.written))
    data = b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived))
    ends = ends_of(events)
    assert (data, ends, socket.closed) == (b"ok", ["StreamEnded", "ConnectionTerminated"], True)


async def test_a_request_taken_in_as_the_idle_timer_fires_is_answered_before_the_close() -> None:
    """HTTP/1.1, as HTTP/2 above: the idle timer fires (at the idle limit, or at once as the
    drain begins) as a request on a keep-alive connection is taken in, before the request
    stops the timer. The timer's close, shielded, ran on with the request under way and cut
    it off: its order, begun, was cancelled as for a client that left, and its key replayed
    `canceled` to the client's retry (`nox -s chaos` with drains, seed 104: an order begun
    60 ms into a drain, cancelled 8 ms later, `cancelled by their clients: 1`). Here the
    close runs with the request under way, as the timer's that fired just before it was
    taken in; the request is answered, then the drain closes the connection."""
    socket = FullSocket()
    socket.released.set()
    context = WorkerContext(None)
    answer = trio.Event()

    async def reply_when_told(scope: Any, receive: Any, send: Any) -> None:
        await answer.wait()
        headers = [(b"content-length", b"8")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"answered"})

    async with TaskGroup() as task_group:
        connection = connections._OneConnection(
            ASGIWrapper(reply_when_told), Config(), context, {}, socket,  # type: ignore[arg-type]
        )  # fmt: skip
        connection._task_group = task_group
        protocol = connections._H11Protocol(
            ASGIWrapper(reply_when_told), Config(), context, task_group,
            ConnectionState({}), False, None, None, connection.protocol_send,
        )  # fmt: skip
        connection.protocol = SimpleNamespace(protocol=protocol, handle=protocol.handle)  # type: ignore[assignment]
        await protocol.handle(RawData(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
        await context.terminated.set()  # the drain begins
        async with trio.open_nursery() as timer:
            timer.start_soon(connection._initiate_server_close)  # it fired as the request came
            await trio.testing.wait_all_tasks_blocked()
            answer.set()
    written = bytes(socket.written)
    assert written.startswith(b"HTTP/1.1 200 "), written  # b"": cut off, nothing sent
    assert (parse(written).body, socket.closed) == (b"answered", True)


async def test_a_drain_begun_as_a_stream_closes_sends_its_reply_s_end_before_the_goaway() -> None:
    """In a drain hypercorn closes an HTTP/2 connection (GOAWAY) as its last stream closes,
    once the drain has begun: it looked after an await in the stream's close, where the
    wait for the reply's END_STREAM before it (`stream_send`) looked before, so a drain
    begun in between sent the GOAWAY with the END_STREAM pending, which h2 then refused: the
    reply cut off, its stream named taken (by hand, 30 clients in a GET loop at a drain: 0
    to 3 of 30 cut off so in 6 runs). Here the drain begins in the stream's close, the last
    DATA's write held till then; the reply must go out whole, then the GOAWAY."""
    socket = FullSocket()
    context = WorkerContext(None)
    client = client_asking_get()
    async with TaskGroup() as task_group:
        _, protocol = served_over(socket, reply_ok, context, task_group)
        close_stream = protocol._close_stream

        async def close_stream_as_the_drain_begins(stream_id: int) -> None:
            await close_stream(stream_id)
            await context.terminated.set()

        protocol._close_stream = close_stream_as_the_drain_begins  # type: ignore[method-assign]
        await protocol.initiate()
        await protocol.handle(RawData(client.data_to_send()))
        await trio.testing.wait_all_tasks_blocked()  # the send task, at the reply's DATA
        socket.released.set()
    events = client.receive_data(bytes(socket.written))
    ends = ends_of(events)
    assert (ends, socket.closed) == (["StreamEnded", "ConnectionTerminated"], True)


async def test_a_stream_crossing_the_idle_close_s_goaway_is_dropped_not_a_protocol_error() -> None:
    """A client's stream sent as an idle connection's close came (its GOAWAY names the last
    stream taken, RFC 9113 §6.8) reached h2 after that GOAWAY, which h2 took for the
    client's protocol error: a second GOAWAY, PROTOCOL_ERROR, to a client that had done
    nothing wrong (by hand, 30 clients in a GET loop at a drain: 18 to 21 of 30 got it).
    What comes after the server's GOAWAY is dropped (§6.8: it may be discarded); the
    close goes on."""
    written = bytearray()
    ended = trio.Event()

    async def send(event: ConnectionEvent) -> None:
        if isinstance(event, RawData):
            written.extend(event.data)
        elif isinstance(event, Closed):
            ended.set()

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    async with TaskGroup() as task_group:
        protocol = h2_protocol(reply_ok, WorkerContext(None), task_group, send)
        await protocol.initiate()
        await protocol.handle(RawData(client.data_to_send()))
        written.extend(protocol.goaway())  # the idle close's, as `_OneConnection` sends it
        client.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                                (":authority", "x")], end_stream=True)  # fmt: skip
        await protocol.handle(RawData(client.data_to_send()))
        await protocol.handle(Closed())  # the close
    events = client.receive_data(bytes(written))
    goaways = [e.error_code for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert (goaways, ended.is_set()) == ([h2.errors.ErrorCodes.NO_ERROR], False)


BYTES_PAST_THE_BUFFERS = 32 * 1024 * 1024  # more than loopback's socket buffers hold (4 + 6 MiB)


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (request(b"", extra=b"Content-Length: %d\r\n" % BYTES_PAST_THE_BUFFERS), 413),
        (b"POST /order HTTP/1.1\r\nHost: t\r\nContent-Length: many\r\n\r\n", 400),
    ],
    ids=["a body over the limit", "a malformed request"],
)
async def test_a_reply_that_closes_its_connection_reaches_a_client_still_sending(
    address: tuple[str, int], head: bytes, status: int
) -> None:
    """A 413 goes out on the Content-Length (a 400 on a malformed request), and the
    connection is closed, while the client still sends what follows: closed with those bytes
    unread, the server's kernel reset the connection (RST, not FIN), and the client's write
    failed (`Broken pipe`) before it read its reply. The server reads on and drops them."""
    async with await trio.open_tcp_stream(*address) as stream:
        with trio.fail_after(10):
            await stream.send_all(head + b" " * BYTES_PAST_THE_BUFFERS)
            reply = parse(await read_until_closed(stream))
    assert (reply.status, reply.headers["connection"]) == (status, "close")


async def test_a_client_sending_on_after_its_connection_s_close_is_closed_after_the_linger(
    address: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a client sends after the close is read and dropped for `LINGER_S` at most: one
    that sends for ever does not hold its connection (nor a drain) beyond that."""
    monkeypatch.setattr(connections, "LINGER_S", 0.5)
    head = request(b"", extra=b"Content-Length: %d\r\n" % (2 * BYTES_PAST_THE_BUFFERS))
    async with await trio.open_tcp_stream(*address) as stream:
        await stream.send_all(head)
        started = trio.current_time()

        async def send_for_ever() -> None:
            while True:
                await stream.send_all(b" " * 65536)

        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await send_for_ever()
    assert trio.current_time() - started < 0.5 + 1


async def test_an_http2_client_still_sending_at_the_drain_gets_its_goaway() -> None:
    """An idle HTTP/2 connection is sent GOAWAY and closed as the drain begins: closed with
    its client's bytes unread (a stream crossing the GOAWAY; here frames of a type the server
    ignores), it was reset, and the client's write failed (`Broken pipe`) before it read the
    GOAWAY. The server reads on and drops them: the client reads its GOAWAY, then the end."""
    unknown_frame = b"\x00\x40\x00\xfa\x00\x00\x00\x00\x00" + bytes(16384)  # RFC 9113 §4.1
    settings = Settings(access_log=False, shutdown_grace=5)
    drain = trio.Event()
    async with (
        serving(settings, shutdown_trigger=drain.wait) as (_, url),
        await trio.open_tcp_stream(*address(url)) as sock,
    ):
        client = http2_client(stream="none")
        await sock.send_all(client.data_to_send())
        await until_our_settings_acknowledged(sock, client)
        drain.set()
        with trio.fail_after(10):
            await sock.send_all(unknown_frame * (BYTES_PAST_THE_BUFFERS // len(unknown_frame)))
            events = client.receive_data(await read_until_closed(sock))
    (goaway,) = events
    assert isinstance(goaway, h2.events.ConnectionTerminated)
    assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR


async def test_a_client_that_never_ends_its_connection_does_not_hold_the_drain_s_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An order in flight as the drain begins is answered (`Connection: close`), and its
    connection closed (EOF), then read on for its client's end only while the drain waits
    for another connection: a client that neither reads on nor closes held the drain for
    `LINGER_S` (or the grace, if shorter); with no other left, the drain ends with the
    reply. (An idle connection is not lingered on:
    `test_an_idle_http1_connection_is_closed_at_the_drain_without_the_linger`; one lingering
    while another holds the drain: test_drain.py.)"""
    monkeypatch.setattr(connections, "LINGER_S", 5.0)
    settings = Settings(access_log=False, shutdown_grace=5.0)
    drain = trio.Event()
    order = b'{"order_id": "o-1", "amount": 1}'  # 200 ms: its vendor's delay
    async with contextlib.AsyncExitStack() as client:  # open after the server has ended
        async with serving(settings, shutdown_trigger=drain.wait) as (_, url):
            sock = await client.enter_async_context(await trio.open_tcp_stream(*address(url)))
            await sock.send_all(request(order, close=False))
            await wait_for_steps_in_flight(url, 3)  # the order runs: the drain waits for it
            drain.set()
            with trio.fail_after(5):
                reply = parse(await receive_a_reply(sock))
            replied = trio.current_time()
        held = trio.current_time() - replied
    assert (reply.status, reply.headers["connection"], held < 0.5) == (200, "close", True)


async def test_an_idle_http1_connection_is_closed_at_the_drain_without_the_linger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An idle HTTP/1.1 keep-alive connection (a pool's, between requests) is closed at once
    at the drain: no request is under way, so nothing its client sends is a request's rest
    to be read past. With the linger there, each pooled client held the drain for it
    (measured: 0.07 s before, 2.03 s with it, for ten clients)."""
    monkeypatch.setattr(connections, "LINGER_S", 5.0)
    settings = Settings(access_log=False, shutdown_grace=5.0)
    drain = trio.Event()
    async with contextlib.AsyncExitStack() as client:  # open after the server has ended
        async with serving(settings, shutdown_trigger=drain.wait) as (_, url):
            sock = await client.enter_async_context(await trio.open_tcp_stream(*address(url)))
            await sock.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while not reply.endswith(b'{"status":"ok"}'):
                reply += await sock.receive_some(65536)
            drain.set()
            began = trio.current_time()
        assert trio.current_time() - began < 1
        assert await sock.receive_some(65536) == b""  # the server's end, not a reset


async def test_an_idle_close_s_goaway_made_as_a_gone_away_close_waits_is_the_only_one() -> None:
    """A client's GOAWAY(NO_ERROR) read once its stream is closed but before the reply's
    END_STREAM is sent: the close after it (`_close_once_gone_away`) waits for that end, as
    an idle close (the drain's, or at the idle limit) begun meanwhile does. Once the end
    was sent, the idle close, back first, made its GOAWAY; the other, back next, asked only
    whether it had closed the connection itself, and made a second GOAWAY and a second
    close. Here the idle close's GOAWAY is made as the end is written, before the other is
    back; it is the only one, and the close is the idle close's."""
    written = bytearray()
    closed = trio.Event()
    released = trio.Event()
    protocol: connections._H2Protocol

    async def send(event: ConnectionEvent) -> None:
        """The connection's socket: DATA frames wait for `released`; the idle close's GOAWAY
        (as `_OneConnection` sends it) is made as the reply's END_STREAM is written."""
        if isinstance(event, RawData):
            if event.data[3] == hyperframe.frame.DataFrame.type:
                await released.wait()
            written.extend(event.data)
            if ends_a_stream(event.data):
                written.extend(protocol.goaway())
        elif isinstance(event, Closed):
            closed.set()

    client = client_asking_get()
    goaway = hyperframe.frame.GoAwayFrame(0, error_code=h2.errors.ErrorCodes.NO_ERROR)
    async with TaskGroup() as task_group:
        protocol = h2_protocol(reply_ok, WorkerContext(None), task_group, send)
        await protocol.initiate()
        await protocol.handle(RawData(client.data_to_send()))
        await trio.testing.wait_all_tasks_blocked()  # the send task, at the reply's DATA
        async with trio.open_nursery() as reader:
            reader.start_soon(protocol.handle, RawData(goaway.serialize()))
            await trio.testing.wait_all_tasks_blocked()  # its close waits for the reply's end
            released.set()
        await protocol.handle(Closed())  # the idle close's close
    events = client.receive_data(bytes(written))
    goaways = [e.error_code for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert (ends_of(events), goaways, closed.is_set()) == (
        ["StreamEnded", "ConnectionTerminated"],
        [h2.errors.ErrorCodes.NO_ERROR],
        False,
    )


def ends_a_stream(data: bytes) -> bool:
    """Whether `data`, one write, is a DATA frame with END_STREAM (a reply's end)."""
    return data[3] == hyperframe.frame.DataFrame.type and bool(data[4] & 0x1)


async def test_an_idle_close_s_goaway_made_as_the_drain_s_close_waits_is_the_only_one() -> None:
    """In a drain the last stream's close waits for every reply's END_STREAM before it makes
    the connection's GOAWAY (`stream_send`); an idle close (the drain's, which that stream's
    reset by its client starts, or the idle timer's that fired as it opened) waits for the
    same end, bounded, then makes its own. The stream's close, back after it, asked nothing
    and made a second GOAWAY. Here the idle close's GOAWAY is made as the end is written,
    before the stream's close is back; it is the only one."""
    written = bytearray()
    released = trio.Event()
    answer = trio.Event()
    context = WorkerContext(None)
    protocol: connections._H2Protocol

    async def send(event: ConnectionEvent) -> None:
        """The connection's socket: DATA frames wait for `released`; the idle close's GOAWAY
        (as `_OneConnection` sends it) is made as the reply's END_STREAM is written."""
        if isinstance(event, RawData):
            if event.data[3] == hyperframe.frame.DataFrame.type:
                await released.wait()
            written.extend(event.data)
            if ends_a_stream(event.data):
                written.extend(protocol.goaway())

    async def reply_when_told(scope: Any, receive: Any, send: Any) -> None:
        await answer.wait()
        await reply_ok(scope, receive, send)

    client = client_asking_get()
    async with TaskGroup() as task_group:
        protocol = h2_protocol(reply_when_told, context, task_group, send)
        await protocol.initiate()
        await protocol.handle(RawData(client.data_to_send()))
        await context.terminated.set()  # the drain begins, the stream open
        answer.set()
        await trio.testing.wait_all_tasks_blocked()  # the send task at the DATA; the close waits
        assert not protocol.streams
        released.set()
        await trio.testing.wait_all_tasks_blocked()
        await protocol.handle(Closed())  # the idle close's close
    events = client.receive_data(bytes(written))
    goaways = [e.error_code for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert (ends_of(events), goaways) == (
        ["StreamEnded", "ConnectionTerminated"],
        [h2.errors.ErrorCodes.NO_ERROR],
    )


class StepsCounted(trio.abc.Instrument):
    """Counts the steps Trio runs of every task but the one that counts."""

    def __init__(self) -> None:
        self.counting = trio.lowlevel.current_task()
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is not self.counting:
            self.steps += 1


@pytest.mark.parametrize("waiting", ["gone away", "draining"])
async def test_a_close_waiting_for_a_reply_s_end_sleeps_until_it_is_sent(
    autojump_clock: trio.abc.Clock, waiting: str
) -> None:
    """A close that waits for a reply's END_STREAM (after the client's GOAWAY(NO_ERROR), or
    the drain's, once the last stream is closed) looked for it every 1 ms: with clients
    that read nothing (their sockets' buffers full), until the idle limit or the drain's
    grace, 20 such connections took 0.91 s of CPU in 2 s. Here the reply's DATA write is
    held for 1 s (Trio's clock): no task of the connection runs meanwhile (it polled 1,000
    times), and once the write goes, the close wakes and makes its GOAWAY."""
    written = bytearray()
    released = trio.Event()
    answer = trio.Event()
    goaway_made = trio.Event()
    context = WorkerContext(None)

    async def send(event: ConnectionEvent) -> None:
        """The connection's socket: DATA frames wait for `released`."""
        if isinstance(event, RawData):
            if event.data[3] == hyperframe.frame.DataFrame.type:
                await released.wait()
            written.extend(event.data)
            if event.data[3] == hyperframe.frame.GoAwayFrame.type:
                goaway_made.set()

    async def reply_when_told(scope: Any, receive: Any, send: Any) -> None:
        await answer.wait()
        await reply_ok(scope, receive, send)

    client = client_asking_get()
    goaway = hyperframe.frame.GoAwayFrame(0, error_code=h2.errors.ErrorCodes.NO_ERROR)
    async with TaskGroup() as task_group:
        protocol = h2_protocol(reply_when_told, context, task_group, send)
        await protocol.initiate()
        await protocol.handle(RawData(client.data_to_send()))
        if waiting == "gone away":
            await protocol.handle(RawData(goaway.serialize()))
        else:
            await context.terminated.set()  # the drain begins, the stream open
        answer.set()
        await trio.testing.wait_all_tasks_blocked()  # the send task at the DATA; the close waits
        assert not protocol.streams
        assert protocol._ending(1)
        counted = StepsCounted()
        trio.lowlevel.add_instrument(counted)
        try:
            await trio.sleep(1)
        finally:
            trio.lowlevel.remove_instrument(counted)
        assert counted.steps == 0
        released.set()
        with trio.fail_after(0.1):
            await goaway_made.wait()
        await protocol.handle(Closed())  # the connection's close
    assert ends_of(client.receive_data(bytes(written))) == ["StreamEnded", "ConnectionTerminated"]


@pytest.mark.parametrize("ending", ["closed", "given up"])
@pytest.mark.parametrize("waiting", ["gone away", "draining"])
async def test_a_close_waiting_for_a_reply_s_end_wakes_as_the_connection_closes(
    waiting: str, ending: str
) -> None:
    """A close that waits for a reply's END_STREAM (after the client's GOAWAY(NO_ERROR), or
    the drain's, once the last stream is closed) sleeps until the send task sends it, or
    the connection closes (hypercorn's close, the idle close's or the client's; the replies
    given up at the drain's grace end). Here the send task's write of the reply's DATA is
    held for good, as by a client that reads nothing: only the close can end the wait, and
    the reply's task, waiting, returns."""
    released = trio.Event()
    answer = trio.Event()
    replied = trio.Event()
    context = WorkerContext(None)

    async def send(event: ConnectionEvent) -> None:
        """The connection's socket: DATA frames wait for `released`."""
        if isinstance(event, RawData) and event.data[3] == hyperframe.frame.DataFrame.type:
            await released.wait()

    async def reply_when_told(scope: Any, receive: Any, send: Any) -> None:
        await answer.wait()
        await reply_ok(scope, receive, send)
        replied.set()

    client = client_asking_get()
    goaway = hyperframe.frame.GoAwayFrame(0, error_code=h2.errors.ErrorCodes.NO_ERROR)
    async with TaskGroup() as task_group:
        protocol = h2_protocol(reply_when_told, context, task_group, send)
        await protocol.initiate()
        await protocol.handle(RawData(client.data_to_send()))
        if waiting == "gone away":
            await protocol.handle(RawData(goaway.serialize()))
        else:
            await context.terminated.set()  # the drain begins, the stream open
        answer.set()
        await trio.testing.wait_all_tasks_blocked()  # the send task at the DATA; the close waits
        assert protocol._ending(1)
        assert not replied.is_set()
        if ending == "closed":
            await protocol.handle(Closed())
        else:
            await protocol.give_up_replies()
        await trio.testing.wait_all_tasks_blocked()
        assert replied.is_set()
        released.set()
        await protocol.handle(Closed())
