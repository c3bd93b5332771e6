"""Arbitrary bodies against the handler: never a 5xx, never an exception, always JSON."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from order_pipeline.http import create_app
from order_pipeline.model import OrderRequest
from order_pipeline.serialization import InvalidOrder, converter, parse_order

from .fakes import StubProcessor

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)

# Objects that look like orders, so the fuzzing gets past "not an object" often.
near_orders = st.fixed_dictionaries(
    {},
    optional={
        "order_id": st.one_of(st.text(max_size=140), json_values),
        "amount": st.one_of(st.integers(min_value=-(2**70), max_value=2**70), json_values),
        "fail_step": st.one_of(
            st.sampled_from(["payment", "vendor", "courier", "billing"]), json_values
        ),
        "delay_ms": st.one_of(
            st.dictionaries(
                st.sampled_from(["payment", "vendor", "courier", "x"]), st.integers(-5, 700_000)
            ),
            json_values,
        ),
        "extra": json_values,
    },
)

valid_orders: st.SearchStrategy[dict[str, Any]] = st.builds(
    dict,
    order_id=st.text(
        st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=128
    ).filter(str.strip),
    amount=st.integers(-(2**63), 2**63 - 1),
    fail_step=st.none() | st.sampled_from(["payment", "vendor", "courier"]),
    delay_ms=st.dictionaries(
        st.sampled_from(["payment", "vendor", "courier"]), st.integers(0, 600_000)
    ),
)


bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    near_orders.map(lambda v: json.dumps(v).encode()),
    valid_orders.map(lambda v: json.dumps(v).encode()),  # so the success path is met too
)


def is_an_order(body: bytes) -> bool:
    try:
        parse_order(body)
    except InvalidOrder:
        return False
    return True


def check_reply(status: int, reply: dict[str, Any], processor: StubProcessor, body: bytes) -> None:
    assert status == (200 if is_an_order(body) else 400)
    if status == 200:
        assert reply["status"] == "ok"
        assert len(processor.seen) == 1
    else:
        assert set(reply) <= {"status", "order_id", "error"}
        assert reply["status"] == "error"
        assert reply["error"]["kind"] == "bad_request"
        assert isinstance(reply["error"]["message"], str)
        assert reply["error"]["message"]
        assert processor.seen == []


@pytest.mark.fuzz
@given(body=bodies)
async def test_arbitrary_bodies_get_a_clear_answer(body: bytes) -> None:
    """Whatever the body, the reply is 200 or a JSON 400 bad_request, and only valid orders run."""
    processor = StubProcessor()
    response = await create_app(processor).test_client().post("/order", data=body)

    assert response.content_type == "application/json"
    check_reply(response.status_code, json.loads(await response.get_data()), processor, body)


@pytest.mark.fuzz
@given(document=valid_orders)
def test_orders_round_trip(document: dict[str, Any]) -> None:
    """Every valid order survives structure(unstructure(order)) unchanged."""
    order = converter.structure(document, OrderRequest)
    assert converter.structure(converter.unstructure(order), OrderRequest) == order
