"""`order-pipeline serve`: parse the command line, set up logging, run the server."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Sequence

import trio

from .server import Settings, build_service, serve

__all__ = ["main", "parse_args"]


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535, not {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="order-pipeline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser(
        "serve",
        help="run the HTTP server",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve_cmd.add_argument("--host", default=defaults.host, help="address to listen on")
    serve_cmd.add_argument("--port", type=_port, default=defaults.port, help="0 picks a free port")
    serve_cmd.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=defaults.request_timeout,
        help="deadline of one order, in seconds",
    )
    serve_cmd.add_argument(
        "--courier-pool-size",
        type=int,
        default=defaults.courier_pool_size,
        help="couriers available at once (clamped to 1..128)",
    )
    return parser


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    args = _parser().parse_args(argv)
    return Settings(
        host=args.host,
        port=args.port,
        request_timeout=args.request_timeout,
        courier_pool_size=args.courier_pool_size,
    )


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # A second Ctrl-C while draining interrupts the drain: exit quietly.
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(serve, build_service(settings), settings)
