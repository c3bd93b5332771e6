"""The one owner of order outcomes: every finished, cancelled or refused order, reported once.

The pipeline hands it each step's outcome as it ends (`step_ended`) and each
order's result (`finished`, cancelled and recovered orders included); the
transport and the order desk hand it each order refused before it ran (`refused`).
An order's result becomes one log line on the `order_pipeline.orders` logger, the
matching metrics and, for an order the store knows, its final record; a step's outcome
becomes a record in the store. Nothing else logs, counts or records outcomes, but for
the orchestrator's error line on a compensation that failed (an operator's alarm).
Records are queued: they ride on the commit of the store's next call that
waits, such as the read of the reply the order desk awaits before it replies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Final

import attrs

from .kinds import label
from .metrics import Metrics
from .model import OrderResult, StepResult, StepStatus, current_attempt
from .serialization import dump_document, result_reply
from .store import UNKNOWN_OUTCOME, OrderStore, StepRecord

__all__ = ["ORDERS_LOGGER", "OrderReporter"]

ORDERS_LOGGER: Final = "order_pipeline.orders"
_orders = logging.getLogger(ORDERS_LOGGER)
# Not the orders' logger, which has exactly one line per order.
log = logging.getLogger(__name__)


def _step_summary(step: StepResult) -> str:
    text = f"{step.name} {step.status}"
    if step.duration_ms is not None:  # None: `unknown`, timed by nobody
        text += f" {step.duration_ms} ms"
    if step.compensation is not None:
        text += f" (undone {step.compensation.status} {step.compensation.duration_ms} ms)"
    return text


def _summary(
    order_id: str, kind: str | None, http_status: int | None, duration_ms: int, steps: str
) -> str:
    """The line as a person reads it: `order o-1 ok 200 in 202 ms: payment ok 151 ms, ...`."""
    if http_status is None:
        return f"order {order_id} {label(kind)} after {duration_ms} ms, no reply sent: {steps}"
    return f"order {order_id} {label(kind)} {http_status} in {duration_ms} ms: {steps}"


def _log_order(
    order_id: str,
    kind: str | None,
    http_status: int | None,
    duration_ms: int,
    steps: Iterable[StepResult],
    unstructured: Iterable[dict[str, Any]],
) -> None:
    """The one line of an order that ran; `http_status` None: nothing was sent. `unstructured`
    is `steps` as the order's reply has them."""
    fields: dict[str, Any] = {
        "order_id": order_id,
        "status": "ok" if kind is None else "error",
        "kind": label(kind),
        "http_status": http_status,
        "duration_ms": duration_ms,
        "steps": list(unstructured),
    }
    summary = ", ".join(_step_summary(s) for s in steps)
    message = _summary(order_id, kind, http_status, duration_ms, summary)
    _orders.info(message, extra={"fields": fields, "summary": True})


def _log_cancelled_by_drain(result: OrderResult) -> None:
    """`order o-1 cancelled by the drain: undone payment ok 81 ms, courier ok 30 ms` (or
    `payment error 81 ms`: the order is then `compensation_failed`, and its error line says
    so too)."""
    undone = [(s.name, s.compensation) for s in result.steps if s.compensation is not None]
    outcome = ", ".join(f"{name} {c.status} {c.duration_ms} ms" for name, c in undone)
    fields = {"order_id": result.order_id, "undone": {name: c.status for name, c in undone}}
    log.warning(
        "order %s cancelled by the drain: %s",
        result.order_id, f"undone {outcome}" if undone else "nothing to undo",
        extra={"fields": fields},
    )  # fmt: skip # the message, then its arguments


def step_record(step: StepResult) -> StepRecord:
    """A step's record; an `unknown` step as "ok" in 0 ms, marked `UNKNOWN_OUTCOME`, which
    an older version can read (see `StepRecord`)."""
    compensation = step.compensation
    unknown = step.status is StepStatus.UNKNOWN
    return StepRecord(
        step.name,
        StepStatus.OK if unknown else step.status,
        UNKNOWN_OUTCOME if unknown else step.detail,
        step.duration_ms or 0,  # None only if unknown
        None if compensation is None else compensation.status,
        None if compensation is None else compensation.duration_ms,
    )


@attrs.frozen
class OrderReporter:
    """Turns each order's outcome into its log line, its metrics and its stored record."""

    metrics: Metrics
    store: OrderStore
    # Whether an order cancelled now was cancelled by the server's drain (its grace ran out, or
    # a second signal), not by its client leaving: such an order is also a warning, since the
    # server, not the client, gave up on it.
    cancelled_by_drain: Callable[[], bool] = lambda: False

    def step_ended(self, step: StepResult) -> None:
        """A step or a compensation ended: record it under the order's attempt."""
        attempt = current_attempt.get()
        if attempt is not None:
            self.store.record_step(attempt.key, attempt.id, step_record(step), owner=attempt.owner)

    def finished(self, result: OrderResult) -> None:
        """An order that ran: succeeded, failed, timed out, was cancelled or was recovered."""
        status, reply = result_reply(result)
        # A cancelled order's client is gone (or the drain gave up on it): no reply is sent.
        sent = None if result.cancelled else status
        steps = reply["steps"]
        # The record first: metrics that raise (prometheus-client's multiprocess files are
        # opened on first use, which fails with EMFILE under a low `ulimit -n`) must not leave
        # the order running under this process's live lease, where nobody recovers it.
        attempt = current_attempt.get()
        try:
            if attempt is not None:
                body = dump_document(reply)
                self.store.finish_soon(
                    attempt.key, attempt.id, status, body, result.kind, owner=attempt.owner
                )
        finally:  # a store already closed (StoreUnavailable) still leaves the line and count
            _log_order(result.order_id, result.kind, sent, result.duration_ms, result.steps, steps)
            if result.cancelled and self.cancelled_by_drain():
                _log_cancelled_by_drain(result)
            self.metrics.observe_order(result, label(result.kind), status)

    def refused(self, kind: str, http_status: int, order_id: str | None, reason: str) -> None:
        """An order answered without running: a bad body, too large, too slow to arrive, its
        key busy or taken, or the store unavailable. `reason` is what the reply says."""
        fields: dict[str, Any] = {
            "order_id": order_id,
            "status": "error",
            "kind": kind,
            "http_status": http_status,
            "duration_ms": 0,
            "steps": [],
            "reason": reason,
        }
        order = "order" if order_id is None else f"order {order_id}"
        message = f"{order} refused {http_status} {kind}: {reason}"
        _orders.info(message, extra={"fields": fields, "summary": True})
        self.metrics.count_order(kind, http_status)
