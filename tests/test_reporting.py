"""The reporter of order outcomes, alone: what it records in the store for an order's attempt."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import attrs
import pytest

from order_pipeline.logs import JsonFormatter
from order_pipeline.metrics import Metrics
from order_pipeline.model import (
    Attempt,
    Compensation,
    CompensationStatus,
    OrderResult,
    StepResult,
    StepStatus,
    current_attempt,
)
from order_pipeline.reporting import ORDERS_LOGGER, OrderReporter
from order_pipeline.serialization import encode_result
from order_pipeline.store import MemoryStore, StepRecord, StoredOrder

KEY = "key-1"
PAID = StepResult(
    "payment", StepStatus.OK, 150, compensation=Compensation(CompensationStatus.OK, 80)
)
FAILED = StepResult("vendor", StepStatus.ERROR, 200, "vendor_unavailable")
RESULT = OrderResult("o-1", (PAID, FAILED), "vendor_unavailable", 280)


@pytest.fixture(name="store")
def _store() -> MemoryStore:
    """An empty memory store."""
    return MemoryStore()


@pytest.fixture(name="reporter")
def _reporter(store: MemoryStore) -> OrderReporter:
    """A reporter to `store`, with metrics of its own."""
    return OrderReporter(Metrics(), store)


async def begin(store: MemoryStore, owner: str) -> StoredOrder:
    """A running order under KEY, owned by `owner`."""
    begun = await store.begin(KEY, "o-1", "hash", b"{}", owner)
    return begun.order


@contextmanager
def working_for(attempt: Attempt) -> Iterator[None]:
    """Run the block as the task that works for `attempt`, as the order desk sets it."""
    token = current_attempt.set(attempt)
    try:
        yield
    finally:
        current_attempt.reset(token)


async def test_each_step_is_recorded_with_its_detail_and_its_compensation(
    store: MemoryStore, reporter: OrderReporter
) -> None:
    """A step's record keeps its status, failure detail, duration and its compensation's outcome."""
    stored = await begin(store, "me")
    with working_for(Attempt(KEY, stored.attempt_id, "me")):
        reporter.step_ended(FAILED)
        reporter.step_ended(PAID)

    found = await store.get(KEY)

    assert found is not None
    assert set(found.steps) == {
        StepRecord("vendor", "error", "vendor_unavailable", 200, None, None),
        StepRecord("payment", "ok", None, 150, "ok", 80),
    }


async def test_a_finished_order_is_recorded_with_its_reply(
    store: MemoryStore, reporter: OrderReporter
) -> None:
    """An order that ran is recorded finished, with its HTTP status, its reply and its kind."""
    stored = await begin(store, "me")
    with working_for(Attempt(KEY, stored.attempt_id, "me")):
        reporter.finished(RESULT)

    found = await store.get(KEY)

    assert found is not None
    assert found.state == "finished"
    assert (found.http_status, found.reply) == encode_result(RESULT)
    assert found.kind == "vendor_unavailable"


class _MetricsOutOfFiles(Metrics):
    """Metrics whose first observation cannot open its file: prometheus-client's multiprocess
    mode (`--workers`) opens one per metric type and process when first used, and under a
    low `ulimit -n` with every descriptor held by connections that fails (EMFILE)."""

    def observe_order(self, result: OrderResult, kind: str, http_status: int) -> None:
        raise OSError(24, "Too many open files")


async def test_an_order_whose_metrics_fail_is_still_recorded(store: MemoryStore) -> None:
    """Metrics that raise do not cost the order its final record: unrecorded, it stayed
    running under the live owner's lease (its client answered 503, a retry 409, for as long
    as the process lived) and was then undone as interrupted though every step succeeded."""
    reporter = OrderReporter(_MetricsOutOfFiles(), store)
    stored = await begin(store, "me")
    with (
        working_for(Attempt(KEY, stored.attempt_id, "me")),
        pytest.raises(OSError, match="Too many open files"),
    ):
        reporter.finished(RESULT)

    found = await store.get(KEY)

    assert found is not None
    assert found.state == "finished"
    assert (found.http_status, found.reply) == encode_result(RESULT)


async def test_an_order_claimed_by_another_process_is_left_to_it(
    store: MemoryStore, reporter: OrderReporter
) -> None:
    """A result reported after another process claimed the order (our lease lapsed) does not
    overwrite the claimant's record."""
    stored = await begin(store, "me")
    (claimed,) = await store.claim_interrupted("rescuer", 10)
    assert claimed.owner == "rescuer"
    with working_for(Attempt(KEY, stored.attempt_id, "me")):
        reporter.finished(RESULT)

    found = await store.get(KEY)

    assert found is not None
    assert found.state == "running"
    assert found.owner == "rescuer"


