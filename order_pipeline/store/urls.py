"""How a store URL is shown in messages and logs (never with its password), and a
PostgreSQL URL read as libpq reads it."""

from __future__ import annotations

from typing import Any, Final

from .base import StoreError, one_line

__all__ = ["NOT_SHOWN", "postgres_params", "shown_url"]

_INSTALL: Final = "pip install 'order-pipeline[postgres]'"


NOT_SHOWN: Final = "(not shown: it may hold a password)"


def shown_url(url: str) -> str:
    """A SQLite URL (or memory) whole; any other only from its last `@` to the end of its
    host: a password may hold `?`, `#` or `/` (libpq itself then misreads the URL), and a
    URL that is not one (`host=db password=...`, `postgresql:/u:p@db`) is not shown. A
    SQLite one in any case (`SQLITE:///orders.db`, refused): holding no password, whole."""
    if url == "memory" or url.lower().startswith("sqlite:"):
        return url
    if "://" not in url:
        return NOT_SHOWN if "@" in url or "=" in url else url
    scheme, _, rest = url.partition("://")
    host = rest.rpartition("@")[2]
    return f"{scheme}://{host.split('/', 1)[0].split('?', 1)[0]}"


def postgres_params(url: str) -> dict[str, Any]:
    """libpq's own parsing of the URL, so a bad one is refused at start, password unshown."""
    shown = shown_url(url)
    try:
        from psycopg import Error
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise StoreError(f"{shown}: a PostgreSQL store needs psycopg: {_INSTALL}") from None
    try:
        return conninfo_to_dict(url)
    except Error as exc:
        cause = one_line(exc).replace(url, shown)  # libpq may quote it whole
        raise StoreError(f"{shown}: not a valid PostgreSQL URL: {cause}") from None
