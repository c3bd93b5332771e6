"""HTTP transport: the Quart-Trio app, which depends only on an `OrderDesk` (a protocol) and
the `Answer` it gives."""

from .app import OrderDesk, create_app

__all__ = ["OrderDesk", "create_app"]
