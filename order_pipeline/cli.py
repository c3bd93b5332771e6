"""The command line: `serve`'s settings from flags and environment, and `orders`' query.

Precedence is flag, then environment variable, then default; a bad value from
either source exits with status 2 and names the setting, even a variable that a
flag overrides (the operator's environment is wrong either way).
"""

from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, Final, NoReturn

import attrs

from .settings import ENV_PREFIX, Parse, Settings

__all__ = ["VERSION", "ListOrders", "misspelt_variables", "parse_args", "parse_command"]

VERSION: Final = importlib.metadata.version("order-pipeline")


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


class _Parser(argparse.ArgumentParser):
    """Says what is wrong in one line and where to read more, rather than the usage first:
    the usage of `serve` is twenty lines, and the error came last, under it."""

    def __init__(self, *, more: str, **kwargs: Any) -> None:
        super().__init__(formatter_class=_HelpFormatter, **kwargs)
        self.more = more

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\nRun '{self.prog} --help' {self.more}.\n")


def _shown(value: object) -> str:
    """A default as an operator would type it: `true`, not Python's `True`."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _parsers() -> tuple[_Parser, dict[str, _Parser]]:
    """The program's parser, and each command's own (whose errors name the command)."""
    parser = _Parser(
        prog="order-pipeline",
        description="Process delivery orders: payment, vendor and courier steps run concurrently.",
        more="for the commands",
    )
    parser.add_argument("--version", action="version", version=f"order-pipeline {VERSION}")
    commands = parser.add_subparsers(dest="command", title="commands")
    serve = commands.add_parser(
        "serve",
        help="run the HTTP server",
        more="for every setting",
        description="Run the HTTP server. Every flag can also be set by the environment "
        f"variable named after it ({Settings.env_name('courier_pool_size')} for "
        "--courier-pool-size); a flag wins over the environment.",
    )
    for field in attrs.fields(Settings):
        flag = Settings.flag_name(field.name)
        env = Settings.env_name(field.name)
        parse: Parse = field.metadata["parse"]
        if field.type in (bool, "bool"):
            help_text = (
                f"{field.metadata['help']} [env {env}: {parse.accepts}; "
                f"default {_shown(field.default)}]"
            )
            serve.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            help_text = (
                f"{field.metadata['help']}: {parse.accepts} [env {env}; default {field.default}]"
            )
            serve.add_argument(flag, metavar=field.name.upper(), help=help_text)
    orders = commands.add_parser(
        "orders",
        help="list the stored orders",
        more="for its flags",
        description="List the orders in the store: key, order_id, status, kind, attempt, start "
        "and end, each compensation's outcome and the ledger's net charge for the order.",
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
    return parser, {"serve": serve, "orders": orders}


def parse_command(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings | ListOrders:
    """The command `argv` asks for: `serve`'s settings, or `orders`' query; exits 2 if bad.

    With no command, the help is the answer (on stderr, status 2: nothing was done).
    """
    environ = os.environ if environ is None else environ
    parser, commands = _parsers()
    # argparse would report a command's unknown flag with the program's usage, not the command's.
    args, unknown = parser.parse_known_args(argv)
    command = commands.get(args.command, parser)
    if unknown:
        command.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        parser.exit(2)
    if args.command == "orders":
        env = Settings.env_name("store")
        if args.store is not None and env in environ:  # as `serve` refuses it: wrong either way
            try:
                _parse_store(environ[env])
            except ValueError as exc:
                command.error(f"{env}: {exc}{_overridden('--store')}")
        source, store = (
            ("--store", args.store) if args.store is not None else (env, environ.get(env))
        )
        if store is None:
            return ListOrders(Settings().store, args.needs_attention, args.json)
        if store == "memory":  # a new, empty one here, like a path that holds none: refused
            command.error(
                f"{source}: memory: a memory store is its server's own, inside that process;"
                " there is none here to list"
            )
        try:
            return ListOrders(_parse_store(store), args.needs_attention, args.json)
        except ValueError as exc:
            command.error(f"{source}: {exc}")
    return _settings(args, environ, command)


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """`serve`'s settings from `argv` over `environ` over the defaults; exits 2 on a bad value."""
    command = parse_command(argv, environ)
    if not isinstance(command, Settings):
        raise SystemExit("not the serve command")
    return command


def misspelt_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each `ORDER_PIPELINE_*` variable whose name is no setting's but close to
    one's (`ORDER_PIPELINE_RETENTON`, `order_pipeline_port`: names are case-sensitive): a
    flag so misspelt exits 2, a variable is ignored, and its setting stays at the default
    unsaid. Other names under the prefix (a tool's own, the tests') are left alone."""
    settings = [field.name.upper() for field in attrs.fields(Settings)]
    known = {Settings.env_name(setting) for setting in settings}
    return [
        f"{name} is no setting: ignored (meant {ENV_PREFIX}{close}?)"
        for name in sorted(environ)
        if name.upper().startswith(ENV_PREFIX) and name not in known
        for close in difflib.get_close_matches(name.upper().removeprefix(ENV_PREFIX), settings, 1)
    ]


def _overridden(flag: str) -> str:
    """What the refusal of a bad variable adds when a flag overrides it."""
    return f" ({flag} overrides it, but the environment is wrong: fix or unset it)"


def _parse_store(text: str) -> str:
    parse: Parse = attrs.fields(Settings).store.metadata["parse"]
    return str(parse(text))


def _settings(
    args: argparse.Namespace, environ: Mapping[str, str], serve: argparse.ArgumentParser
) -> Settings:
    values: dict[str, Any] = {}
    for field in attrs.fields(Settings):
        parse: Parse = field.metadata["parse"]
        flag, env = Settings.flag_name(field.name), Settings.env_name(field.name)
        given = getattr(args, field.name)
        if env in environ:
            try:
                values[field.name] = parse(environ[env])
            except ValueError as exc:
                serve.error(f"{env}: {exc}{_overridden(flag) if given is not None else ''}")
        if isinstance(given, bool):  # --access-log / --no-access-log
            values[field.name] = given
        elif given is not None:
            try:
                values[field.name] = parse(given)
            except ValueError as exc:
                serve.error(f"{flag}: {exc}")
    settings = Settings(**values)
    if settings.store == "memory" and settings.workers > 1:
        store_source = "--store" if args.store is not None else Settings.env_name("store")
        serve.error(
            f"{store_source}: memory: each worker would keep orders of its own, so one key could"
            " run once on each; serve it with one worker, or use a sqlite:/// store"
        )
    return settings
