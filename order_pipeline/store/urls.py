"""How a store URL is shown in messages and logs: never with its password."""

from __future__ import annotations

from typing import Final

__all__ = ["NOT_SHOWN", "shown_url"]


NOT_SHOWN: Final = "(not shown: it may hold a password)"


def shown_url(url: str) -> str:
    """A SQLite URL (or memory) whole; any other only from its last `@` to the end of its
    host: a password may hold `?`, `#` or `/` (libpq itself then misreads the URL), and a
    URL that is not one (`host=db password=...`, `postgresql:/u:p@db`) is not shown."""
    if url == "memory" or url.startswith("sqlite:"):
        return url
    if "://" not in url:
        return NOT_SHOWN if "@" in url or "=" in url else url
    scheme, _, rest = url.partition("://")
    host = rest.rpartition("@")[2]
    return f"{scheme}://{host.split('/', 1)[0].split('?', 1)[0]}"
