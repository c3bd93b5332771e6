"""Every setting of the service, in one attrs class, with its flag and environment variable.

Each field's metadata holds its help text and a parser that validates a string
from the command line or the environment. `cli` builds `order-pipeline serve`
from this class, so a new setting is one new field here.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from typing import Any, Final

import attrs

from .model import MAX_DELAY_MS
from .services.pool import MAX_SIZE, MIN_SIZE
from .store import StoreError, parse_store_url

ENV_PREFIX: Final = "ORDER_PIPELINE_"
# Past the drain, only a client that never reads its reply can hold a process
# (hypercorn writes to the socket shielded; over HTTP/2 such a reply is given up at the
# grace's end); this much later the process is ended anyway.
HARD_EXIT_MARGIN_S: Final = 5.0
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("json", "text")


@attrs.frozen
class Parse:
    """Reads a setting from its text; `accepts` says what it takes, in `--help` and in errors.

    One phrase serves both, so the help cannot promise what the parser refuses.
    """

    accepts: str
    # The value, or None if `text` is not one; or ValueError saying more than `accepts` can.
    read: Callable[[str], Any]

    def __call__(self, text: str) -> Any:
        value = self.read(text)
        if value is None:
            raise ValueError(f"must be {self.accepts}, not {text!r}")
        return value


def _plain(text: str) -> bool:
    """Digits as an operator types them: Python's int() and float() also take `1_000` and
    any script's digits (`٣` for 3), which the help does not promise, nor would a shell or
    another tool reading the same variable take them so."""
    return text.isascii() and "_" not in text


def _int_in(low: int, high: int, accepts: str | None = None) -> Parse:
    def read(text: str) -> int | None:
        if not _plain(text):
            return None
        try:
            value = int(text)
        except ValueError:
            return None
        return value if low <= value <= high else None

    return Parse(accepts or f"an integer from {low} to {high}", read)


def _usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (taskset, a container's cpuset), which
    os.cpu_count() ignores; os.cpu_count() where there is none (macOS). Python 3.13 has this
    as os.process_cpu_count()."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _workers(low: int, high: int) -> Parse:
    """A number of workers, or `auto`: one per usable CPU, within `low`..`high`. Resolved as it is
    parsed, so that everything after (the "Running on" line, each worker's settings) sees a
    number."""
    number = _int_in(low, high)

    def read(text: str) -> int | None:
        if text.lower() == "auto":
            return min(max(_usable_cpus(), low), high)
        value: int | None = number.read(text)
        return value

    return Parse(f"{number.accepts}, or auto (one per CPU this process may use)", read)


# Ten years: longer is no setting but a typo, and PostgreSQL's timestamps and intervals
# overflow at 1e12 seconds (a lease or a retention that long crashed the server).
SECONDS_MAX: Final = 10 * 365 * 86_400
LEASE_TIMEOUT_MIN: Final = 0.5


def _seconds(*, zero_ok: bool, least: float = 0.0) -> Parse:
    def read(text: str) -> float | None:
        if not _plain(text):
            return None
        try:
            value = float(text)
        except ValueError:
            return None
        ok = least <= value <= SECONDS_MAX and (value > 0 or (zero_ok and value == 0))
        return value if ok else None

    if least:
        return Parse(f"a number of seconds from {least:g} to {SECONDS_MAX} (ten years)", read)
    kind = "a non-negative" if zero_ok else "a positive"
    return Parse(f"{kind} number of seconds, at most {SECONDS_MAX} (ten years)", read)


def _choice(*choices: str) -> Parse:
    return Parse(
        f"one of {', '.join(choices)}",
        lambda text: text.lower() if text.lower() in choices else None,
    )


def _flag(text: str) -> bool | None:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    return None


def _host(text: str) -> str | None:
    """Not blank, no space at either end nor control character (a YAML block's newline):
    refused here in one line, not split over two by the error of listening on it. An IPv6
    address may come in a URL's brackets (`[::1]`); they are dropped, and other brackets
    refused (listening on `[::1]` failed as `[[::1]]`, on `[::1]:8080` as `[[::1]:8080]`); so is
    a colon outside an IPv6 address (a host with its port: `--port` gives that), and an IPv4
    address written as IPv6 (`::ffff:127.0.0.1`: an IPv6 socket takes none, `invalid
    argument`)."""
    host: str | None = text
    if text.startswith("[") and text.endswith("]"):
        host = _ipv6(text[1:-1], text)
    elif "[" in text or "]" in text:  # in no host name or address
        return None
    elif ":" in text:  # in no host name either: an IPv6 address, or a host with its port
        host = _ipv6(text, text)  # `127.0.0.1:8080` failed to listen as `[127.0.0.1:8080]:8080`
    # An IPv6 address's scope id may hold any character but `%`, a control one too.
    return host if host and host == host.strip() and host.isprintable() else None


def _ipv6(address: str, text: str) -> str | None:
    """`address` if it is an IPv6 address a socket may listen on; `text` is as given."""
    try:
        mapped = ipaddress.IPv6Address(address).ipv4_mapped
    except ValueError:
        return None
    if mapped is not None:
        raise ValueError(
            f"must be a host name or address, not {text!r}: an IPv4 address written as IPv6"
            f" cannot be listened on; give {mapped}"
        )
    return address


def _store_url(text: str) -> str:
    try:
        parse_store_url(text)
    except StoreError as exc:
        raise ValueError(str(exc)) from None
    return text


def setting(default: Any, parse: Parse, help: str) -> Any:
    """A field with its help text and its parser, which `cli` reads."""
    return attrs.field(default=default, metadata={"parse": parse, "help": help})


@attrs.frozen(kw_only=True)
class Settings:
    """Everything an operator can set. Defaults are the documented ones."""

    host: str = setting(
        "127.0.0.1",
        Parse("a host name or address", _host),
        "address to listen on",
    )
    port: int = setting(8080, _int_in(0, 65535), "port to listen on; 0 picks a free one")
    workers: int = setting(
        1, _workers(1, 64), "worker processes serving the port, each on a socket of its own"
    )
    request_timeout: float = setting(10.0, _seconds(zero_ok=False), "deadline of one order")
    compensation_timeout: float = setting(
        5.0, _seconds(zero_ok=False), "deadline of an order's compensations"
    )
    courier_pool_size: int = setting(
        5,
        _int_in(
            -(2**31),
            2**31,
            f"an integer from {-(2**31)} to {2**31}; below {MIN_SIZE} counts as {MIN_SIZE}, "
            f"above {MAX_SIZE} as {MAX_SIZE}",
        ),
        "couriers available at once, per worker process",
    )
    courier_queue_limit: int = setting(
        1000,
        _int_in(0, 1_000_000),
        "orders that may wait for a courier, per worker process; past it, 503 at once",
    )
    payment_delay_ms: int = setting(
        150, _int_in(0, MAX_DELAY_MS), "default payment delay in milliseconds"
    )
    vendor_delay_ms: int = setting(
        200, _int_in(0, MAX_DELAY_MS), "default vendor delay in milliseconds"
    )
    courier_delay_ms: int = setting(
        100, _int_in(0, MAX_DELAY_MS), "default courier delay in milliseconds"
    )
    header_timeout: float = setting(
        3.0,
        _seconds(zero_ok=False),
        "a connection must send its request headers within this long of being accepted or "
        "of its last reply, or it is closed (also the keep-alive idle limit)",
    )
    drain_delay: float = setting(
        0.0,
        _seconds(zero_ok=True),
        "on SIGTERM, SIGINT or SIGHUP, how long the server still accepts and serves while /readyz "
        "answers 503, so that a load balancer takes it out of rotation before it stops accepting",
    )
    shutdown_grace: float = setting(
        15.0,
        _seconds(zero_ok=True),
        "on SIGTERM, SIGINT or SIGHUP, how long in-flight orders may finish once the server "
        "stops accepting (after the drain delay); a second signal cancels them at once",
    )
    log_level: str = setting("info", _choice(*LOG_LEVELS), "lowest level logged")
    log_format: str = setting(
        "json", _choice(*LOG_FORMATS), "how log lines are written (json: one object a line)"
    )
    access_log: bool = setting(
        True, Parse("true or false", _flag), "log every HTTP request (hypercorn's access log)"
    )
    store: str = setting(
        "sqlite:///order-pipeline.db",
        Parse(
            "sqlite:///PATH (a file, relative to the working directory; sqlite:////abs/path "
            "for an absolute one; one host), postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME "
            "(several hosts; needs the postgres extra), or memory (nothing durable)",
            _store_url,
        ),
        "where orders are kept",
    )
    lease_timeout: float = setting(
        5.0,
        # Renewed every min(1 s, a third of it): a shorter lease lapses at the first slow
        # commit, and the process's live orders would be undone under it.
        _seconds(zero_ok=False, least=LEASE_TIMEOUT_MIN),
        "a process that has not renewed its lease for this long is taken for dead, and its "
        "running orders are undone",
    )
    retention: float = setting(
        86_400.0, _seconds(zero_ok=False), "finished orders are kept this long, then forgotten"
    )

    @property
    def hard_exit_delay(self) -> float:
        """Seconds from SIGTERM after which a process still draining is ended: counted from the
        signal, so the drain delay is in it (a worker and its supervisor count alike)."""
        return (
            self.drain_delay + self.shutdown_grace + self.compensation_timeout + HARD_EXIT_MARGIN_S
        )

    @staticmethod
    def env_name(field: str) -> str:
        return ENV_PREFIX + field.upper()

    @staticmethod
    def flag_name(field: str) -> str:
        return "--" + field.replace("_", "-")
