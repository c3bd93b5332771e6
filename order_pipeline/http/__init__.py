"""HTTP transport: the Quart-Trio app, which depends only on an `OrderDesk`."""

from .app import OrderDesk, create_app

__all__ = ["OrderDesk", "create_app"]
