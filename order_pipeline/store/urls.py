"""How a store URL is shown in messages and logs: never with its password."""

from __future__ import annotations

__all__ = ["shown_url"]


def shown_url(url: str) -> str:
    """A SQLite URL (or memory) whole; any other only up to its host, since its user part
    may hold a password. libpq ends that part at the first `@` before a `/` (so a password
    may hold `?` or `#`), and the host at `/` or `?`."""
    if url == "memory" or url.startswith("sqlite:") or "://" not in url:
        return url
    scheme, _, rest = url.partition("://")
    authority = rest.split("/", 1)[0]
    return f"{scheme}://{authority.rpartition('@')[2].split('?', 1)[0]}"
