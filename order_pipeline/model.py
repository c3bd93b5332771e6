"""The values every layer passes around: an order, a step's result, an order's result.

Plain data: the rules a request must meet are stated here as constants and
constrained types, and enforced where input enters, by the converter in
`serialization`.
"""

from __future__ import annotations

import contextvars
import enum
import os
from collections.abc import Mapping
from typing import Final, Literal, NewType, Protocol, get_args, runtime_checkable

import attrs

StepName = Literal["payment", "vendor", "courier"]
STEP_NAMES: Final[tuple[StepName, ...]] = get_args(StepName)

ORDER_ID_MAX_CHARS: Final = 128
MAX_DELAY_MS: Final = 600_000
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1


@runtime_checkable
class Classified(Protocol):
    """An error that says what kind of failure it is.

    The orchestrator reads `kind` structurally, so a new service brings its own
    kinds without touching orchestration code.
    """

    @property
    def kind(self) -> str: ...


def may_have_taken_effect(exc: BaseException) -> bool:
    """Whether a step that raised `exc` may still have done its work: the error says so with
    `may_have_taken_effect = True` (a write whose answer was lost, such as a PostgreSQL
    COMMIT). Such a step is compensated as one that succeeded; compensations are idempotent."""
    return getattr(exc, "may_have_taken_effect", False) is True


class StepError(Exception):
    """A step failed in an expected, classified way (a decline, an outage)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


# Constrained scalars: the converter checks type and range for each, so the path
# in an error message names the exact field (`$.delay_ms['payment']`).
OrderId = NewType("OrderId", str)
Int64 = NewType("Int64", int)
DelayMs = NewType("DelayMs", int)


@attrs.frozen
class OrderRequest:
    """One order as the client sent it; `serialization.parse_order` validates it."""

    order_id: OrderId
    amount: Int64 = Int64(0)
    fail_step: StepName | None = None
    delay_ms: Mapping[StepName, DelayMs] = attrs.field(factory=dict)
    fail_compensation: StepName | None = None
    compensation_delay_ms: Mapping[StepName, DelayMs] = attrs.field(factory=dict)


class StepStatus(enum.StrEnum):
    OK = "ok"
    ERROR = "error"
    CANCELED = "canceled"
    # Recovery's word for a step whose outcome its dead process never recorded: it may have
    # taken effect, so it is undone as one that succeeded.
    UNKNOWN = "unknown"


class CompensationStatus(enum.StrEnum):
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"


@attrs.frozen
class Compensation:
    """How undoing a completed step ended."""

    status: CompensationStatus
    duration_ms: int


@attrs.frozen
class StepResult:
    """How one step ended; `detail` is the failure kind, only on `error`.

    `duration_ms` is None exactly on `unknown`: nobody timed that step.
    `compensation` is there only for a step that succeeded in an order that then
    failed, and so was undone (or that failed but may have done its work, or whose
    outcome is unknown).
    """

    name: str
    status: StepStatus
    duration_ms: int | None
    detail: str | None = None
    compensation: Compensation | None = None


@attrs.frozen
class OrderResult:
    """How a whole order ended; `kind` is None exactly when every step succeeded."""

    order_id: str
    steps: tuple[StepResult, ...]
    kind: str | None = None
    duration_ms: int = 0
    # Cancelled from outside (its client left, or the drain gave up on it): no reply is sent,
    # whatever the kind (`compensation_failed` if undoing it failed too).
    cancelled: bool = False
    # Undone by recovery after its process died: its steps were not timed here (a step with no
    # record is given as unknown, untimed, to be undone), so they are not step observations.
    recovered: bool = False

    @property
    def ok(self) -> bool:
        return self.kind is None


@attrs.frozen
class ErrorInfo:
    kind: str
    message: str


@attrs.frozen
class Reply:
    """The one JSON shape of every response, success or error.

    Fields left at their default are omitted, so a bad request has no `steps` and
    a success has no `error`.
    """

    status: Literal["ok", "error", "running"]
    order_id: str | None = None
    steps: tuple[StepResult, ...] | None = None
    error: ErrorInfo | None = None


@attrs.frozen
class Attempt:
    """One stored run of an order: its idempotency key, an id unique to this run, its owner.

    The payment ledger charges under the attempt's id, and the store files each
    step's outcome under it; the owner is the serving process that runs it.
    """

    key: str
    id: str
    owner: str


current_attempt: contextvars.ContextVar[Attempt | None] = contextvars.ContextVar(
    "current_attempt", default=None
)
"""The attempt the current task works for. Set once per order, like the request ID: Trio
copies it into every step and compensation task, so the step signature stays the order alone."""


def new_id() -> str:
    """A random 128-bit ID in hex (a request's, a server-made key, an attempt's, an owner's):
    a UUID4's randomness at a fifth of `uuid.uuid4().hex`'s cost, paid three times a request."""
    return os.urandom(16).hex()