def order_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == ORDERS_LOGGER]


def test_a_failed_order_s_line_says_error_in_words_and_fields(
    reporter: OrderReporter, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed order's line: status error, its kind and status, each step and its undoing."""
    with caplog.at_level(logging.INFO, logger=ORDERS_LOGGER):
        reporter.finished(RESULT)

    (line,) = order_lines(caplog)
    assert line.getMessage() == (
        "order o-1 vendor_unavailable 503 in 280 ms: payment ok 150 ms (undone ok 80 ms),"
        " vendor error 200 ms"
    )
    fields = line.fields  # type: ignore[attr-defined] # set by `extra={"fields": ...}`
    assert (fields["status"], fields["kind"], fields["http_status"]) == (
        "error",
        "vendor_unavailable",
        503,
    )
    assert line.summary is True  # type: ignore[attr-defined] # set by `extra`


def test_a_refused_order_s_line_has_no_steps_and_its_reason(
    reporter: OrderReporter, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused order's line: its reason in words and fields, no steps, the words alone."""
    with caplog.at_level(logging.INFO, logger=ORDERS_LOGGER):
        reporter.refused("idempotency_key_reused", 422, "o-2", "this key was used before")

    (line,) = order_lines(caplog)
    assert (
        line.getMessage()
        == "order o-2 refused 422 idempotency_key_reused: this key was used before"
    )
    assert line.fields == {  # type: ignore[attr-defined] # set by `extra={"fields": ...}`
        "order_id": "o-2",
        "status": "error",
        "kind": "idempotency_key_reused",
        "http_status": 422,
        "duration_ms": 0,
        "steps": [],
        "reason": "this key was used before",
    }
    assert line.summary is True  # type: ignore[attr-defined] # set by `extra`


def test_a_refused_order_without_an_order_id_has_it_null_in_its_json_line(
    reporter: OrderReporter, caplog: pytest.LogCaptureFixture
) -> None:
    """No order_id (none in the body, or the body not parsed): the JSON line still has the
    field, `null`, as README says; the words say `order refused ...`."""
    with caplog.at_level(logging.INFO, logger=ORDERS_LOGGER):
        reporter.refused("unsupported_media_type", 415, None, "send it uncompressed")

    (line,) = order_lines(caplog)
    assert line.getMessage() == "order refused 415 unsupported_media_type: send it uncompressed"
    written = json.loads(JsonFormatter().format(line))
    assert "order_id" in written
    assert written["order_id"] is None


def test_a_cancelled_order_says_no_reply_was_sent_whatever_its_kind(
    store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancelled from outside, an order whose undoing failed is compensation_failed, but its
    client is gone all the same: no status in its line, and it counts as cancelled."""
    metrics = Metrics()
    reporter = OrderReporter(metrics, store)
    unrefunded = attrs.evolve(PAID, compensation=Compensation(CompensationStatus.ERROR, 80))

    with caplog.at_level(logging.INFO, logger=ORDERS_LOGGER):
        reporter.finished(OrderResult("o-4", (unrefunded,), "compensation_failed", 90, True))
        reporter.finished(OrderResult("o-5", (unrefunded,), "compensation_failed", 90))

    cancelled, failed = (r.getMessage() for r in caplog.records if r.name == ORDERS_LOGGER)
    assert cancelled.startswith("order o-4 compensation_failed after 90 ms, no reply sent: ")
    assert failed.startswith("order o-5 compensation_failed 500 in 90 ms: ")
    assert metrics.registry.get_sample_value("order_pipeline_orders_canceled_total") == 1


def test_an_order_the_drain_cancelled_with_nothing_to_undo_says_so(
    store: MemoryStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A drain-cancelled order none of whose steps had succeeded: "nothing to undo"."""
    reporter = OrderReporter(Metrics(), store, cancelled_by_drain=lambda: True)
    canceled = StepResult("payment", StepStatus.CANCELED, 40)

    with caplog.at_level(logging.WARNING, logger="order_pipeline.reporting"):
        reporter.finished(OrderResult("o-3", (canceled,), "canceled", 40, cancelled=True))

    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == "order o-3 cancelled by the drain: nothing to undo"


async def test_a_step_reported_after_another_process_claimed_the_order_is_left_out(
    store: MemoryStore, reporter: OrderReporter
) -> None:
    """A step outcome reported after another process claimed the order (our lease lapsed)
    does not overwrite the claimant's records."""
    stored = await begin(store, "me")
    await store.claim_interrupted("rescuer", 10)
    with working_for(Attempt(KEY, stored.attempt_id, "me")):
        reporter.step_ended(PAID)

    found = await store.get(KEY)

    assert found is not None
    assert found.steps == ()
