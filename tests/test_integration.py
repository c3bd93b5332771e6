"""The real services behind the real app, in process, on Trio's virtual clock."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
import trio.testing

from order_pipeline.server import Assembly, Settings, assemble

from .timings import DEADLINE_MS, DELAY_MS, UNDO_MS, seconds

PAYMENT, VENDOR, COURIER = DELAY_MS["payment"], DELAY_MS["vendor"], DELAY_MS["courier"]


@pytest.fixture(name="service")
def _service() -> Assembly:
    """The real services behind the real app, with the default settings."""
    return assemble(Settings())


async def post(service: Assembly, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = await service.app.test_client().post("/order", json=body)
    return response.status_code, json.loads(await response.get_data())


REFUNDED = {"status": "ok", "duration_ms": UNDO_MS["payment"]}
RELEASED = {"status": "ok", "duration_ms": UNDO_MS["courier"]}

# The README's four curl examples, with the bodies they give on the virtual clock
# (a real server adds a millisecond or so to each duration).
README_EXAMPLES = [
    (
        {"order_id": "o-1", "amount": 1299},
        200,
        {
            "status": "ok",
            "order_id": "o-1",
            "steps": [
                {"name": "payment", "status": "ok", "duration_ms": PAYMENT},
                {"name": "vendor", "status": "ok", "duration_ms": VENDOR},
                {"name": "courier", "status": "ok", "duration_ms": COURIER},
            ],
        },
    ),
    (
        {"order_id": "o-2", "amount": 1299, "fail_step": "payment", "delay_ms": {"courier": 300}},
        400,
        {
            "status": "error",
            "order_id": "o-2",
            "steps": [
                {
                    "name": "payment",
                    "status": "error",
                    "duration_ms": PAYMENT,
                    "detail": "payment_declined",
                },
                {"name": "vendor", "status": "canceled", "duration_ms": PAYMENT},
                {"name": "courier", "status": "canceled", "duration_ms": PAYMENT},
            ],
            "error": {"kind": "payment_declined", "message": "order failed"},
        },
    ),
    (
        {"order_id": "o-3", "amount": 1299, "fail_step": "vendor"},
        503,
        {
            "status": "error",
            "order_id": "o-3",
            "steps": [
                {
                    "name": "payment",
                    "status": "ok",
                    "duration_ms": PAYMENT,
                    "compensation": REFUNDED,
                },
                {
                    "name": "vendor",
                    "status": "error",
                    "duration_ms": VENDOR,
                    "detail": "vendor_unavailable",
                },
                {
                    "name": "courier",
                    "status": "ok",
                    "duration_ms": COURIER,
                    "compensation": RELEASED,
                },
            ],
            "error": {"kind": "vendor_unavailable", "message": "order failed"},
        },
    ),
    (
        {"order_id": "o-4", "amount": 1299, "delay_ms": {"vendor": 15000}},
        504,
        {
            "status": "error",
            "order_id": "o-4",
            "steps": [
                {
                    "name": "payment",
                    "status": "ok",
                    "duration_ms": PAYMENT,
                    "compensation": REFUNDED,
                },
                {"name": "vendor", "status": "canceled", "duration_ms": DEADLINE_MS},
                {
                    "name": "courier",
                    "status": "ok",
                    "duration_ms": COURIER,
                    "compensation": RELEASED,
                },
            ],
            "error": {"kind": "timeout", "message": "order did not complete before its deadline"},
        },
    ),
]


@pytest.mark.parametrize(("request_body", "status", "reply"), README_EXAMPLES)
async def test_readme_examples(
    service: Assembly,
    autojump_clock: trio.abc.Clock,
    request_body: dict[str, Any],
    status: int,
    reply: dict[str, Any],
) -> None:
    """Each README curl example gives exactly its documented status and body."""
    assert await post(service, request_body) == (status, reply)
    assert service.tracker.in_flight == 0


async def test_payment_failure_cancels_vendor_and_courier(
    service: Assembly, autojump_clock: trio.abc.Clock
) -> None:
    """Through the real services, a declined payment cancels vendor and courier."""
    status, body = await post(service, {"order_id": "o", "amount": 0, "delay_ms": {"courier": 500}})

    assert status == 400
    assert [(s["name"], s["status"]) for s in body["steps"]] == [
        ("payment", "error"),
        ("vendor", "canceled"),
        ("courier", "canceled"),
    ]
    assert trio.current_time() == seconds(PAYMENT)
    assert (service.tracker.in_flight, service.pool.in_use) == (0, 0)


async def test_pool_wait_counts_in_courier_duration(autojump_clock: trio.abc.Clock) -> None:
    """With one courier, the second order's courier step includes its wait for the slot."""
    service = assemble(Settings(courier_pool_size=1))
    replies: list[dict[str, Any]] = []

    async def order(order_id: str) -> None:
        replies.append((await post(service, {"order_id": order_id, "amount": 1}))[1])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(order, "first")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(order, "second")

    couriers = {r["order_id"]: r["steps"][2]["duration_ms"] for r in replies}
    assert couriers == {"first": COURIER, "second": 2 * COURIER}
