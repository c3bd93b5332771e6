"""The command line: `serve`'s settings from flags and environment, and `orders`' query.

Precedence is flag, then environment variable, then default; a bad value from
either source exits with status 2 and names the setting.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .settings import Settings

__all__ = ["ListOrders", "parse_args", "parse_command"]


@attrs.frozen
class ListOrders:
    """`order-pipeline orders`: list the stored orders for an operator."""

    store: str
    needs_attention: bool = False
    json: bool = False


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps help at spaces only, so a default such as a store URL stays whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The program's parser, and its `serve` subparser (whose errors name `serve`)."""
    parser = argparse.ArgumentParser(
        prog="order-pipeline",
        description="Process delivery orders: payment, vendor and courier steps run concurrently.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run the HTTP server",
        formatter_class=_HelpFormatter,
        description="Run the HTTP server. Every flag can also be set by the environment "
        f"variable named after it ({Settings.env_name('courier_pool_size')} for "
        "--courier-pool-size); a flag wins over the environment.",
    )
    for field in attrs.fields(Settings):
        flag = Settings.flag_name(field.name)
        env = Settings.env_name(field.name)
        help_text = f"{field.metadata['help']} [env {env}; default {field.default}]"
        if field.type in (bool, "bool"):
            serve.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            serve.add_argument(flag, metavar=field.name.upper(), help=help_text)
    orders = commands.add_parser(
        "orders",
        help="list the stored orders",
        formatter_class=_HelpFormatter,
        description="List the orders in the store: key, order_id, status, kind, start and end, "
        "each compensation's outcome and the ledger's net charge for the order.",
    )
    store_env = Settings.env_name("store")
    store_default = Settings().store
    orders.add_argument(
        "--store", help=f"the store to read [env {store_env}; default {store_default}]"
    )
    orders.add_argument(
        "--needs-attention",
        action="store_true",
        help="only orders whose compensation failed or never finished",
    )
    orders.add_argument("--json", action="store_true", help="one JSON object a line")
    return parser, serve


def parse_command(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings | ListOrders:
    """The command `argv` asks for: `serve`'s settings, or `orders`' query; exits 2 if bad."""
    environ = os.environ if environ is None else environ
    parser, serve = _parsers()
    args = parser.parse_args(argv)
    if args.command == "orders":
        store = args.store or environ.get(Settings.env_name("store"))
        if store is None:
            return ListOrders(Settings().store, args.needs_attention, args.json)
        try:
            return ListOrders(_parse_store(store), args.needs_attention, args.json)
        except ValueError as exc:
            parser.error(f"--store: {exc}")
    return _settings(args, environ, serve)


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """`serve`'s settings from `argv` over `environ` over the defaults; exits 2 on a bad value."""
    command = parse_command(argv, environ)
    if not isinstance(command, Settings):
        raise SystemExit("not the serve command")
    return command


def _parse_store(text: str) -> str:
    parse: Any = attrs.fields(Settings).store.metadata["parse"]
    return str(parse(text))


def _settings(
    args: argparse.Namespace, environ: Mapping[str, str], serve: argparse.ArgumentParser
) -> Settings:
    values: dict[str, Any] = {}
    for field in attrs.fields(Settings):
        given = getattr(args, field.name)
        env = Settings.env_name(field.name)
        if given is not None:
            source, text = Settings.flag_name(field.name), given
        elif env in environ:
            source, text = env, environ[env]
        else:
            continue
        if isinstance(text, bool):
            values[field.name] = text
            continue
        try:
            values[field.name] = field.metadata["parse"](text)
        except ValueError as exc:
            serve.error(f"{source}: {exc}")
    return Settings(**values)
