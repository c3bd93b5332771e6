"""Every outcome kind an order or request can end with, and what it means to a client: one table.

A kind is a string that a step's error carries (`model.Classified`), that the
orchestrator decides (timeout, canceled, ...) or that the transport decides
(bad_request, not_found, ...). `KINDS` gives each its HTTP status, its message
and whether a client should retry after a pause (`Retry-After`). An order that
succeeded has no kind (`None`); `label` is the one place that calls it "ok".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import attrs

__all__ = [
    "BAD_REQUEST",
    "CANCELED",
    "COMPENSATION_FAILED",
    "HTTP_ERROR",
    "IDEMPOTENCY_KEY_REUSED",
    "INTERNAL",
    "INTERRUPTED",
    "KINDS",
    "METHOD_NOT_ALLOWED",
    "NOT_FOUND",
    "NO_COURIER",
    "OK",
    "ORDER_IN_PROGRESS",
    "PAYLOAD_TOO_LARGE",
    "PAYMENT_DECLINED",
    "REQUEST_TIMEOUT",
    "STORE_UNAVAILABLE",
    "TIMEOUT",
    "UNSUPPORTED_MEDIA_TYPE",
    "VENDOR_UNAVAILABLE",
    "Kind",
    "kind_of",
    "kind_of_status",
    "label",
    "lookup",
]


@attrs.frozen
class Kind:
    status: int
    message: str
    retry_after: bool = False


OK: Final = "ok"
"""The label of an order with no kind: every step succeeded."""

# Brought by the services' steps.
PAYMENT_DECLINED: Final = "payment_declined"
VENDOR_UNAVAILABLE: Final = "vendor_unavailable"
NO_COURIER: Final = "no_courier"
# Decided by the orchestrator.
TIMEOUT: Final = "timeout"
CANCELED: Final = "canceled"
INTERNAL: Final = "internal"
COMPENSATION_FAILED: Final = "compensation_failed"
# Decided by the transport, before an order runs.
BAD_REQUEST: Final = "bad_request"
NOT_FOUND: Final = "not_found"
METHOD_NOT_ALLOWED: Final = "method_not_allowed"
REQUEST_TIMEOUT: Final = "request_timeout"
PAYLOAD_TOO_LARGE: Final = "payload_too_large"
UNSUPPORTED_MEDIA_TYPE: Final = "unsupported_media_type"
HTTP_ERROR: Final = "http_error"
"""Any other status the framework answers by itself; the reply keeps that status."""
# Decided by the order desk and its store.
ORDER_IN_PROGRESS: Final = "order_in_progress"
IDEMPOTENCY_KEY_REUSED: Final = "idempotency_key_reused"
STORE_UNAVAILABLE: Final = "store_unavailable"
INTERRUPTED: Final = "interrupted"
"""Its process died mid-order; another undid what it had done."""

ORDER_FAILED: Final = "order failed"

KINDS: Final[Mapping[str, Kind]] = {
    PAYMENT_DECLINED: Kind(400, ORDER_FAILED),
    VENDOR_UNAVAILABLE: Kind(503, ORDER_FAILED, retry_after=True),
    NO_COURIER: Kind(503, ORDER_FAILED, retry_after=True),
    TIMEOUT: Kind(504, "order did not complete before its deadline"),
    CANCELED: Kind(408, "order was canceled"),
    INTERNAL: Kind(500, "internal error"),
    COMPENSATION_FAILED: Kind(500, "order failed and could not be fully undone"),
    BAD_REQUEST: Kind(400, "bad request"),
    NOT_FOUND: Kind(404, "no such endpoint"),
    METHOD_NOT_ALLOWED: Kind(405, "method not allowed"),
    REQUEST_TIMEOUT: Kind(408, "request body not received in time"),
    PAYLOAD_TOO_LARGE: Kind(413, "request body too large"),
    UNSUPPORTED_MEDIA_TYPE: Kind(
        415, "request body's Content-Encoding is not supported: send it uncompressed"
    ),
    HTTP_ERROR: Kind(500, "http error"),
    ORDER_IN_PROGRESS: Kind(409, "an order with this key is still running", retry_after=True),
    IDEMPOTENCY_KEY_REUSED: Kind(422, "this key was used for a different order"),
    STORE_UNAVAILABLE: Kind(503, "orders cannot be recorded now", retry_after=True),
    INTERRUPTED: Kind(503, "the order was interrupted and undone; send it again", retry_after=True),
}

_SUCCESS: Final = Kind(200, OK)


def lookup(kind: str | None) -> Kind:
    """The entry of `kind`; success for None, and `internal` for a kind nobody mapped."""
    if kind is None:
        return _SUCCESS
    return KINDS.get(kind, KINDS[INTERNAL])


def kind_of(exc: BaseException) -> str:
    """The kind an error says it is (`model.Classified`): `internal` if it says none."""
    kind = getattr(exc, "kind", None)
    return kind if isinstance(kind, str) else INTERNAL


def label(kind: str | None) -> str:
    """The kind as logs and metrics name it: "ok" for an order that succeeded."""
    return OK if kind is None else kind


# The framework signals these by raising an HTTPException with the status.
_FRAMEWORK_KINDS: Final = {
    KINDS[kind].status: kind
    for kind in (BAD_REQUEST, NOT_FOUND, METHOD_NOT_ALLOWED, REQUEST_TIMEOUT, PAYLOAD_TOO_LARGE)
}


def kind_of_status(status: int) -> str:
    """The kind of an error status the framework answered by itself."""
    return _FRAMEWORK_KINDS.get(status, HTTP_ERROR)
