"""The one owner of order outcomes: every finished, cancelled or refused order, reported once.

The pipeline hands it each result (`finished`, cancelled orders included) and the
transport each order refused before it ran (`refused`). Each becomes one log
line on the `order_pipeline.orders` logger and the matching metrics. Nothing
else logs or counts orders.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Final

import attrs

from .kinds import label, lookup
from .metrics import Metrics
from .model import OrderResult, StepResult
from .serialization import converter

__all__ = ["ORDERS_LOGGER", "OrderReporter"]

ORDERS_LOGGER: Final = "order_pipeline.orders"
_orders = logging.getLogger(ORDERS_LOGGER)


def _log_order(
    order_id: str | None,
    kind: str | None,
    http_status: int,
    duration_ms: int,
    steps: Iterable[StepResult],
) -> None:
    fields: dict[str, Any] = {
        "order_id": order_id,
        "status": "ok" if kind is None else "error",
        "kind": label(kind),
        "http_status": http_status,
        "duration_ms": duration_ms,
        "steps": [converter.unstructure(s) for s in steps],
    }
    _orders.info("order %s %s", order_id, fields["kind"], extra={"fields": fields})


@attrs.frozen
class OrderReporter:
    """Turns each order's outcome into its log line and its metrics."""

    metrics: Metrics

    def finished(self, result: OrderResult) -> None:
        """An order that ran: succeeded, failed, timed out or was cancelled."""
        status = lookup(result.kind).status
        _log_order(result.order_id, result.kind, status, result.duration_ms, result.steps)
        self.metrics.observe_order(result, label(result.kind), status)

    def refused(self, kind: str, http_status: int, order_id: str | None) -> None:
        """An order refused before any step ran (a bad body, too large, too slow to arrive)."""
        _log_order(order_id, kind, http_status, 0, ())
        self.metrics.count_order(kind, http_status)
