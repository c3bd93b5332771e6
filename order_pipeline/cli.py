"""`order-pipeline serve`'s command line: settings from flags and environment.

Precedence is flag, then environment variable, then default; a bad value from
either source exits with status 2 and names the setting.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from .settings import Settings

__all__ = ["parse_args"]


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
    return parser, serve


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from `argv` over `environ` over the defaults; exits 2 on a bad value."""
    environ = os.environ if environ is None else environ
    parser, serve = _parsers()
    args = parser.parse_args(argv)
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
