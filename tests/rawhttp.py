"""A bare HTTP/1.1 client over one socket: for hostile input no HTTP library would send."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1", url  # load and failure tests stay on loopback
    assert parts.port, url
    return parts.hostname, parts.port


def request(body: bytes, *, path: str = "/order", extra: bytes = b"", close: bool = True) -> bytes:
    """A POST with a correct Content-Length (unless `extra` headers override the framing)."""
    headers = b"Host: t\r\nContent-Type: application/json\r\n" + extra
    if b"content-length" not in extra.lower() and b"transfer-encoding" not in extra.lower():
        headers += b"Content-Length: %d\r\n" % len(body)
    if close:
        headers += b"Connection: close\r\n"
    return b"POST %s HTTP/1.1\r\n%s\r\n%s" % (path.encode(), headers, body)


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return Reply(int(status_line.split(" ")[1]), headers, body)


async def read_all(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


EXCHANGE_LIMIT_S = 60


async def exchange(url: str, raw: bytes) -> bytes:
    """Send `raw` on a fresh connection and read until the server closes it (bounded)."""
    with trio.fail_after(EXCHANGE_LIMIT_S):
        async with await trio.open_tcp_stream(*address(url)) as stream:
            await stream.send_all(raw)
            try:
                return await read_all(stream)
            except trio.BrokenResourceError:  # reset after a partial read: nothing more
                return b""


async def post(url: str, document: Any) -> Reply:
    return parse(await exchange(url, request(json.dumps(document).encode())))
