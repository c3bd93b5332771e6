"""Every error kind the API can answer with, and its HTTP status: the one table."""

from __future__ import annotations

from typing import Final

import attrs


@attrs.frozen
class Outcome:
    status: int
    message: str


ORDER_FAILED: Final = "order failed"

OUTCOMES: Final[dict[str, Outcome]] = {
    "payment_declined": Outcome(400, ORDER_FAILED),
    "vendor_unavailable": Outcome(503, ORDER_FAILED),
    "no_courier": Outcome(503, ORDER_FAILED),
    "timeout": Outcome(504, "order did not complete before its deadline"),
    "canceled": Outcome(408, "order was canceled"),
    "internal": Outcome(500, "internal error"),
    "compensation_failed": Outcome(500, "order failed and could not be fully undone"),
    "bad_request": Outcome(400, "bad request"),
    "not_found": Outcome(404, "no such endpoint"),
    "method_not_allowed": Outcome(405, "method not allowed"),
    "request_timeout": Outcome(408, "request body not received in time"),
    "payload_too_large": Outcome(413, "request body too large"),
}

# Quart and Werkzeug signal these by raising an HTTPException with the status.
KIND_BY_HTTP_STATUS: Final = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
}

UNKNOWN: Final = Outcome(500, "internal error")


def outcome_of(kind: str) -> Outcome:
    """The status and message for `kind`; a kind nobody mapped is a server error."""
    return OUTCOMES.get(kind, UNKNOWN)
