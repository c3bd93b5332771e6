"""The OpenAPI document: served, kept in docs/, and true of live responses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import trio
from quart.typing import TestClientProtocol as Client

from order_pipeline.server import Settings, assemble

DOC_PATH = Path(__file__).parent.parent / "docs" / "openapi.json"
DOC: dict[str, Any] = json.loads(DOC_PATH.read_text())


def check(method: str, path: str, status: int, body: bytes, content_type: str) -> None:
    """Fail unless the document declares this status for this operation and the body fits it."""
    responses = DOC["paths"][path][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {path} -> {status} is not documented"
    declared = responses[str(status)]["content"]
    media = content_type.split(";")[0]
    assert media in declared
    if media == "application/json":
        schema = {**declared[media]["schema"], "components": DOC["components"]}
        jsonschema.validate(json.loads(body), schema, cls=jsonschema.Draft202012Validator)


async def test_document_is_served_and_matches_docs() -> None:
    """GET /openapi.json serves exactly docs/openapi.json, a valid OpenAPI 3.1 document."""
    response = await assemble().app.test_client().get("/openapi.json")

    assert response.status_code == 200
    assert json.loads(await response.get_data()) == DOC
    assert DOC["openapi"] == "3.1.0"
    jsonschema.Draft202012Validator.check_schema({"$defs": DOC["components"]["schemas"]})


ORDERS = [
    {"order_id": "ok", "amount": 5},
    {"order_id": "declined", "amount": 0},
    {"order_id": "vendor", "amount": 5, "fail_step": "vendor"},
    {"order_id": "courier", "amount": 5, "fail_step": "courier"},
    {"order_id": "slow", "amount": 5, "delay_ms": {"vendor": 2000}},
    {"order_id": "undo", "amount": 5, "fail_step": "vendor", "fail_compensation": "payment"},
    {"order_id": "", "amount": 5},
    {"order_id": "x", "amount": True},
    [1, 2],
]


@pytest.fixture(name="client")
def _client() -> Client:
    return assemble(Settings(request_timeout=1)).app.test_client()


@pytest.mark.parametrize("body", ORDERS)
async def test_order_responses_fit_the_document(
    client: Client, autojump_clock: trio.abc.Clock, body: Any
) -> None:
    """Every kind of /order answer is a documented status with a body of the documented shape."""
    response = await client.post("/order", json=body)
    check(
        "POST",
        "/order",
        response.status_code,
        await response.get_data(as_text=False),
        response.content_type,
    )


async def test_other_answers_fit_the_document(client: Client) -> None:
    """Too large, health, readiness, metrics and the document itself are as documented."""
    big = await client.post("/order", data=b" " * (64 * 1024 + 1))
    check("POST", "/order", big.status_code, await big.get_data(as_text=False), big.content_type)
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        response = await client.get(path)
        check(
            "GET",
            path,
            response.status_code,
            await response.get_data(as_text=False),
            response.content_type,
        )
