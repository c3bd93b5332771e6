"""The HTTP transport with a stub processor: validation, error mapping, JSON shapes."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from quart_trio import QuartTrio

from order_pipeline.desk import Answer
from order_pipeline.http import create_app
from order_pipeline.http.app import MAX_BODY_BYTES, answer_response
from order_pipeline.http.asgi import (
    TARGET_NOT_SERVED,
    closing_after_ambiguous_framing,
    finish_responses_shielded,
    refusing_targets_not_served,
)

from .fakes import StubProcessor


@pytest.fixture(name="processor")
def _processor() -> StubProcessor:
    """A stub processor that answers every order with success."""
    return StubProcessor()


@pytest.fixture(name="app")
def _app(processor: StubProcessor) -> QuartTrio:
    """The app in front of the stub processor."""
    return create_app(processor)


async def post(app: QuartTrio, body: bytes | str) -> tuple[int, dict[str, Any], dict[str, str]]:
    response = await app.test_client().post("/order", data=body)
    assert response.content_type == "application/json"
    return response.status_code, json.loads(await response.get_data()), dict(response.headers)


async def test_success_shape(app: QuartTrio, processor: StubProcessor) -> None:
    """A valid order reaches the processor and the reply has exactly the documented shape."""
    status, body, _ = await post(app, '{"order_id": "o-1", "amount": 5}')

    assert status == 200
    assert body == {
        "status": "ok",
        "order_id": "o-1",
        "steps": [
            {"name": "payment", "status": "ok", "duration_ms": 150},
            {"name": "vendor", "status": "ok", "duration_ms": 200},
        ],
    }
    assert [o.order_id for o in processor.seen] == ["o-1"]


async def test_all_fields_and_nulls(processor: StubProcessor, app: QuartTrio) -> None:
    """Every field is read, and a null optional field counts as absent."""
    await post(
        app,
        '{"order_id":"a","amount":-3,"fail_step":"courier","delay_ms":{"payment":0,"courier":600000}}',
    )
    await post(app, '{"order_id":"b","amount":null,"fail_step":null,"delay_ms":null}')

    first, second = processor.seen
    assert (first.amount, first.fail_step, dict(first.delay_ms)) == (
        -3,
        "courier",
        {"payment": 0, "courier": 600000},
    )
    assert (second.amount, second.fail_step, dict(second.delay_ms)) == (0, None, {})


BAD_BODIES = [
    # Nested deeper than the standard module's recursion limit, though orjson takes it.
    ('{"order_id": "o", "x": ' + "[" * 1000 + "]" * 1000 + "}", None, "body is nested too deeply"),
    # A key twice: refused, not resolved (parsers that disagree are a security bug's source).
    (
        '{"order_id": "a", "amount": 1, "amount": -1}',
        "a",
        "body has the key 'amount' more than once",
    ),
    ('{"order_id": "o", "delay_ms": {"payment": 1, "payment": 2}}', "o", "key 'payment' more"),
    ('{"order_id": "x", "order_id": "y"}', "y", "body has the key 'order_id' more than once"),
    ("", None, "not valid JSON"),
    ("{", None, "not valid JSON"),
    ('{"order_id": "o"} {}', None, "not valid JSON"),
    ("[]", None, "must be a JSON object"),
    ('"o-1"', None, "must be a JSON object"),
    ("null", None, "must be a JSON object"),
    ("NaN", None, "not valid JSON"),
    (b"\xff\xfe{}", None, "not valid JSON"),
    # Latin-1 (whatever the Content-Type's charset), UTF-16: orjson's reason spoke of "str"
    # and "surrogates".
    ('{"order_id": "café"}'.encode("latin-1"), None, "not valid JSON: not UTF-8 (byte 0xe9 at 17)"),
    ('{"order_id": "o"}'.encode("utf-16"), None, "not valid JSON: not UTF-8 (byte 0xff at 0)"),
    ("[" * 10_000 + "]" * 10_000, None, "not valid JSON"),
    # Too large for a float: orjson refuses it as not JSON, and says only where.
    ('{"order_id": "o", "amount": ' + "9" * 10_000 + "}", "o", "@ $.amount"),
    ('{"order_id": "o", "amount": 1e400}', "o", "@ $.amount"),
    ('{"order_id": "o", "amount": -1e400}', "o", "@ $.amount"),
    ('{"order_id": "o", "amount": ' + str(10**30) + "}", "o", "@ $.amount"),
    ('{"order_id": "o", "amount": ' + str(-(10**30)) + "}", "o", "@ $.amount"),
    (
        '{"order_id": "o", "delay_ms": {"payment": 1e400}}',
        "o",
        "must be an integer from 0 to 600000 @ $.delay_ms['payment']",
    ),
    ('{"order_id": "o", "extra": 1e400}', "o", "unknown field(s): 'extra'"),
    ('{"order_id": 1e400}', None, "must be a string @ $.order_id"),
    ("[1e400]", None, "must be a JSON object"),
    ("{}", None, "required field missing @ $.order_id"),
    ('{"order_id": null}', None, "required field missing @ $.order_id"),
    ('{"order_id": ""}', None, "must not be blank @ $.order_id"),
    ('{"order_id": " \\t "}', None, "must not be blank @ $.order_id"),
    # PostgreSQL's text cannot hold it: the store refused it (500) after the order was parsed.
    ('{"order_id": "o\\u0000"}', None, "must not contain NUL (\\u0000) @ $.order_id"),
    ('{"order_id": "' + "x" * 129 + '"}', None, "at most 128 characters @ $.order_id"),
    ('{"order_id": 7}', None, "must be a string @ $.order_id"),
    ('{"order_id": "o", "extra": 1}', "o", "unknown field(s): 'extra'"),
    ('{"order_id": "o", "amount": true}', "o", "@ $.amount"),
    ('{"order_id": "o", "amount": 1.5}', "o", "@ $.amount"),
    ('{"order_id": "o", "amount": "12"}', "o", "@ $.amount"),
    ('{"order_id": "o", "amount": 9223372036854775808}', "o", "@ $.amount"),
    ('{"order_id": "o", "amount": -9223372036854775809}', "o", "@ $.amount"),
    (
        '{"order_id": "o", "fail_step": "billing"}',
        "o",
        "must be one of payment, vendor, courier @ $.fail_step",
    ),
    ('{"order_id": "o", "fail_step": 1}', "o", "@ $.fail_step"),
    ('{"order_id": "o", "delay_ms": []}', "o", "must be an object @ $.delay_ms"),
    ('{"order_id": "o", "delay_ms": {"billing": 1}}', "o", "@ $.delay_ms['billing']"),
    (
        '{"order_id": "o", "delay_ms": {"payment": -1}}',
        "o",
        "from 0 to 600000 @ $.delay_ms['payment']",
    ),
    ('{"order_id": "o", "delay_ms": {"payment": 600001}}', "o", "@ $.delay_ms['payment']"),
    ('{"order_id": "o", "delay_ms": {"payment": 1.0}}', "o", "@ $.delay_ms['payment']"),
    ('{"order_id": "o", "delay_ms": {"payment": null}}', "o", "@ $.delay_ms['payment']"),
]


@pytest.mark.parametrize(("body", "order_id", "message"), BAD_BODIES)
async def test_bad_request(
    app: QuartTrio, processor: StubProcessor, body: str | bytes, order_id: str | None, message: str
) -> None:
    """Each invalid body gets 400 bad_request naming the fault, and no step runs."""
    status, reply, _ = await post(app, body)

    assert status == 400
    assert reply["status"] == "error"
    assert reply["error"]["kind"] == "bad_request"
    assert message in reply["error"]["message"]
    assert reply.get("order_id") == order_id
    assert set(reply) == ({"status", "error"} | ({"order_id"} if order_id else set()))
    assert processor.seen == []


@pytest.mark.parametrize(
    ("kind", "status", "message"),
    [
        ("payment_declined", 400, "order failed"),
        ("vendor_unavailable", 503, "order failed"),
        ("no_courier", 503, "order failed"),
        ("timeout", 504, "order did not complete before its deadline"),
        ("canceled", 408, "order was canceled"),
        ("internal", 500, "internal error"),
        ("some_new_kind", 500, "internal error"),
    ],
)
async def test_error_kinds_map_to_statuses(kind: str, status: int, message: str) -> None:
    """Each order-failure kind gets its status, the steps and an error object."""
    code, body, _ = await post(create_app(StubProcessor(kind)), '{"order_id": "o-9"}')

    assert code == status
    assert body == {
        "status": "error",
        "order_id": "o-9",
        "steps": [
            {"name": "payment", "status": "ok", "duration_ms": 150},
            {"name": "vendor", "status": "ok", "duration_ms": 200},
        ],
        "error": {"kind": kind, "message": message},
    }


async def test_body_over_64_kib_is_413(app: QuartTrio, processor: StubProcessor) -> None:
    """A body past 64 KiB is refused with 413 payload_too_large; one at the limit is read."""
    padded = '{"order_id": "o", "amount": 1}'
    status, body, _ = await post(app, padded + " " * (MAX_BODY_BYTES - len(padded)))
    assert status == 200

    status, body, _ = await post(app, padded + " " * (MAX_BODY_BYTES - len(padded) + 1))
    assert status == 413
    assert body == {
        "status": "error",
        "error": {"kind": "payload_too_large", "message": "request body too large"},
    }
    assert len(processor.seen) == 1


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_other_methods_are_405_with_allow(app: QuartTrio, method: str) -> None:
    """Any method but POST on /order is 405 method_not_allowed with Allow: POST."""
    response = await app.test_client().open(  # type: ignore[call-arg]  # Quart's protocol lacks json's default
        "/order", method=method
    )

    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert response.content_type == "application/json"
    assert json.loads(await response.get_data()) == {
        "status": "error",
        "error": {"kind": "method_not_allowed", "message": "method not allowed"},
    }


async def test_head_is_405_without_body(app: QuartTrio) -> None:
    """HEAD is refused like the others (and carries no body, as HTTP requires)."""
    response = await app.test_client().head("/order")
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"


@pytest.mark.parametrize("path", ["/", "/orders", "/order/1/steps", "/static/x"])
async def test_unknown_path_is_404(app: QuartTrio, path: str) -> None:
    """An unknown path is 404 not_found, as JSON."""
    response = await app.test_client().post(path, data=b"{}")

    assert response.status_code == 404
    assert json.loads(await response.get_data()) == {
        "status": "error",
        "error": {"kind": "not_found", "message": "no such endpoint"},
    }


async def test_processor_crash_is_500_without_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """An exception escaping the processor is a JSON 500; the traceback goes to the log only."""
    app = create_app(StubProcessor(raises=RuntimeError("secret detail")))

    status, body, _ = await post(app, '{"order_id": "o"}')

    assert status == 500
    assert body == {"status": "error", "error": {"kind": "internal", "message": "internal error"}}
    assert "secret detail" in caplog.text


async def test_only_http1_requests_framed_two_ways_have_their_connection_closed() -> None:
    """`Connection: close` after a request framed by both Transfer-Encoding and Content-Length
    is HTTP/1's remedy; HTTP/2 frames its own messages, and forbids the header (RFC 9113
    §8.2.2)."""
    sent: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(message: Any) -> None:
        sent.append(message)

    framing = [(b"content-length", b"3"), (b"transfer-encoding", b"chunked")]
    wrapped = closing_after_ambiguous_framing(app)
    for version in ("1.1", "2"):
        await wrapped({"type": "http", "http_version": version, "headers": framing}, None, send)

    assert [message["headers"] for message in sent] == [[(b"connection", b"close")], []]


async def test_a_target_not_served_is_a_whole_400_closing_only_an_http1_connection() -> None:
    """The refusal of a target neither a path nor an http(s) URI is one complete 400 reply
    (its body the last), `Connection: close` in HTTP/1 only (HTTP/2 forbids the field); a
    scope with no raw target (a server that gives none) and a path go on to the app."""
    sent: list[Any] = []
    reached: list[bytes | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope.get("raw_path"))

    async def send(message: Any) -> None:
        sent.append(message)

    wrapped = refusing_targets_not_served(app)
    for version in ("1.1", "2"):
        await wrapped({"type": "http", "http_version": version, "raw_path": b"healthz"}, None, send)
    await wrapped({"type": "http", "http_version": "1.1"}, None, send)
    await wrapped({"type": "http", "http_version": "1.1", "raw_path": b"/healthz"}, None, send)

    assert reached == [None, b"/healthz"]
    starts, bodies = sent[0::2], sent[1::2]
    assert [start["status"] for start in starts] == [400, 400]
    connection = [dict(start["headers"]).get(b"connection") for start in starts]
    assert connection == [b"close", None]
    for start, body in zip(starts, bodies, strict=True):
        assert (body["type"], body["more_body"]) == ("http.response.body", False)
        assert json.loads(body["body"])["error"]["message"] == TARGET_NOT_SERVED
        assert dict(start["headers"])[b"content-length"] == b"%d" % len(body["body"])


async def test_an_order_framed_two_ways_runs_and_its_connection_closes(
    app: QuartTrio, processor: StubProcessor
) -> None:
    """The app behind the framing check gets the request whole: the order runs, its reply is
    the usual one, with `Connection: close`."""
    body = b'{"order_id": "o-2", "amount": 5}'
    headers = {"Transfer-Encoding": "chunked", "Content-Length": str(len(body))}

    response = await app.test_client().post("/order", data=body, headers=headers)

    assert response.status_code == 200
    assert response.headers["Connection"] == "close"
    assert (await response.get_json())["order_id"] == "o-2"
    assert [o.order_id for o in processor.seen] == ["o-2"]


async def test_only_the_last_body_send_of_a_response_outlives_a_cancel() -> None:
    """hypercorn closes or keeps the connection inside the last `http.response.body` send
    (`more_body` false, or absent: ASGI's default), which a cancel must not cut short; every
    other send stays cancellable, so that a request cancelled mid-reply stops at once."""
    messages: list[Any] = [
        {"type": "http.response.start", "status": 200, "headers": []},
        {"type": "http.response.body", "body": b"{}", "more_body": True},
        {"type": "http.response.body", "body": b"", "more_body": False},
        {"type": "http.response.body", "body": b""},
    ]
    sent: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for message in messages:
            with trio.CancelScope() as cancelled:
                cancelled.cancel()
                await send(message)

    async def send(message: Any) -> None:
        await trio.lowlevel.checkpoint()
        sent.append(message)

    await finish_responses_shielded(app)({"type": "http"}, None, send)

    assert sent == messages[2:]


@pytest.mark.parametrize(
    ("key", "location"),
    [
        ("0f3a9c", "/order/0f3a9c"),
        ("a.b_c~d-e", "/order/a.b_c~d-e"),
        ("...", "/order/..."),
        ("a:b", "/order/a%3Ab"),
        (".", "/order/%2E"),
        ("..", "/order/%2E%2E"),
    ],
)
def test_a_reply_locates_its_order_by_its_key_as_one_path_segment(key: str, location: str) -> None:
    """Content-Location: a key of unreserved characters as it is, any other percent-encoded,
    and `.` and `..`, which a client would resolve, encoded too."""
    response = answer_response(Answer(200, b"{}", key, replayed=True))

    assert response.headers["Content-Location"] == location
    assert list(response.headers.keys()) == [
        "Content-Location", "Idempotent-Replayed", "Content-Type", "Content-Length",
    ]  # fmt: skip # the header names in order, on one line
