"""HTTP transport: the Quart-Trio app, which depends only on an `OrderProcessor`."""

from .app import OrderProcessor, create_app

__all__ = ["OrderProcessor", "create_app"]
