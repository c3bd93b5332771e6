"""Every setting of the service, in one attrs class, with its flag and environment variable.

Each field's metadata holds its help text and a parser that validates a string
from the command line or the environment. `cli` builds `order-pipeline serve`
from this class, so a new setting is one new field here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final

import attrs

from .model import MAX_DELAY_MS
from .store import StoreError, parse_store_url

ENV_PREFIX: Final = "ORDER_PIPELINE_"
# Past the drain, only a client that never reads its reply can hold a process
# (hypercorn sends shielded); this much later the process is ended anyway.
HARD_EXIT_MARGIN_S: Final = 5.0
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("json", "text")


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise ValueError(f"must be an integer from {low} to {high}, not {text!r}")
        return value

    return parse


def _seconds(*, zero_ok: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > 0 or (zero_ok and value == 0))):
            kind = "a non-negative" if zero_ok else "a positive"
            raise ValueError(f"must be {kind} number of seconds, not {text!r}")
        return value

    return parse


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {text!r}")
        return text.lower()

    return parse


def _flag(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, not {text!r}")


def _host(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _store_url(text: str) -> str:
    try:
        parse_store_url(text)
    except StoreError as exc:
        raise ValueError(str(exc)) from None
    return text


def setting(default: Any, parse: Callable[[str], Any], help: str) -> Any:
    return attrs.field(default=default, metadata={"parse": parse, "help": help})


@attrs.frozen(kw_only=True)
class Settings:
    """Everything an operator can set. Defaults are the documented ones."""

    host: str = setting("127.0.0.1", _host, "address to listen on")
    port: int = setting(8080, _int_in(0, 65535), "port to listen on; 0 picks a free one")
    workers: int = setting(1, _int_in(1, 64), "worker processes serving the same socket")
    request_timeout: float = setting(10.0, _seconds(zero_ok=False), "deadline of one order (s)")
    compensation_timeout: float = setting(
        5.0, _seconds(zero_ok=False), "deadline of an order's compensations (s)"
    )
    courier_pool_size: int = setting(
        5, _int_in(-(2**31), 2**31), "couriers available at once (clamped to 1..128)"
    )
    courier_queue_limit: int = setting(
        1000, _int_in(0, 1_000_000), "orders that may wait for a courier; past it, 503 at once"
    )
    payment_delay_ms: int = setting(150, _int_in(0, MAX_DELAY_MS), "default payment delay")
    vendor_delay_ms: int = setting(200, _int_in(0, MAX_DELAY_MS), "default vendor delay")
    courier_delay_ms: int = setting(100, _int_in(0, MAX_DELAY_MS), "default courier delay")
    header_timeout: float = setting(
        3.0,
        _seconds(zero_ok=False),
        "a connection must send its request headers within this long of being accepted or "
        "of its last reply, or it is closed (also the keep-alive idle limit) (s)",
    )
    shutdown_grace: float = setting(
        15.0, _seconds(zero_ok=True), "on SIGTERM, how long in-flight orders may finish (s)"
    )
    log_level: str = setting("info", _choice(*LOG_LEVELS), "lowest level logged")
    log_format: str = setting("json", _choice(*LOG_FORMATS), "one JSON object a line, or text")
    access_log: bool = setting(True, _flag, "log every HTTP request (hypercorn's access log)")
    store: str = setting(
        "sqlite:///order-pipeline.db",
        _store_url,
        "where orders are kept: sqlite:///PATH (a file, relative to the working directory; "
        "sqlite:////abs/path for an absolute one), or memory (nothing durable)",
    )
    lease_timeout: float = setting(
        5.0,
        _seconds(zero_ok=False),
        "a process whose lease is this old is dead: its running orders are undone (s)",
    )
    retention: float = setting(
        86_400.0, _seconds(zero_ok=False), "finished orders are kept this long, then forgotten (s)"
    )

    @property
    def hard_exit_delay(self) -> float:
        """Seconds from SIGTERM after which a process still draining is ended."""
        return self.shutdown_grace + self.compensation_timeout + HARD_EXIT_MARGIN_S

    @staticmethod
    def env_name(field: str) -> str:
        return ENV_PREFIX + field.upper()

    @staticmethod
    def flag_name(field: str) -> str:
        return "--" + field.replace("_", "-")
