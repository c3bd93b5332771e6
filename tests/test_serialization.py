"""The converter as `make_converter` builds it: strict on input, terse on output.

These tests build a fresh converter in the test itself (the service's is built
at import), so each hook `configure_converter` registers is exercised at run
time, where a mutation tester can switch it.
"""

from __future__ import annotations

from typing import Any

import pytest

from order_pipeline.model import (
    Compensation,
    CompensationStatus,
    ErrorInfo,
    Reply,
    StepResult,
    StepStatus,
)
from order_pipeline.serialization import InvalidOrder, dump_reply, make_converter, parse_order

from .test_http import BAD_BODIES


@pytest.mark.parametrize(("body", "order_id", "message"), BAD_BODIES)
def test_a_fresh_converter_refuses_each_bad_body(
    body: str | bytes, order_id: str | None, message: str
) -> None:
    """Every body the HTTP tests refuse is refused by a newly made converter, with its message."""
    raw = body.encode() if isinstance(body, str) else body

    with pytest.raises(InvalidOrder) as refused:
        parse_order(raw, make_converter())

    assert message in refused.value.message
    assert refused.value.order_id == order_id


@pytest.mark.parametrize(
    ("document", "fields"),
    [
        ({"order_id": "a"}, {"amount": 0, "fail_step": None, "delay_ms": {}}),
        (
            {
                "order_id": "b",
                "amount": -(2**63),
                "fail_step": "vendor",
                "delay_ms": {"courier": 0},
            },
            {"amount": -(2**63), "fail_step": "vendor", "delay_ms": {"courier": 0}},
        ),
        (
            {"order_id": "c", "amount": 2**63 - 1, "compensation_delay_ms": {"payment": 600_000}},
            {"amount": 2**63 - 1, "compensation_delay_ms": {"payment": 600_000}},
        ),
        ({"order_id": "d", "fail_compensation": "courier"}, {"fail_compensation": "courier"}),
    ],
)
def test_a_fresh_converter_accepts_valid_orders(
    document: dict[str, Any], fields: dict[str, Any]
) -> None:
    """Valid orders, limits included, are read field by field."""
    converter = make_converter()

    order = parse_order(converter.dumps(document), converter)

    assert order.order_id == document["order_id"]
    for name, value in fields.items():
        assert getattr(order, name) == value


def test_replies_omit_what_is_absent() -> None:
    """A reply leaves out absent fields and steps leave out an absent detail or compensation."""
    converter = make_converter()
    steps = (
        StepResult(
            "payment", StepStatus.OK, 5, compensation=Compensation(CompensationStatus.OK, 1)
        ),
        StepResult("vendor", StepStatus.ERROR, 7, "vendor_unavailable"),
        StepResult("courier", StepStatus.CANCELED, 7),
    )

    assert dump_reply(Reply("error", error=ErrorInfo("bad_request", "m")), converter) == (
        b'{"status":"error","error":{"kind":"bad_request","message":"m"}}'
    )
    assert converter.loads(dump_reply(Reply("ok", "o", steps), converter), dict) == {
        "status": "ok",
        "order_id": "o",
        "steps": [
            {
                "name": "payment",
                "status": "ok",
                "duration_ms": 5,
                "compensation": {"status": "ok", "duration_ms": 1},
            },
            {"name": "vendor", "status": "error", "duration_ms": 7, "detail": "vendor_unavailable"},
            {"name": "courier", "status": "canceled", "duration_ms": 7},
        ],
    }
