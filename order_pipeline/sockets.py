"""The listening sockets: bound before anything else starts, so that an address in use is one
line (`CannotListen`), not a traceback; one per worker with SO_REUSEPORT."""

from __future__ import annotations

import contextlib
import os
import socket

from .server import LISTEN_BACKLOG
from .settings import Settings

__all__ = ["CannotListen", "listen", "url_of"]


class CannotListen(Exception):
    """The address to serve cannot be bound: the operator's to fix, so one line, not a trace."""


def listen(settings: Settings) -> list[socket.socket]:
    """The listening sockets, one per worker, bound before anything else starts (no store file
    is created).

    Left to hypercorn, the bind fails inside its nursery and the cause arrives as a
    45-line ExceptionGroup; bound here, it is known to be the address's.
    """
    host, port = settings.host, settings.port
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        first = socket.create_server(address, family=family, backlog=LISTEN_BACKLOG)
        if settings.workers == 1:
            return [first]
        return _reuseport_group(first, settings.workers)
    except socket.gaierror as exc:
        cause = f"cannot resolve the host ({_lower_first(exc.strerror)})"
        raise CannotListen(f"cannot listen on {where}: {cause}") from None
    except OSError as exc:
        # os.strerror: create_server's own strerror repeats the address, as a Python tuple.
        cause = os.strerror(exc.errno) if exc.errno else str(exc)
        raise CannotListen(f"cannot listen on {where}: {_lower_first(cause)}") from None


def _reuseport_group(probe: socket.socket, size: int) -> list[socket.socket]:
    """`size` sockets with SO_REUSEPORT on `probe`'s address (its port, if port 0 asked for any),
    so that the kernel spreads new connections over them, rather than the first worker to wake
    taking most of a burst from one shared socket. `probe` is closed.

    `probe` was bound without SO_REUSEPORT, which proves the address free: on Linux a socket
    with it joins, silently, any group of the same user on the address, another
    order-pipeline's included.
    """
    family, address = probe.family, probe.getsockname()
    probe.close()
    with contextlib.ExitStack() as bound:  # if one cannot be bound, those before are closed
        group = [
            bound.enter_context(
                socket.create_server(
                    address, family=family, backlog=LISTEN_BACKLOG, reuse_port=True
                )
            )
            for _ in range(size)
        ]
        bound.pop_all()
    return group


def _lower_first(text: str | None) -> str:
    return (text or "")[:1].lower() + (text or "")[1:]


def url_of(sock: socket.socket) -> str:
    """The URL a listening socket serves, as the "Running on" line gives it."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
