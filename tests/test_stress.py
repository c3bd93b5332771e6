"""20,000 requests from 100 concurrent clients, every reply checked exactly."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
import trio

from order_pipeline.server import Settings, assemble

from .timings import DELAY_MS, UNDO_MS

CLIENTS = 100
REQUESTS_PER_CLIENT = 200
PAYMENT, VENDOR, COURIER = DELAY_MS["payment"], DELAY_MS["vendor"], DELAY_MS["courier"]


def steps(
    *triples: tuple[str, str, int] | tuple[str, str, int, str], undone: bool = True
) -> list[dict[str, Any]]:
    """Expected steps; in a failed order (`undone`) each `ok` step carries its compensation."""
    out = []
    for name, status, duration, *detail in triples:
        step: dict[str, Any] = {"name": name, "status": status, "duration_ms": duration}
        if detail:
            step["detail"] = detail[0]
        if undone and status == "ok":
            step["compensation"] = {"status": "ok", "duration_ms": UNDO_MS[name]}
        out.append(step)
    return out


def failed(kind: str, message: str = "order failed") -> dict[str, Any]:
    return {"kind": kind, "message": message}


# (request without order_id, expected status, expected reply without order_id) on a
# service with a 1 s deadline and a pool large enough that no order waits for a courier.
MIX: list[tuple[dict[str, Any], int, dict[str, Any]]] = [
    (
        {"amount": 10},
        200,
        {
            "status": "ok",
            "steps": steps(
                ("payment", "ok", PAYMENT),
                ("vendor", "ok", VENDOR),
                ("courier", "ok", COURIER),
                undone=False,
            ),
        },
    ),
    (
        {"amount": 10, "fail_step": "payment", "delay_ms": {"courier": 300}},
        400,
        {
            "status": "error",
            "steps": steps(
                ("payment", "error", PAYMENT, "payment_declined"),
                ("vendor", "canceled", PAYMENT),
                ("courier", "canceled", PAYMENT),
            ),
            "error": failed("payment_declined"),
        },
    ),
    (
        {"amount": 0},
        400,
        {
            "status": "error",
            "steps": steps(
                ("payment", "error", PAYMENT, "payment_declined"),
                ("vendor", "canceled", PAYMENT),
                ("courier", "ok", COURIER),
            ),
            "error": failed("payment_declined"),
        },
    ),
    (
        {"amount": 10, "fail_step": "vendor"},
        503,
        {
            "status": "error",
            "steps": steps(
                ("payment", "ok", PAYMENT),
                ("vendor", "error", VENDOR, "vendor_unavailable"),
                ("courier", "ok", COURIER),
            ),
            "error": failed("vendor_unavailable"),
        },
    ),
    (
        {"amount": 10, "fail_step": "courier", "delay_ms": {"courier": 250}},
        503,
        {
            "status": "error",
            "steps": steps(
                ("payment", "ok", PAYMENT),
                ("vendor", "ok", VENDOR),
                ("courier", "error", 250, "no_courier"),
            ),
            "error": failed("no_courier"),
        },
    ),
    (
        {"amount": 10, "delay_ms": {"vendor": 2000, "payment": 0}},
        504,
        {
            "status": "error",
            "steps": steps(
                ("payment", "ok", 0), ("vendor", "canceled", 1000), ("courier", "ok", COURIER)
            ),
            "error": failed("timeout", "order did not complete before its deadline"),
        },
    ),
    (
        {"amount": "ten"},
        400,
        {
            "status": "error",
            "error": failed(
                "bad_request",
                "must be an integer from -9223372036854775808 to 9223372036854775807 @ $.amount",
            ),
        },
    ),
]


@pytest.mark.stress
async def test_twenty_thousand_mixed_requests(autojump_clock: trio.abc.Clock) -> None:
    """100 clients x 200 requests with every outcome: each reply exact, nothing left running."""
    service = assemble(Settings(request_timeout=1.0, courier_pool_size=128))
    client = service.app.test_client()
    statuses: dict[int, int] = {}
    checked = 0

    async def run_client(number: int) -> None:
        nonlocal checked
        for i, (body, status, reply) in zip(range(REQUESTS_PER_CLIENT), itertools.cycle(MIX)):
            order_id = f"c{number}-{i}"
            response = await client.post("/order", json={"order_id": order_id, **body})
            assert response.status_code == status
            assert json.loads(await response.get_data()) == {"order_id": order_id, **reply}
            statuses[status] = statuses.get(status, 0) + 1
            checked += 1

    async with trio.open_nursery() as nursery:
        for number in range(CLIENTS):
            nursery.start_soon(run_client, number)

    assert checked == CLIENTS * REQUESTS_PER_CLIENT
    assert set(statuses) == {200, 400, 503, 504}
    assert (service.tracker.in_flight, service.pool.in_use, service.pool.waiting) == (0, 0, 0)
