"""The OpenAPI document: served from the package, true of live responses, naming every kind."""

from __future__ import annotations

import importlib.resources
import json
import re
from typing import Any

import jsonschema
import pytest
import regress
import trio
from quart.typing import TestClientProtocol as Client

from order_pipeline import kinds
from order_pipeline.model import StepStatus
from order_pipeline.serialization import InvalidOrder, parse_order
from order_pipeline.server import Settings, assemble

# The one copy of the document: the package's, which the app serves.
DOC: dict[str, Any] = json.loads(
    importlib.resources.files("order_pipeline.http").joinpath("openapi.json").read_text()
)


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


async def test_document_is_served_from_the_package() -> None:
    """GET /openapi.json serves exactly the package's openapi.json, a valid OpenAPI 3.1 document."""
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
    """A test client of the real app, with a 1 s deadline."""
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


def test_the_kinds_defined_mapped_and_documented_are_the_same() -> None:
    """The kinds kinds.py defines, the rows of KINDS and the document's error kinds are one set."""
    defined = {
        value for name, value in vars(kinds).items() if name.isupper() and isinstance(value, str)
    } - {kinds.OK, kinds.ORDER_FAILED}  # the label of success, and a message: not kinds
    documented = DOC["components"]["schemas"]["Error"]["properties"]["kind"]["enum"]

    assert len(documented) == len(set(documented))
    assert set(kinds.KINDS) == defined
    assert set(documented) == defined


def test_the_step_statuses_modelled_and_documented_are_the_same() -> None:
    """A step's status is one the model has, and only `unknown` (a step recovery knows
    nothing of) has no duration: null, not an invented 0."""
    step = {**DOC["components"]["schemas"]["Step"], "components": DOC["components"]}
    valid = jsonschema.Draft202012Validator(step).is_valid

    assert step["properties"]["status"]["enum"] == [s.value for s in StepStatus]
    assert valid({"name": "vendor", "status": "unknown", "duration_ms": None})
    assert not valid({"name": "vendor", "status": "unknown", "duration_ms": 0})
    for status in ("ok", "error", "canceled"):
        assert valid({"name": "vendor", "status": status, "duration_ms": 0})
        assert not valid({"name": "vendor", "status": status, "duration_ms": None})


def test_an_ok_reply_has_only_steps_that_ran_and_succeeded() -> None:
    """An `ok` reply's steps each ended `ok`, timed, with nothing undone: the document
    allows no other step there (it allowed `unknown` with a null duration, which the
    server never sends in an `ok` reply, and a client generating its types took)."""
    success = {**DOC["components"]["schemas"]["OrderSuccess"], "components": DOC["components"]}
    valid = jsonschema.Draft202012Validator(success).is_valid
    ran = [{"name": n, "status": "ok", "duration_ms": 3} for n in ("payment", "vendor", "courier")]

    assert valid({"status": "ok", "order_id": "a", "steps": ran})
    for changed in (
        {"status": "unknown", "duration_ms": None},
        {"status": "error", "detail": "payment_declined"},
        {"status": "canceled"},
        {"compensation": {"status": "ok", "duration_ms": 1}},
    ):
        steps = [{**ran[0], **changed}, *ran[1:]]
        assert not valid({"status": "ok", "order_id": "a", "steps": steps}), changed


# Every character some regex engine calls whitespace: Python's (str.isspace) and ECMAScript's,
# whose `\s` a client's JSON Schema validator uses (it adds U+FEFF, lacks U+001C-U+001F, U+0085).
_SPACES = {c for c in map(chr, range(0x3001)) if c.isspace()} | {"\ufeff"}


@pytest.mark.parametrize("order_id", sorted(_SPACES | {c + "x" + c for c in _SPACES} | {"x", "\0"}))
def test_the_document_and_the_server_agree_on_a_blank_order_id(order_id: str) -> None:
    """The document's order_id pattern means the same in Python's regex engine and in
    ECMAScript's (JSON Schema's own, which a client's validator may use): it accepts exactly
    the order ids the server does."""
    pattern = DOC["components"]["schemas"]["OrderRequest"]["properties"]["order_id"]["pattern"]
    try:
        parse_order(json.dumps({"order_id": order_id, "amount": 5}).encode())
        accepted = True
    except InvalidOrder:
        accepted = False

    assert accepted == (bool(order_id.strip()) and "\0" not in order_id)
    assert (re.search(pattern, order_id) is not None) == accepted
    assert (regress.Regex(pattern).find(order_id) is not None) == accepted
