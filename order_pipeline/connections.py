"""Hypercorn's connection handling, mended where it failed a connection, or every order on it.

`install` puts these in hypercorn's place; `server` does it when imported. One connection's
unexpected error ends that connection alone (`_OneConnection`); over HTTP/1.1 a reply under
way ends whole before a close, a body over the limit gets its 413 instead of a 100, an
h2c upgrade whose settings h2 refuses its 400 instead of a 101, and a WebSocket handshake
is served as any request (`_H11Protocol`), and bytes after a request that closes its
connection are not taken for one (`_H11Connection`); over HTTP/2, where a CONNECT is a
plain request too, a malformed stream is that stream's error alone, as RFC 9113 makes it,
not the whole connection's, a client's GOAWAY(NO_ERROR) leaves its open streams to be
answered, a connection with no stream open is closed at the idle limit (GOAWAY first), and
a reply its client does not read is given up when the client goes or the drain's grace
ends (`_H2Protocol`). They rely on internals of hypercorn, h2, h11, hyperframe and
priority: pyproject.toml holds each to the versions the tests pass on, and says which tests
and why. A version that renames them fails those tests, not silently.

A connection closed is read on, briefly, until its client's end, so that a client still
sending reads its reply rather than a reset (`_OneConnection._close`); in a drain, an
HTTP/1.1 one only while another connection holds the drain, its replies there saying
`Connection: close` (`_OneConnection._linger`). An HTTP/1.1 request with another pipelined
behind it is read on too, to a bound, so that its client's leaving cancels it (`_CanRead`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import weakref
from collections.abc import Awaitable, Callable
from math import inf
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.frame_buffer
import h2.settings
import h2.stream
import h11
import hypercorn.protocol
import hypercorn.protocol.h2
import hypercorn.trio.run
import hyperframe.exceptions
import hyperframe.frame
import priority.priority
import trio
from hypercorn.events import Closed, RawData, Updated
from hypercorn.events import Event as ConnectionEvent
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.events import Response, StreamClosed
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.protocol.ws_stream import WSStream
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import EventWrapper, WorkerContext
from hypercorn.typing import H11SendableEvent

from .http.app import MAX_BODY_BYTES

__all__ = ["install"]

log = logging.getLogger(__name__)

WINDOW_UPDATE = hyperframe.frame.WindowUpdateFrame.type
PRIORITY = hyperframe.frame.PriorityFrame.type

# How long a GOAWAY may wait to be written before an idle connection's close: a client that
# reads nothing (its socket's buffers full) must not hold the close, nor the drain.
GOAWAY_WAIT_S = 0.1

# How long a closed connection is still read, what comes dropped, for its client's EOF: a
# client that sends on (or never closes) must not hold the connection, nor the drain.
LINGER_S = 2.0

# How much of what an HTTP/1.1 client sends behind a request under way is read while that
# request runs, for the client's end (`_CanRead`): no more than one read of hypercorn's could
# already leave unhandled; past it the reads wait for the reply, as hypercorn's did at once.
PIPELINED_MAX = MAX_RECV

_CONNECTION_CLOSE = (b"connection", b"close")


class _OneConnection(TCPServer):
    """Hypercorn's handler of one connection, whose unexpected error ends that connection alone.

    Hypercorn's Trio worker serves every connection in one nursery, so an error in one
    connection's handler ended the server, orders in flight included; one HTTP/2 request
    was enough (a body sent on after the 413 that refused it: a KeyError in hypercorn's h2
    code, pgjones/hypercorn#334). Cancellation still passes.
    """

    _reads_ended = False  # the reader has stopped: the client's EOF or reset, a read timeout,
    # the linger's end, or cancellation
    _close_begun = False  # the close has begun: what is read from then on is dropped
    _lingering: trio.CancelScope | None = None  # the reads, given a deadline by the close
    _lingers = True  # whether the close lingers: not an idle HTTP/1.1 connection's
    _ended = False  # the client's end is read: every read from then on returns it (`_receive`)
    _end: bytes | None = b""  # that end: b"" its EOF; None a reset, the stream closed, a timeout
    _busy = False  # counted among the connections a drain waits for (`_Busy`)
    _drain_watch: trio.CancelScope | None = None  # the linger's watch for the drain's end

    async def run(self) -> None:
        self._busy = True
        _busy_of(self.context).count_in(1)
        try:
            await super().run()
        except Exception:
            log.exception("a connection failed in the HTTP server: closed it alone")
        finally:
            self._not_busy()

    async def _read_data(self) -> None:
        """Hypercorn's reads (its loop, below), but cancelled (the drain's grace is over, or a
        second signal), an HTTP/2 reply its client does not read is given up: it waited,
        shielded, to be sent, and held the drain to its hard deadline (the order was final
        and recorded).

        An HTTP/1.1 request waiting behind another (h11 PAUSED) has the reads go on meanwhile,
        for the client's end (`_CanRead`).

        Once the close has begun, what is read is dropped, until the client's EOF or the
        linger's end (`_close`). Once the reads have ended, the idle timer is stopped, and
        not restarted (`protocol_send`): hypercorn left it running, and it held a connection
        its client had closed before a request (a load balancer's TCP check), and its
        descriptor, until the header timeout."""
        self._lingering = trio.CancelScope()
        if isinstance(self.protocol.protocol, _H11Protocol):
            self.protocol.protocol.can_read.read_on = self._receive
        try:
            with self._lingering:
                await self._read_until_the_client_ends()
        except trio.Cancelled:
            if isinstance(self.protocol.protocol, _H2Protocol):
                await self.protocol.protocol.give_up_replies()
            raise
        finally:
            self._reads_ended = True
            if self._drain_watch is not None:
                self._drain_watch.cancel()
        await self.idle_task.stop()

    async def _read_until_the_client_ends(self) -> None:
        while (data := await self._receive()) is not None:
            if not self._close_begun:
                await self.protocol.handle(RawData(data))
            if data == b"":
                break
        await self.protocol.handle(Closed())

    async def _receive(self, max_bytes: int = MAX_RECV) -> bytes | None:
        """One read: what the client sent, b"" at its EOF, None once the connection is gone (a
        reset, the stream closed) or silent past the read timeout. Once the client's end is
        read, every read returns it again: one read while a request runs (`_CanRead`) leaves
        it to the reader, whose read then ends the request as its client's leaving."""
        if not self._ended:
            try:
                with trio.fail_after(self.config.read_timeout or inf):
                    data = bytes(await self.stream.receive_some(max_bytes))
            except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                data = None
            if data:
                return data
            self._ended, self._end = True, data
        return self._end

    async def protocol_send(self, event: ConnectionEvent) -> None:
        """Hypercorn's, but once the reads have ended the idle timer stays stopped: an HTTP/2
        reply given up after its client left (held back by its window) ends its stream, and
        the connection, idle again, restarted the timer, which held it until the header
        timeout. Nothing is left to wait for: the connection closes when its tasks end."""
        if isinstance(event, Updated) and self._reads_ended:
            return
        await super().protocol_send(event)

    async def _initiate_server_close(self) -> None:
        """Hypercorn's close of an idle connection (at the idle limit, or the drain), an HTTP/2
        one told GOAWAY first, which names the last stream taken (RFC 9113 §6.8, §9.1): a
        bare close left a client whose stream crossed it unsure whether that stream ran
        (httpx: `Server disconnected`), where the drain refuses one on a busy connection as
        not processed. The GOAWAY waits for the END_STREAM of a reply handed over whole
        (`replies_ended`), and is written directly; each wait bounded, for a client that
        reads nothing: hypercorn shields its writes.

        A stream opened as the timer fired (before it stopped the timer) keeps the
        connection: the close, shielded, ran on, naming that stream taken and cutting it
        off. Its end restarts the timer, and in a drain closes the connection.

        An HTTP/1.1 one is closed without the linger (`_close`): no request is under way,
        so nothing its client sends is the rest of one; lingering held each pool's idle
        connection, and so the drain, for `LINGER_S` (0.07 s to 2.03 s with ten clients).
        A request taken in as the timer fired keeps it, as a stream keeps an HTTP/2 one: the
        close cut the request off, its order cancelled as for a client that left (its key
        then replayed `canceled`); its reply's end restarts the timer, or closes in a drain."""
        protocol = self.protocol.protocol
        if not isinstance(protocol, _H2Protocol):
            if isinstance(protocol, _H11Protocol) and not protocol.idle:
                return
            self._lingers = False
        else:
            with trio.move_on_after(GOAWAY_WAIT_S):
                await protocol.replies_ended()
            if not protocol.idle:
                return
            with trio.move_on_after(GOAWAY_WAIT_S):
                if goaway := protocol.goaway():
                    async with self.send_lock:
                        with contextlib.suppress(
                            trio.BrokenResourceError, trio.ClosedResourceError
                        ):
                            await self.stream.send_all(goaway)
        await self.protocol.handle(Closed())  # hypercorn's, then its close lingers (`_close`)
        await self._close()

    async def _close(self) -> None:
        """Hypercorn's close, its EOF sent under the lock its writes take, and then, while
        the client has not ended the connection, a lingering close (as Apache's and nginx's).

        `send_eof` holds the stream across a checkpoint; hypercorn calls it without
        `send_lock`, so a write by the other task (the app's reply, or the reader's 400 when
        a client ends its body early) raised BusyResourceError: "Error in ASGI Framework",
        or the connection's handler failing. A write under way (or waiting to start) keeps
        the lock: the stream is closed without the EOF, as hypercorn does when send_eof
        finds it busy, and that write ends in ClosedResourceError, which hypercorn handles.

        A socket closed with bytes unread (a body sent on after its 413, a pipelined request,
        a stream crossing an HTTP/2 GOAWAY) is reset by the kernel, not ended: the client's
        write failed (`Broken pipe`, `Connection reset`) before it read its reply, and what
        of the reply was still in the server's buffers was lost. After the EOF the reader
        reads on and drops what it reads (`_read_data`), until the client's EOF or for
        `LINGER_S` at most; the stream is closed once the connection's tasks end. A client
        already gone (its EOF read) is closed at once; cancellation ends the linger.
        """
        self._close_begun = True
        if self.send_lock.locked():
            await self.stream.aclose()
            return
        eof_sent = False
        self.send_lock.acquire_nowait()
        try:
            with contextlib.suppress(  # hypercorn's, which then closes at once
                trio.BrokenResourceError,
                trio.BusyResourceError,
                trio.ClosedResourceError,
                AttributeError,  # TLS: no half-close
            ):
                await self.stream.send_eof()
                eof_sent = True
        finally:
            self.send_lock.release()
            if not (eof_sent and self._linger()):
                await self.stream.aclose()  # also if cancelled at send_eof's checkpoint

    def _linger(self) -> bool:
        """Have the reader read on until the client's EOF, `LINGER_S` at most; False if the
        reads have ended (or never began), and so nothing is left to wait for, or the close
        is not to linger (an idle HTTP/1.1 connection's, `_initiate_server_close`).

        An HTTP/1.1 connection lingers after its last reply is sent: a drain does not wait
        for it, but ends its linger once it waits for no other connection (`_Busy`). A client
        that never noticed the end (a raw socket; its reply said `Connection: close`) held
        the drain's end `LINGER_S`; lingering while other connections hold the drain costs
        nothing. HTTP/2's lingers hold the drain as before."""
        if self._lingering is None or self._reads_ended or not self._lingers:
            return False
        end = trio.current_time() + LINGER_S
        self._lingering.deadline = min(self._lingering.deadline, end)
        if isinstance(self.protocol.protocol, _H11Protocol) and self._busy:
            self._not_busy()
            self._drain_watch = trio.CancelScope()
            self._task_group.spawn(self._end_at_the_drain_s_end, self._drain_watch, self._lingering)
        return True

    async def _end_at_the_drain_s_end(
        self, watch: trio.CancelScope, lingering: trio.CancelScope
    ) -> None:
        """End the linger once a drain waits for no connection; `watch` ends with the reads."""
        with watch:
            await self.context.terminated.wait()
            await _busy_of(self.context).none()
            lingering.cancel()

    def _not_busy(self) -> None:
        """No longer among the connections a drain waits for: lingering, or ended."""
        if self._busy:
            self._busy = False
            _busy_of(self.context).count_in(-1)


class _Busy:
    """How many of a hypercorn worker's connections its drain waits for: every one but the
    HTTP/1.1 ones lingering after their last reply, whose lingers end once it is none."""

    def __init__(self) -> None:
        self.count = 0
        self._none = trio.Event()  # set, and renewed, each time the count comes to 0

    def count_in(self, change: int) -> None:
        self.count += change
        if not self.count:
            self._none.set()
            self._none = trio.Event()

    async def none(self) -> None:
        while self.count:
            await self._none.wait()


# The busy connections of each worker (its hypercorn context: one per `serve`).
_BUSY: weakref.WeakKeyDictionary[WorkerContext, _Busy] = weakref.WeakKeyDictionary()


def _busy_of(context: WorkerContext) -> _Busy:
    busy = _BUSY.get(context)
    if busy is None:
        busy = _BUSY[context] = _Busy()
    return busy


class _H11Protocol(H11Protocol):
    """Hypercorn's HTTP/1.1 protocol, answering `Expect: 100-continue` for a body over the
    limit with its 413 alone, and ending a reply under way before it closes the connection
    on the client's protocol error, and serving a WebSocket handshake as any request
    (`_upgrade_ignored`).

    Once the connection's close is sent, nothing read is handled: a request read while the
    reply before it was under way (pipelined, or sent as that reply's end arrived) waits for
    the reply's cycle to end (h11 PAUSED), and where the drain ends that cycle in the close,
    hypercorn's reader, woken, found the request PAUSED still and waited again, for good,
    holding the drain to the end of its grace (`_CanRead`).

    Hypercorn sends a 100 to every request that expects one, before the app sees it: a
    client whose Content-Length the app refuses (413) was told to send the body first
    (curl expects a 100 for every body over 1 MB). The app's 413 comes instead, and the
    client sends nothing (RFC 9110 §10.1.1).

    A reply can go out before its request's body is all in (413 on the Content-Length, 408),
    and closes the connection; h11 then takes any byte after that body (a pipelined request,
    a stray CRLF) as an error, on which hypercorn closed the connection at once: the client
    had the reply's head but not the body its Content-Length promised. The close waits for
    the reply's end instead, where hypercorn closes the connection anyway (nothing after the
    error is read as a request). Until then what the client sends is not read: h11 would keep
    it all, for as long as the reply takes (for ever if the client does not read it).

    The connection gone (the client's EOF or reset, a write failed), a reader waiting behind
    a pipelined request (h11 PAUSED) ends: when a reply's write failed the stream was closed
    alone, its app, cancelled as its client's leaving, never ended the cycle that would wake
    the reader, and the connection and its socket were held until the drain's grace.

    The client's EOF (a half-close, or a close: the server cannot tell them apart) ends the
    request whose reply is pending as its client's leaving, as hypercorn does; but a reply
    whose head had gone out (the app sends it as the EOF is read) lost its body to the
    close. A reply begun is sent whole before the close; one not begun sends nothing.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._body_refused = False
        self._ended_by_client = False  # its EOF is read (a half-close, or a close)
        self._reply_withdrawn = False  # the request's reply not begun at that EOF: none sent
        self._closing: trio.Event | None = None  # set when the close held back is made
        self.reads_over = False  # the close is sent
        self.idle = True  # no request under way: as hypercorn tells the idle timer (`Updated`)
        self.can_read: _CanRead = _CanRead(self)
        self.connection = _H11Connection(
            h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size
        )
        close_or_write = self.send

        async def send(event: ConnectionEvent) -> None:
            if isinstance(event, Updated):
                self.idle = event.idle  # before the timer is stopped, which may wait
            if isinstance(event, Closed):
                if self._replying():
                    self._closing = self._closing or trio.Event()
                    return
                if self._closing is not None:
                    self._closing.set()
                self.reads_over = True  # first: a reader woken by the close must see it
            await close_or_write(event)

        self.send = send

    async def handle(self, event: ConnectionEvent) -> None:
        if isinstance(event, RawData) and self.reads_over:
            return  # read as the close was sent
        if isinstance(event, RawData) and not event.data:
            self._ended_by_client = True
        if isinstance(event, Closed) and self._ended_by_client:
            if self._replying():
                return  # the reply goes on whole; its end closes (h11 has their side CLOSED)
            self._reply_withdrawn = True  # first: the app may be sending its head meanwhile
        if isinstance(event, Closed):  # gone: a reader paused behind a request ends (`_CanRead`)
            self.reads_over = True
            await self.can_read.set()
        if self._closing is not None:
            if isinstance(event, RawData):  # after the error: held back by TCP, not kept
                await self._closing.wait()
                return
            self._closing.set()  # Closed: the client is gone (a write failed)
        if isinstance(event, RawData) and event.data and self._closes_after_the_reply():
            return  # sent after a request or reply that said the close: no request of its runs
        with contextlib.suppress(_ReadsOver):
            await super().handle(event)

    async def stream_send(self, event: StreamEvent) -> None:
        """Hypercorn's, a reply begun in a drain saying `Connection: close`: its connection
        is closed after it, and a client told so before the end does not send on it."""
        if self._reply_withdrawn and not isinstance(event, StreamClosed):
            return
        if isinstance(event, Response) and self._closes_unsaid(event):
            event = dataclasses.replace(event, headers=[*event.headers, _CONNECTION_CLOSE])
        await super().stream_send(event)

    def _closes_unsaid(self, reply: Response) -> bool:
        """Whether the connection closes after `reply` (the drain) and no header says so: the
        app's, or hypercorn's at its `keep_alive_max_requests`."""
        return (
            reply.status_code >= 200
            and self.context.terminated.is_set()
            and self.keep_alive_requests < self.config.keep_alive_max_requests
            and not any(
                name.lower() == b"connection" and b"close" in value.lower()
                for name, value in reply.headers
            )
        )

    async def _create_stream(self, request: h11.Request) -> None:
        # h11 has made a Content-Length one number; with chunks it is no size (RFC 9112 §6.1).
        headers = dict(request.headers)
        self._body_refused = (
            b"transfer-encoding" not in headers
            and int(headers.get(b"content-length", 0)) > MAX_BODY_BYTES
        )
        if b"upgrade" in headers:  # whatever its value (`_upgrade_ignored`)
            request = _upgrade_ignored(request)
        await super()._create_stream(request)

    async def _check_protocol(self, event: h11.Request) -> None:
        """Hypercorn's, but an h2c upgrade whose HTTP2-Settings h2 does not take gets a 400
        and the connection's close instead of the 101: after the 101 h2 failed on it, and
        the connection's handler with it (a traceback logged as an error). One with no
        HTTP2-Settings, or more than one, is not upgraded (RFC 7540 §3.2.1), but served in
        HTTP/1.1 as any request whose `Upgrade` a server ignores (RFC 9110 §7.8); hypercorn
        upgraded it on `Upgrade: h2c` alone."""
        if _asks_h2c(event):
            settings = [value for name, value in event.headers if name == b"http2-settings"]
            if len(settings) != 1:
                return  # hypercorn's check past the upgrade is for the preface alone
            if _h2c_settings_refused(settings[0]):
                await self._send_error_response(400)
                await self.send(Closed())
                raise _ReadsOver
        await super()._check_protocol(event)

    async def _send_h11_event(self, event: H11SendableEvent) -> None:
        if not (
            isinstance(event, h11.InformationalResponse)
            and event.status_code == 100
            and self._body_refused
        ):
            await super()._send_h11_event(event)

    def _closes_after_the_reply(self) -> bool:
        """Whether the connection closes once the reply is sent: the request, read whole, said
        `Connection: close` (or is HTTP/1.0), or the reply, handed over whole, did. No request
        that follows is processed (RFC 9112 §9.6); h11 took any byte after them for the
        client's error. After the request, its 400 went out in place of the reply, and the
        order was cancelled (a CRLF after an HTTP/1.0 POST's body, as old clients send); after
        the reply, its close, at once, found the reply's last write under way, and so no EOF
        and no linger: a reset (a client that sent on after a drain's reply read the reply,
        then `Connection reset by peer`)."""
        connection = self.connection
        return isinstance(connection, h11.Connection) and h11.MUST_CLOSE in (
            connection.our_state,
            connection.their_state,
        )

    def _replying(self) -> bool:
        """Whether a reply's head is sent but not its end, and its stream is still open: a
        stream that ends mid-reply (its app failed) is closed at once, as before."""
        connection = self.connection
        return (
            self.stream is not None
            and isinstance(connection, h11.Connection)
            and connection.our_state is h11.SEND_BODY
        )


class _H11Connection(h11.Connection):
    """h11's server side, taking nothing the client sends after a request that closes the
    connection (`Connection: close`, HTTP/1.0) for a request: the server processes none
    (RFC 9112 §9.6), and the connection closes after the reply. What came in the same read
    as the request is left unread here; what comes later is dropped as it is read
    (`_H11Protocol._closes_after_the_reply`).

    Empty lines before a request line are dropped (RFC 9112 §2.2: a server should ignore
    them), a CR alone waiting for its LF: h11 took one for its protocol error, a bare 400
    and the close, so a CRLF some clients send after a POST's body failed the request that
    followed it on a keep-alive connection. Dropping them does not hold the idle timer off
    (hypercorn stops it at a request, not at bytes)."""

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        if self.their_state is h11.MUST_CLOSE and self.trailing_data[0]:
            return h11.NEED_DATA  # h11's error: its 400 in place of the reply, which it cancelled
        if self.their_state is h11.IDLE and self._empty_lines_dropped():
            return h11.NEED_DATA
        return super().next_event()

    def _empty_lines_dropped(self) -> bool:
        """Drop the empty lines at the start of what is read; whether a CR is left alone,
        its LF not read yet (the client still sending: h11 would take it for an error)."""
        received = self._receive_buffer
        data = received._data
        if data.startswith((b"\r", b"\n")) and (empty := _EMPTY_LINES.match(data)):
            received._extract(empty.end())
        return data == b"\r" and not self._receive_buffer_closed


# Empty lines before a request line (RFC 9112 §2.2), ended by CRLF or by LF alone (h11
# takes either).
_EMPTY_LINES = re.compile(rb"(?:\r?\n)+")


def _upgrade_ignored(request: h11.Request) -> h11.Request:
    """`request` without its `Upgrade` fields, for hypercorn to serve it as any request (a
    server may ignore `Upgrade`, RFC 9110 §7.8): no path takes a WebSocket. On `Upgrade:
    websocket` hypercorn made a WebSocket stream, whose handshake, if invalid (no
    `Sec-WebSocket-Key`), got a bare 400 saying `Connection: close`, and the stream never
    ended: the connection stayed open for as long as its client liked, its idle timer
    stopped, and held a drain to its grace; a valid one got the app's error for a WebSocket
    (a JSON 400 on `/healthz`), its connection closed. h11 has taken the request's upgrade
    for a proposal, which the reply (not a 101) declines: the connection serves on.

    Every `Upgrade` is dropped, an h2c one having been taken or ignored (`_check_protocol`):
    hypercorn strips the value as text (`str.strip`: \\x1c-\\x1f, \\x85, \\xa0 too), where h11
    keeps those bytes, so `websocket\\xa0` was not this `websocket` but still hypercorn's."""
    return h11.Request(
        method=request.method,
        target=request.target,
        headers=[(n, v) for n, v in request.headers.raw_items() if n.lower() != b"upgrade"],
        http_version=request.http_version,
    )


def _asks_h2c(request: h11.Request) -> bool:
    """Whether `request` asks for h2c as hypercorn takes it: `Upgrade: h2c` (the last, in any
    case), no body."""
    headers = dict(request.headers)
    with_body = b"content-length" in headers or b"transfer-encoding" in headers
    return headers.get(b"upgrade", b"").lower() == b"h2c" and not with_body


# An h2c upgrade's HTTP2-Settings: base64url, without padding (RFC 7540 §3.2.1).
_BASE64URL = re.compile(rb"[A-Za-z0-9_-]+")


def _h2c_settings_refused(settings: bytes) -> bool:
    """Whether `settings`, an h2c upgrade's HTTP2-Settings, is not a SETTINGS payload (RFC
    7540 §3.2.1): not base64url without padding (its text; the grammar's token68 would
    also take `+`, `/`, `.`, `~`, padding), which h2 does not check (it decodes as base64
    does: `+`, `/` and padding taken, any other character dropped, an empty value taken for
    no setting), or not one h2 takes: not 6 bytes a setting, a value out of range."""
    if not _BASE64URL.fullmatch(settings):
        return True
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    try:
        connection.initiate_upgrade_connection(settings)
    except (ValueError, hyperframe.exceptions.HyperframeError, h2.exceptions.ProtocolError):
        return True
    return False


class _ReadsOver(Exception):
    """The HTTP/1.1 connection's close is sent: what its reader read is not a request to run."""


class _CanRead(EventWrapper):
    """Hypercorn's `can_read` of an HTTP/1.1 connection, which its reader waits on while a
    request it read waits for the reply before it (h11 PAUSED); once the connection's close
    is sent, the wait ends that request's handling (`_ReadsOver`), where hypercorn's reader,
    woken by the close, found it PAUSED still and waited again, for good.

    While it waits, the reads go on (`read_on`, the connection's), what they read kept for h11
    up to `PIPELINED_MAX` bytes, so that the client's end (its EOF, a reset) is seen while the
    request before runs: the wait ends there, and the reader, reading that end again, ends
    the request under way as its client's leaving, as when nothing follows it. Hypercorn read
    nothing until the reply: a client that left with a request pipelined behind its order
    was not seen leaving, and the order ran to its end, its reply sent to no one. Past
    `PIPELINED_MAX` the reads stop until the reply, as hypercorn's did."""

    read_on: Callable[[int], Awaitable[bytes | None]] | None = None  # one read, of at most N
    _reading: trio.CancelScope | None = None  # the read under way in `wait`, which `set` ends

    def __init__(self, protocol: _H11Protocol) -> None:
        super().__init__()
        self._protocol = protocol

    async def wait(self) -> None:
        await self._read_on()
        if not self._protocol.reads_over:
            await super().wait()
        if self._protocol.reads_over:
            raise _ReadsOver

    async def set(self) -> None:
        await super().set()
        if self._reading is not None:
            self._reading.cancel()

    async def _read_on(self) -> None:
        """Read what the client sends into h11 until the wait is over (`set`), the client's
        end (`_ReadsOver`: the reader reads it next), or `PIPELINED_MAX` bytes are kept."""
        connection = self._protocol.connection
        while self.read_on is not None and not self.is_set() and not self._protocol.reads_over:
            room = PIPELINED_MAX - len(connection.trailing_data[0])
            if room <= 0:
                return
            reading = self._reading = trio.CancelScope()
            with reading:
                data = await self.read_on(room)
            self._reading = None
            if reading.cancelled_caught:
                return  # `set`: the wait is over
            if not data:
                raise _ReadsOver  # the client's end
            connection.receive_data(data)


def _reset_malformed(
    connection: h2.connection.H2Connection,
    stream_id: int,
    code: h2.errors.ErrorCodes = h2.errors.ErrorCodes.PROTOCOL_ERROR,
) -> list[h2.events.Event]:
    """Reset a stream whose request is malformed, as RFC 9113 §8.1.1 has it (or whose frame
    is): PROTOCOL_ERROR (or `code`) on that stream alone; the event tells hypercorn, which
    ignores a stream it has not seen."""
    connection.reset_stream(stream_id, code)
    return [h2.events.StreamReset(stream_id=stream_id, error_code=code, remote_reset=False)]


class _StreamErrorFrames(h2.frame_buffer.FrameBuffer):
    """h2's buffer of frames read, handing over whole a WINDOW_UPDATE of increment 0 on a
    stream, and a PRIORITY frame of a length other than 5, which RFC 9113 §6.9 and §6.3 make
    that stream's error (`_window_update_of_0_as_stream_error` and
    `_priority_errors_as_stream_errors` take them): h2 refused them as it parsed them, a
    connection error. On stream 0 they stay the connection's error, and within a header
    block too (§6.10), or past the frame size limit (§4.2), as h2 has them."""

    def __next__(self) -> hyperframe.frame.Frame:
        frame = self._stream_error()
        if frame is None:
            return super().__next__()
        self._update_header_buffer(frame)  # raises within a header block
        return frame

    def _stream_error(self) -> hyperframe.frame.Frame | None:
        """The first frame, taken out, if it is whole and its stream's error; else None."""
        header = self._data[:9]
        if len(header) < 9 or header[3] not in (WINDOW_UPDATE, PRIORITY):
            return None
        length = int.from_bytes(header[:3])
        stream_id = int.from_bytes(header[5:]) & 0x7FFF_FFFF  # the reserved bit ignored
        body = self._data[9 : 9 + length]
        if not stream_id or len(body) < length or length > self.max_frame_size:
            return None
        frame: hyperframe.frame.Frame
        if header[3] == WINDOW_UPDATE:
            if length != 4 or int.from_bytes(body) & 0x7FFF_FFFF:
                return None  # an increment, or the connection's FRAME_SIZE_ERROR: h2's
            frame = hyperframe.frame.WindowUpdateFrame(stream_id, window_increment=0)
        else:
            if length == 5:
                return None
            frame = hyperframe.frame.PriorityFrame(stream_id)
            frame.body_len = length  # not 5: the stream's FRAME_SIZE_ERROR
        del self._data[: 9 + length]
        return frame


def _refuse_stream(connection: h2.connection.H2Connection, frame: Any) -> Any:
    """Refuse a stream opened past SETTINGS_MAX_CONCURRENT_STREAMS: the stream error RFC 9113
    §5.1.2 makes it (REFUSED_STREAM: not processed, safe to retry). h2 raised a connection
    error: its GOAWAY cancelled and undid every order on the connection. The header block is
    decoded all the same, to keep HPACK's state (§4.3), and the stream is closed by the reset,
    so that h2 resets what follows on it rather than end the connection. A stream id the
    client may not open (even, or not above one already seen: a stream closed, or skipped)
    is h2's error, as below the limit: refused, it read as one not processed."""
    h2.connection._decode_headers(connection.decoder, frame.data)
    if frame.stream_id % 2 == 0:
        raise h2.exceptions.ProtocolError("Invalid stream ID for peer.")
    if frame.stream_id <= connection.highest_inbound_stream_id:
        raise h2.exceptions.StreamIDTooLowError(
            frame.stream_id, connection.highest_inbound_stream_id
        )
    connection.highest_inbound_stream_id = max(
        connection.highest_inbound_stream_id, frame.stream_id
    )
    connection._closed_streams[frame.stream_id] = h2.stream.StreamClosedBy.SEND_RST_STREAM
    reset = hyperframe.frame.RstStreamFrame(frame.stream_id)
    reset.error_code = h2.errors.ErrorCodes.REFUSED_STREAM
    connection._prepare_for_sending([reset])
    return [], []


def _body_length_as_stream_error(connection: h2.connection.H2Connection) -> None:
    """Have `connection` take DATA beyond a stream's Content-Length (or short of it at its
    END_STREAM) as the stream error RFC 9113 §8.1.1 makes it: that stream is reset with
    PROTOCOL_ERROR and its DATA acknowledged on the connection. h2 raises a connection error:
    its GOAWAY ended the connection, and so cancelled (and undid) every other order on it."""
    receive = connection._frame_dispatch_table[hyperframe.frame.DataFrame]

    def receive_data_frame(frame: Any) -> Any:
        try:
            return receive(frame)
        except h2.exceptions.InvalidBodyLengthError:
            events = _reset_malformed(connection, frame.stream_id)
            connection.acknowledge_received_data(frame.flow_controlled_length, frame.stream_id)
            return [], events

    connection._frame_dispatch_table[hyperframe.frame.DataFrame] = receive_data_frame


def _window_update_of_0_as_stream_error(connection: h2.connection.H2Connection) -> None:
    """Have `connection` take a WINDOW_UPDATE of increment 0 on a stream as the stream error
    PROTOCOL_ERROR RFC 9113 §6.9 makes it, as `_body_length_as_stream_error` does DATA; h2
    raised it as a connection error, whose GOAWAY cancelled and undid every order on the
    connection. On a stream closed it is dropped, as h2 drops any WINDOW_UPDATE there; on
    one idle it stays h2's connection error (§5.1), as any WINDOW_UPDATE there. h2 hands
    such a frame over only from `_StreamErrorFrames`."""
    receive = connection._frame_dispatch_table[hyperframe.frame.WindowUpdateFrame]

    def receive_window_update_frame(frame: Any) -> Any:
        if frame.window_increment:
            return receive(frame)
        try:
            stream = connection._get_stream_by_id(frame.stream_id)
        except h2.exceptions.StreamClosedError:
            return [], []
        if stream.closed:
            return [], []
        return [], _reset_malformed(connection, frame.stream_id)

    connection._frame_dispatch_table[hyperframe.frame.WindowUpdateFrame] = (
        receive_window_update_frame
    )


def _priority_errors_as_stream_errors(connection: h2.connection.H2Connection) -> None:
    """Have `connection` take a PRIORITY frame making a stream depend on itself, or of a
    length other than 5 (`_StreamErrorFrames`), as the stream error RFC 9113 §5.3.1 and §6.3
    make them (PROTOCOL_ERROR, FRAME_SIZE_ERROR); h2 raised them as connection errors, whose
    GOAWAY cancelled and undid every order on the connection. On a stream not open (idle,
    which no RST_STREAM may name, §6.4; or closed) the frame is dropped: priority is a hint.
    A HEADERS frame with such a priority is its stream's error already: h2 refuses it once
    the stream is open (`_header_fields_as_stream_error`)."""
    receive = connection._frame_dispatch_table[hyperframe.frame.PriorityFrame]

    def receive_priority_frame(frame: Any) -> Any:
        if frame.body_len != 5:
            code = h2.errors.ErrorCodes.FRAME_SIZE_ERROR
        elif frame.depends_on == frame.stream_id:
            code = h2.errors.ErrorCodes.PROTOCOL_ERROR
        else:
            return receive(frame)
        stream = connection.streams.get(frame.stream_id)
        if stream is None or stream.closed:
            return [], []
        return [], _reset_malformed(connection, frame.stream_id, code)

    connection._frame_dispatch_table[hyperframe.frame.PriorityFrame] = receive_priority_frame


def _header_fields_as_stream_error(connection: h2.connection.H2Connection) -> None:
    """Have `connection` take request headers (or trailers) whose fields h2 refuses (RFC 9113
    §8.2: an upper-case name, a connection-specific field, a space at a value's end, a
    Content-Length not a number, trailers without END_STREAM) as the stream error §8.1.1
    makes them, as `_body_length_as_stream_error` does DATA; h2 raises them as connection
    errors. A header block that does not decode stays one: the connection's HPACK state is
    lost (§4.3). h2 raises a plain ProtocolError for both; the fields are refused only once
    the block is decoded and its stream taken, and, unlike the stream's state machine
    refusing the frame, they leave that stream open, or close it by their END_STREAM
    (trailers after the reply's end): that stream is over both ways, and they are dropped.
    A HEADERS frame whose END_STREAM ends a body short of its Content-Length is that
    stream's error too (`_body_short`), as a DATA frame's is (h2 did not look)."""
    receive = connection._frame_dispatch_table[hyperframe.frame.HeadersFrame]
    get_or_create_stream = connection._get_or_create_stream
    # The stream of the HEADERS frame being received, whether it was open before it, and its
    # Content-Length before it (h2 reads it again from trailers: None if they have none).
    taken: list[tuple[h2.stream.H2Stream, bool, int | None]] = []

    def take_stream(stream_id: int, allowed: h2.connection.AllowedStreamIDs) -> h2.stream.H2Stream:
        stream = get_or_create_stream(stream_id, allowed)
        taken.append((stream, stream.open, stream._expected_content_length))
        return stream

    def receive_headers_frame(frame: Any) -> Any:
        taken.clear()
        try:
            frames, events = receive(frame)
        except h2.exceptions.TooManyStreamsError:
            return _refuse_stream(connection, frame)
        except h2.exceptions.ProtocolError as error:
            if type(error) is not h2.exceptions.ProtocolError or not taken:
                raise  # a subclass is another error (h2 handles some itself)
            stream, was_open, _ = taken[0]
            if stream.open:
                return [], _reset_malformed(connection, frame.stream_id)
            if was_open and stream.closed_by is h2.stream.StreamClosedBy.RECV_END_STREAM:
                return [], []  # closed: no frame may follow (RFC 9113 §5.1), a reset neither
            raise
        if taken and "END_STREAM" in frame.flags and _body_short(*taken[0]):
            return frames, _reset_malformed(connection, frame.stream_id)  # as on DATA's end
        return frames, events

    connection._get_or_create_stream = take_stream  # type: ignore[assignment,method-assign]
    connection._frame_dispatch_table[hyperframe.frame.HeadersFrame] = receive_headers_frame


def _body_short(stream: h2.stream.H2Stream, was_open: bool, length: int | None) -> bool:
    """Whether `stream`, its END_STREAM just read on a HEADERS frame (trailers, or the request's
    own), had less DATA than its Content-Length (RFC 9113 §8.1.1: malformed): h2 counts the
    length at a DATA frame's end alone, and the request ran on the short body. `length` is
    the Content-Length before trailers (h2 reads the field again from them). A stream that
    END_STREAM closed (its reply all sent: a 413) is over, and not reset: h2 refuses to."""
    expected = length if was_open else stream._expected_content_length
    return not stream.closed and expected is not None and expected != stream._actual_content_length


def _graceful_goaway_keeps_streams_open(connection: h2.connection.H2Connection) -> None:
    """Have `connection` take a GOAWAY(NO_ERROR) as RFC 9113 §6.8 has it: its sender opens no
    more streams, and those already open go on to their replies, as a client shutting down
    gracefully expects. h2 took any GOAWAY as the connection's end, sending nothing more and
    refusing every frame after it (python-hyper/h2#1181): hypercorn closed the connection,
    cancelling and undoing every order on it. The event is h2's own; `_H2Protocol` closes
    the connection once the last open stream is answered. A GOAWAY with an error code stays
    h2's: the client reports a connection error, after which it closes the connection
    (§5.4.1), and its orders are cancelled as those of any client that leaves."""
    receive = connection._frame_dispatch_table[hyperframe.frame.GoAwayFrame]

    def receive_goaway_frame(frame: Any) -> Any:
        if frame.error_code != h2.errors.ErrorCodes.NO_ERROR:
            return receive(frame)
        event = h2.events.ConnectionTerminated()
        event.error_code = h2.errors.ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]

    connection._frame_dispatch_table[hyperframe.frame.GoAwayFrame] = receive_goaway_frame


def _has_path(request: h2.events.RequestReceived) -> bool:
    return any(name == b":path" for name, _ in request.headers or ())


def _ascii_request_line(request: h2.events.RequestReceived) -> bool:
    """Whether the :method and :path are ASCII, as a method and a URI are: hypercorn decodes
    both as ASCII."""
    return all(
        value.isascii() for name, value in request.headers or () if name in (b":method", b":path")
    )


class _H2Protocol(H2Protocol):
    """Hypercorn's HTTP/2 protocol, dropping the DATA of a stream it has already closed, and
    refusing a stream opened during the drain as REFUSED_STREAM, and ending a stream's reply
    before the drain closes its connection; a client's GOAWAY(NO_ERROR) is met as the drain
    is, on that connection alone: its open streams answered, new ones refused, then closed.

    A reply that goes out before its request's body is in (413 on a Content-Length over the
    limit, 408) closes the stream; the client's DATA after it made hypercorn's h2 code raise
    KeyError, which ended the connection and so cancelled every other order on it (HTTP/2
    multiplexes many, from one client or from every client of a proxy). Such DATA is
    acknowledged, so the connection's flow-control window is not lost, and dropped; also when
    the stream closed while earlier frames of the same read were taken in.

    Hypercorn made every CONNECT with a :path (RFC 8441's, for a WebSocket; an h2c upgrade of
    a CONNECT) a WebSocket stream, whose handshake, if invalid (no `sec-websocket-version`),
    got a bare 400 and never ended: its connection was never idle, held for good, and a
    drain to its grace. No path takes a WebSocket: none is offered (no
    SETTINGS_ENABLE_CONNECT_PROTOCOL), and such a CONNECT is served as any request (`install`
    has hypercorn make it a plain stream; no route takes CONNECT: a JSON 405).
    """

    _gone_away = False  # the client's GOAWAY(NO_ERROR) came: it opens no more streams

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Where `replies_ended` waits; first, as hypercorn sets `closed` (which wakes it).
        self._replies_changed = trio.lowlevel.ParkingLot()
        super().__init__(*args, **kwargs)
        _body_length_as_stream_error(self.connection)
        _header_fields_as_stream_error(self.connection)
        self.connection.incoming_buffer = _StreamErrorFrames(server=True)  # for the two below
        _window_update_of_0_as_stream_error(self.connection)
        _priority_errors_as_stream_errors(self.connection)
        _graceful_goaway_keeps_streams_open(self.connection)
        # No WebSocket is served: RFC 8441's CONNECT for one is not offered (§3).
        del self.connection.local_settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL]

    async def initiate(
        self, headers: list[tuple[bytes, bytes]] | None = None, settings: bytes | None = None
    ) -> None:
        """Hypercorn's, then the idle timer started again unless a stream runs (an h2c
        upgrade's). Hypercorn reads the preface as an HTTP/1.1 request (`PRI * HTTP/2.0`),
        which stopped the timer before the turn to HTTP/2, and only a stream's end started it
        again: a connection that opened no stream was never closed at the idle limit, and
        held a drain to its grace."""
        await super().initiate(headers, settings)
        await self.send(Updated(idle=self.idle))

    async def handle(self, event: ConnectionEvent) -> None:
        """Hypercorn's, but what the client sends once the connection's GOAWAY is made (its
        close under way: idle, or on an error) is dropped, as RFC 9113 §6.8 lets it be. h2
        took a stream crossing that GOAWAY for the client's protocol error, and sent it a
        second GOAWAY, PROTOCOL_ERROR (18 to 21 of 30 clients in a GET loop at a drain)."""
        if isinstance(event, RawData) and self._goaway_made():
            return
        await super().handle(event)
        if isinstance(event, Closed):
            await self.give_up_replies()

    def _goaway_made(self) -> bool:
        """Whether a GOAWAY is made: ours (an idle close, the drain) or h2's own, on a
        connection error; either way no second one may follow."""
        return self.connection.state_machine.state is h2.connection.ConnectionState.CLOSED

    async def give_up_replies(self) -> None:
        """Release every reply still waiting to be sent; this connection will send nothing more.

        A reply held back by its client's flow-control window (one that reads none of it)
        waits, shielded (`finish_responses_shielded`), for the send task to take it; hypercorn
        ends that task with the connection but not the wait, so the connection's handler
        never ended: its socket and tasks stayed for good, and a drain overran to its hard
        deadline. No checkpoint (the buffers set events): this runs when cancelled too."""
        self.closed = True
        for buffer in self.stream_buffers.values():
            await buffer.close()

    async def _handle_events(self, events: list[h2.events.Event]) -> None:
        for event in events:
            if (
                isinstance(event, h2.events.ConnectionTerminated)
                and event.error_code == h2.errors.ErrorCodes.NO_ERROR
            ):
                # The client's graceful GOAWAY: hypercorn closed the connection at once,
                # cancelling the orders of its open streams, cutting off a reply whose stream
                # was closed but its END_STREAM not yet sent, and taking a stream that followed
                # in the same read on the closed connection. The open ones are answered, a new
                # one refused (below), then the connection closed (`_close_once_gone_away`).
                self._gone_away = True
                continue
            if isinstance(event, h2.events.RequestReceived) and (
                self.context.terminated.is_set() or self._gone_away
            ):
                # Draining: hypercorn resets a new stream with NO_ERROR, which leaves the client
                # unsure whether its order ran; REFUSED_STREAM says it did not, so a retry
                # elsewhere is safe (RFC 9113 §8.7), as a refused connection says on HTTP/1.1.
                # So too for a stream its client opens after its own GOAWAY.
                # One closed in the same read (its client's RST_STREAM, a body short of its
                # length) is left so: resetting it raised StreamClosedError, ending the
                # connection with every order on it.
                if self._not_closed(event.stream_id):
                    self.connection.reset_stream(
                        event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM
                    )
                self.connection.update_settings(
                    {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0}
                )
                continue
            if isinstance(event, h2.events.RequestReceived) and not _has_path(event):
                # CONNECT (RFC 9113 §8.5) has no :path: hypercorn's h2 code failed on it (an
                # UnboundLocalError), ending the connection with every order on it. No route
                # takes it: 405 on its stream, and what it sends after is dropped (below).
                if self._not_closed(event.stream_id):
                    self.connection.send_headers(event.stream_id, [(b":status", b"405")], True)
                continue
            if isinstance(event, h2.events.RequestReceived) and not _ascii_request_line(event):
                # A raw byte past ASCII in :path or :method (`/order/é`, not `%C3%A9`) is no
                # URI or method, a malformed request (RFC 9113 §8.1.1): hypercorn's decoding
                # raised UnicodeDecodeError, which ended the connection with every order on
                # it. Reset alone; what it sends after is dropped (below).
                if self._not_closed(event.stream_id):
                    _reset_malformed(self.connection, event.stream_id)
                continue
            # Each event is handed over alone, right after this look: taking in one DATA frame
            # may let the app reply and close its stream, so a look at the read's start would
            # not hold for the frames after it in the same read.
            if isinstance(event, h2.events.DataReceived) and event.stream_id not in self.streams:
                self.connection.acknowledge_received_data(
                    event.flow_controlled_length, event.stream_id
                )
                self._stop_sending(event.stream_id)
                continue
            if isinstance(event, h2.events.StreamReset) and event.stream_id in self.streams:
                # Hypercorn closes the stream but restarts no idle timer, as it does when one is
                # answered: the last stream reset (by its client, or as malformed), the
                # connection was held for good, and a drain to the end of its grace.
                await super()._handle_events([event])
                if self.idle:
                    await self.send(Updated(idle=True))
                continue
            await super()._handle_events([event])
        await self._flush()  # what the resets and acknowledgements above wrote
        await self._close_once_gone_away()  # its client reset the last stream

    async def _create_stream(self, request: h2.events.RequestReceived) -> None:
        """Hypercorn's, the stream not counted toward `keep_alive_max_requests` (1,000): at a
        connection's 1,001st stream hypercorn sent GOAWAY, after which h2 sends nothing, so
        that stream got no reply though the GOAWAY named it taken, and the client's next
        frame ended the connection, cancelling and undoing every order in flight on it.
        HTTP/1.1 keeps the limit, which closes its connection after a reply, as it should."""
        await super()._create_stream(request)
        self.keep_alive_requests = 0

    async def replies_ended(self) -> None:
        """Return once every reply handed over whole has its END_STREAM sent. A stream is
        closed, and its connection idle, before the send task sends that end, which h2
        refuses after a GOAWAY: a drain begun in between closed the connection there, and
        cut the reply off though the GOAWAY named its stream taken.

        Woken by what ends the wait (`_send_data`, `closed`): it looked every 1 ms, and a
        client that reads nothing held it until the idle limit or the drain's grace (20
        such connections, driven directly: 0.91 s of CPU in 2 s)."""
        while any(map(self._ending, list(self.stream_buffers))):
            await self._replies_changed.park()

    async def _send_data(self, stream_id: int) -> None:
        """Hypercorn's, waking `replies_ended` once the stream's buffer is gone: its
        END_STREAM sent, or the stream closed meanwhile (given up)."""
        await super()._send_data(stream_id)
        if stream_id not in self.stream_buffers:
            self._replies_changed.unpark_all()

    @property
    def closed(self) -> bool:
        """Hypercorn's flag, set as the connection closes: no reply is sent after it."""
        return self._closed

    @closed.setter
    def closed(self, closed: bool) -> None:
        """Set by hypercorn (on the connection's close, before it closes the streams) and by
        `give_up_replies`; either way `replies_ended` has nothing left to wait for."""
        self._closed = closed
        self._replies_changed.unpark_all()

    def goaway(self) -> bytes:
        """The GOAWAY (NO_ERROR) that ends this connection, to be sent; nothing if it has ended
        already (its own GOAWAY sent at the drain's last stream, the client's, an error)."""
        if self.closed or self._goaway_made():
            return b""
        self.connection.close_connection()
        return self.connection.data_to_send()

    def _not_closed(self, stream_id: int) -> bool:
        """Whether a frame may still go on the stream: one closed in the same read as its
        HEADERS (its client's RST_STREAM, a malformed body reset) raises StreamClosedError,
        which would end the connection with every order on it; h2 forgets it once gone."""
        stream = self.connection.streams.get(stream_id)
        return stream is not None and not stream.closed

    async def _priority_updated(self, event: h2.events.PriorityUpdated) -> None:
        """Hypercorn's, for its own streams alone, and only as far as its priority tree takes
        it. PRIORITY frames may name any stream, idle ones too (RFC 9113 §6.3): hypercorn put
        each in its tree, which refuses a 1,001st, and that error ended the connection with
        every order on it. Priority is a hint (deprecated by RFC 9113 §5.3): dropped.

        So is a stream made to depend on its own dependant (RFC 9113 §5.3.3): the tree moved
        that dependant up but left its dependants under it as well, under two parents; once
        one's reply was sent and it left the tree, the other still scheduled it, and the send
        task failed on a stream with no reply, ending the connection with every order on it."""
        if event.stream_id not in self.streams:
            return
        if event.depends_on not in self.streams:
            event.depends_on = 0  # the root
        elif self._depends_on(event.depends_on, event.stream_id):
            return
        with contextlib.suppress(priority.priority.PriorityError):
            await super()._priority_updated(event)

    def _depends_on(self, stream_id: int, ancestor: int) -> bool:
        """Whether the priority tree has `stream_id` depend on `ancestor`, at any depth."""
        node = self.priority._streams.get(stream_id)
        while node is not None and node.stream_id != ancestor:
            node = node.parent
        return node is not None

    def _stop_sending(self, stream_id: int) -> None:
        """Reset with NO_ERROR a stream whose reply is all sent but whose client sends on
        (RFC 9113 §8.1). The acknowledgement above also reopens the stream's own window, so
        the client could otherwise upload for ever what is dropped; h2 itself drops (and
        acknowledges on the connection) any DATA that follows the reset. A stream whose
        reply is not all sent yet is left alone: a reset now would lose that reply."""
        stream = self.connection.streams.get(stream_id)
        if stream is not None and stream.open and stream_id not in self.stream_buffers:
            self.connection.reset_stream(stream_id, h2.errors.ErrorCodes.NO_ERROR)

    async def stream_send(self, event: StreamEvent) -> None:
        """Hypercorn's, but in a drain the close of the last stream sends every reply's
        END_STREAM before the GOAWAY that closes the connection. A reply ends with the last
        chunk handed to the send task, which frames it after a checkpoint; the stream's close
        ran meanwhile, and closed the connection: the reply lost its END_STREAM, a client's
        error although the order was answered and counted drained. The drain is looked for
        once the stream is closed, as hypercorn does: a look before (a wait for this reply's
        end) missed a drain begun in between (0 to 3 of 30 clients in a GET loop cut off).
        In a drain the wait ends at the grace's end at the latest, as the reply's own does;
        an idle close (the drain's, or the timer's) that made the GOAWAY meanwhile, waiting
        for the same ends, is left to close the connection: a second GOAWAY followed.

        After the client's own GOAWAY the connection is closed once no reply's END_STREAM is
        pending (`_close_once_gone_away`). The stream is closed at once, so the idle timer
        runs while that end waits: a client that reads nothing is closed at the idle limit."""
        if not isinstance(event, StreamClosed):
            await super().stream_send(event)
            return
        # Hypercorn's StreamClosed branch from here on, with the errors it ignores there (the
        # connection closed meanwhile: its GOAWAY made, a client's error GOAWAY).
        with contextlib.suppress(
            KeyError, priority.priority.MissingStreamError, h2.exceptions.ProtocolError
        ):
            await self._close_stream(event.stream_id)
            if self.idle and self.context.terminated.is_set():
                await self.replies_ended()
                if not self._goaway_made():  # by an idle close meanwhile, which closes
                    self.connection.close_connection()
                    await self._flush()
            await self.send(Updated(idle=self.idle))
        await self._close_once_gone_away()

    async def _close_once_gone_away(self) -> None:
        """After the client's own GOAWAY, close the connection (the server's GOAWAY) once no
        stream is left open and every reply's END_STREAM is sent: a stream is closed before
        the send task sends its END_STREAM, so a GOAWAY read in between found none open and
        the reply lost its end. The wait ends with the idle timer at the latest (it runs once
        no stream is open), should the client not read. In a drain `stream_send` closes the
        connection, as any other. The reader and a stream's task may both come here: the
        first to close does, and neither once another close has made the GOAWAY (an idle
        close, the drain's, waiting for the same END_STREAM): it closes the connection."""
        if not self._gone_away or self.context.terminated.is_set() or self.streams:
            return
        await self.replies_ended()
        if self.streams or self.closed or self._goaway_made():
            return
        self.connection.close_connection()
        await self._flush()
        await self.send(Closed())

    def _ending(self, stream_id: int) -> bool:
        """Whether the stream's reply is whole but its END_STREAM not yet sent."""
        buffer = self.stream_buffers.get(stream_id)
        return not self.closed and buffer is not None and buffer._complete


def install() -> None:
    """Put these classes where hypercorn's Trio worker looks them up (it calls each by the
    name it imported: should a later hypercorn stop doing so, fail here rather than lose
    them silently). Done once, when `server` is imported."""
    assert hypercorn.trio.run.TCPServer in (TCPServer, _OneConnection)  # type: ignore[attr-defined]
    hypercorn.trio.run.TCPServer = _OneConnection  # type: ignore[attr-defined] # see _OneConnection
    assert hypercorn.protocol.H2Protocol in (H2Protocol, _H2Protocol)  # type: ignore[attr-defined]
    hypercorn.protocol.H2Protocol = _H2Protocol  # type: ignore[attr-defined] # see _H2Protocol
    assert hypercorn.protocol.H11Protocol in (H11Protocol, _H11Protocol)  # type: ignore[attr-defined]
    hypercorn.protocol.H11Protocol = _H11Protocol  # type: ignore[attr-defined] # see _H11Protocol
    assert hypercorn.protocol.h2.WSStream in (WSStream, HTTPStream)  # type: ignore[attr-defined]
    hypercorn.protocol.h2.WSStream = HTTPStream  # type: ignore[attr-defined,assignment] # see _H2Protocol
