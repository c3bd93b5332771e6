"""The reporter of order outcomes, alone: what it records in the store for an order's attempt."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

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
from order_pipeline.reporting import OrderReporter
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
