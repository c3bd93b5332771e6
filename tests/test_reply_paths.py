"""Every reply path of every endpoint, as a client sees it: the status and body shape
openapi.json documents, and exactly the headers the README promises (Content-Type,
X-Request-ID, Retry-After, Content-Location, Idempotent-Replayed, Allow on a 405).

In process, through the app's test client, on a memory store (a subclass that fails on
demand stands in for a store that is unavailable).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable
from functools import partial
from typing import Any

import attrs
import jsonschema
import pytest
import trio
import trio.testing
from quart import Response

from order_pipeline.http import create_app
from order_pipeline.model import OrderRequest
from order_pipeline.orchestrator import Step
from order_pipeline.reporting import ORDERS_LOGGER
from order_pipeline.server import Settings, assemble
from order_pipeline.store import MemoryStore, StoreUnavailable

from .fakes import StubProcessor
from .test_openapi import DOC

ORDER: dict[str, Any] = {"order_id": "o-1", "amount": 250}
LONG = {"payment": 60_000, "vendor": 60_000, "courier": 60_000}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
# The headers whose presence the README promises on some replies and not on others.
_PROMISED = ("Retry-After", "Content-Location", "Idempotent-Replayed", "Allow", "Accept-Encoding")


class FlakyStore(MemoryStore):
    """A memory store whose named calls raise StoreUnavailable while they are in `failing`."""

    def __init__(self, *failing: str) -> None:
        super().__init__()
        self.failing = set(failing)

    def _maybe_fail(self, call: str) -> None:
        if call in self.failing:
            raise StoreUnavailable(f"{call}: the test's outage")

    async def begin(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail("begin")
        return await super().begin(*args, **kwargs)

    async def finished_reply(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail("finished_reply")
        return await super().finished_reply(*args, **kwargs)

    async def get(self, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail("get")
        return await super().get(*args, **kwargs)

    async def charge(self, *args: Any, **kwargs: Any) -> None:
        self._maybe_fail("charge")
        await super().charge(*args, **kwargs)


@attrs.frozen
class Expect:
    """What the docs promise of one reply."""

    status: int
    kind: str | None = None
    content_location: str | None = None  # a regex of the whole value; None: no header
    retry_after: bool = False
    replayed: bool = False
    allow: frozenset[str] | None = None
    accept_encoding: str | None = None
    media: str = "application/json"


def _response_doc(method: str, template: str, status: int) -> dict[str, Any]:
    """The response object openapi.json gives this operation and status. A 404 or a 405 is
    documented once for every path, in `info.description`: the ErrorReply shape (with Allow)."""
    # "HEAD is answered like GET on every GET path" (info.description).
    operation = (
        DOC["paths"].get(template, {}).get("get" if method == "HEAD" else method.lower(), {})
    )
    responses = operation.get("responses", {})
    if str(status) in responses:
        return dict(responses[str(status)])
    assert status in (404, 405), f"{method} {template} -> {status} is not documented"
    assert "`ErrorReply` shape" in DOC["info"]["description"]
    return {
        "headers": {"X-Request-ID": {}, **({"Allow": {}} if status == 405 else {})},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorReply"}}},
    }


async def verify(response: Response, method: str, template: str, expect: Expect) -> None:
    """Fail unless `response` is the documented reply: status, media type, body shape, kind,
    and exactly the promised headers."""
    body = await response.get_data(as_text=False)
    problems: list[str] = []
    if response.status_code != expect.status:
        problems.append(f"status {response.status_code}, expected {expect.status}: {body!r}")
    documented = _response_doc(method, template, response.status_code)
    media = (response.headers.get("Content-Type") or "").split(";")[0]
    if media != expect.media:
        problems.append(f"Content-Type {response.headers.get('Content-Type')!r}")
    if media not in documented["content"]:
        problems.append(f"{media} is not the documented media type")
    elif media == "application/json" and method != "HEAD":
        schema = {**documented["content"][media]["schema"], "components": DOC["components"]}
        document = json.loads(body)
        try:
            jsonschema.validate(document, schema, cls=jsonschema.Draft202012Validator)
        except jsonschema.ValidationError as exc:
            problems.append(f"body does not fit the document: {exc.message}")
        if expect.kind is not None and document.get("error", {}).get("kind") != expect.kind:
            problems.append(f"kind {document.get('error')!r}, expected {expect.kind}")
    request_id = response.headers.get("X-Request-ID")
    if request_id is None or not _REQUEST_ID.fullmatch(request_id):
        problems.append(f"X-Request-ID {request_id!r}")
    wanted = {
        "Retry-After": "1" if expect.retry_after else None,
        "Idempotent-Replayed": "true" if expect.replayed else None,
        "Accept-Encoding": expect.accept_encoding,
    }
    for name, value in wanted.items():
        if response.headers.get(name) != value:
            problems.append(f"{name}: {response.headers.get(name)!r}, expected {value!r}")
    location = response.headers.get("Content-Location")
    if expect.content_location is None:
        if location is not None:
            problems.append(f"Content-Location {location!r}, expected none")
    elif location is None or not re.fullmatch(expect.content_location, location):
        problems.append(f"Content-Location {location!r}, expected {expect.content_location!r}")
    allow = response.headers.get("Allow")
    if expect.allow is None:
        if allow is not None:
            problems.append(f"Allow {allow!r}, expected none")
    elif allow is None or {m.strip() for m in allow.split(",")} != expect.allow:
        problems.append(f"Allow {allow!r}, expected {sorted(expect.allow)}")
    declared = {name.lower() for name in documented.get("headers", {})}
    problems.extend(
        f"{name} is sent but not declared for {response.status_code}"
        for name in _PROMISED
        if name in response.headers and name.lower() not in declared
    )
    assert not problems, f"{method} {template}: " + "; ".join(problems)


def _post(client: Any, body: Any, key: str | None = None, **kwargs: Any) -> Awaitable[Response]:
    headers = {} if key is None else {"Idempotency-Key": key}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post("/order", data=data, headers=headers, **kwargs)  # type: ignore[no-any-return]


# -- POST /order: orders that run ------------------------------------------------------------

RUN = [
    ("ok", ORDER, Expect(200)),
    ("payment_declined", {"order_id": "d", "amount": 0}, Expect(400, "payment_declined")),
    (
        "vendor_unavailable",
        {**ORDER, "fail_step": "vendor"},
        Expect(503, "vendor_unavailable", retry_after=True),
    ),
    (
        "no_courier",
        {**ORDER, "fail_step": "courier"},
        Expect(503, "no_courier", retry_after=True),
    ),
    ("timeout", {**ORDER, "delay_ms": {"vendor": 20_000}}, Expect(504, "timeout")),
    (
        "compensation_failed",
        {**ORDER, "fail_step": "vendor", "fail_compensation": "payment"},
        Expect(500, "compensation_failed"),
    ),
]


@pytest.mark.parametrize(("name", "body", "expect"), RUN, ids=[r[0] for r in RUN])
async def test_an_order_that_ran_and_its_replay(
    autojump_clock: trio.abc.Clock, name: str, body: Any, expect: Expect
) -> None:
    """Each outcome of a run: its documented reply, Content-Location, Retry-After as its kind
    has it; its replay the same status and body, marked replayed, without Retry-After."""
    client = assemble(Settings()).app.test_client()
    first = await _post(client, body, key=f"k-{name}")
    location = re.escape(f"/order/k-{name}")
    await verify(first, "POST", "/order", attrs.evolve(expect, content_location=location))

    again = await _post(client, body, key=f"k-{name}")
    replay = attrs.evolve(expect, content_location=location, retry_after=False, replayed=True)
    await verify(again, "POST", "/order", replay)
    assert await again.get_data() == await first.get_data()

    looked_up = await client.get(f"/order/k-{name}")
    await verify(looked_up, "GET", "/order/{key}", Expect(200, content_location=location))


async def test_an_order_without_a_key_gets_one_made(autojump_clock: trio.abc.Clock) -> None:
    client = assemble(Settings()).app.test_client()
    await verify(
        await _post(client, ORDER),
        "POST",
        "/order",
        Expect(200, content_location="/order/[0-9a-f]{32}"),
    )


async def test_a_step_that_raises_is_500_internal(autojump_clock: trio.abc.Clock) -> None:
    assembly = assemble(Settings())

    async def boom(_: OrderRequest) -> None:
        raise RuntimeError("a bug in a step")

    pipeline = assembly.desk.pipeline
    steps = [Step(s.name, boom, s.compensate) if s.name == "vendor" else s for s in pipeline.steps]
    assembly.desk.pipeline = attrs.evolve(pipeline, steps=steps)
    response = await _post(assembly.app.test_client(), ORDER, key="k-internal")
    await verify(
        response, "POST", "/order", Expect(500, "internal", content_location="/order/k-internal")
    )


async def test_a_shed_order_is_503_no_courier_with_retry_after(
    autojump_clock: trio.abc.Clock,
) -> None:
    client = assemble(Settings(courier_pool_size=1, courier_queue_limit=0)).app.test_client()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(_post, client, {**ORDER, "delay_ms": LONG}, "k-holds"))
        await trio.testing.wait_all_tasks_blocked()
        shed = await _post(client, ORDER, key="k-shed")
        nursery.cancel_scope.cancel()
    await verify(
        shed,
        "POST",
        "/order",
        Expect(503, "no_courier", content_location="/order/k-shed", retry_after=True),
    )


async def test_an_order_whose_client_left_replays_canceled(autojump_clock: trio.abc.Clock) -> None:
    assembly = assemble(Settings())
    client = assembly.app.test_client()
    with trio.move_on_after(1):
        await _post(client, {**ORDER, "delay_ms": LONG}, key="k-left")
    replay = await _post(client, {**ORDER, "delay_ms": LONG}, key="k-left")
    await verify(
        replay,
        "POST",
        "/order",
        Expect(408, "canceled", content_location="/order/k-left", replayed=True),
    )


# -- POST /order: the desk's answers without a run --------------------------------------------


async def test_the_same_key_while_it_runs_is_409(autojump_clock: trio.abc.Clock) -> None:
    client = assemble(Settings()).app.test_client()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(_post, client, {**ORDER, "delay_ms": LONG}, "k-busy"))
        await trio.testing.wait_all_tasks_blocked()
        busy = await _post(client, {**ORDER, "delay_ms": LONG}, key="k-busy")
        nursery.cancel_scope.cancel()
    await verify(
        busy,
        "POST",
        "/order",
        Expect(409, "order_in_progress", content_location="/order/k-busy", retry_after=True),
    )


async def test_the_same_key_for_another_order_is_422(autojump_clock: trio.abc.Clock) -> None:
    client = assemble(Settings()).app.test_client()
    await _post(client, ORDER, key="k-taken")
    other = await _post(client, {**ORDER, "amount": 1}, key="k-taken")
    await verify(other, "POST", "/order", Expect(422, "idempotency_key_reused"))


async def test_a_busy_or_taken_key_s_refusal_carries_the_request_s_order_id(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    """The body was parsed, so a 409 or a 422 names the order it refuses, as a 400 for a bad
    field does: in the reply and in its line. A 422's is the request's, not the key's order."""
    client = assemble(Settings()).app.test_client()
    await _post(client, ORDER, key="k-taken")
    with caplog.at_level(logging.INFO, logger=ORDERS_LOGGER):
        taken = await _post(client, {"order_id": "o-2", "amount": 1}, key="k-taken")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(_post, client, {**ORDER, "delay_ms": LONG}, "k-busy"))
            await trio.testing.wait_all_tasks_blocked()
            busy = await _post(client, {**ORDER, "delay_ms": LONG}, key="k-busy")
            nursery.cancel_scope.cancel()

    assert json.loads(await taken.get_data()) == {
        "status": "error",
        "order_id": "o-2",
        "error": {
            "kind": "idempotency_key_reused",
            "message": "this key was used for a different order",
        },
    }
    assert json.loads(await busy.get_data()) == {
        "status": "error",
        "order_id": "o-1",
        "error": {
            "kind": "order_in_progress",
            "message": "an order with this key is still running",
        },
    }
    refused = [
        (r.fields["http_status"], r.fields["order_id"])  # type: ignore[attr-defined] # set by `extra`
        for r in caplog.records
        if r.name == ORDERS_LOGGER and r.fields["kind"] != "canceled"  # type: ignore[attr-defined]
    ]
    assert refused == [(422, "o-2"), (409, "o-1")]


@pytest.mark.parametrize("failing", ["begin", "finished_reply"])
async def test_a_store_unavailable_reply_to_an_order_carries_its_order_id(
    failing: str, autojump_clock: trio.abc.Clock
) -> None:
    """A 503 store_unavailable to a parsed body names its order too: not begun (nothing
    ran), or run with its result not recorded yet."""
    client = assemble(Settings(), store=FlakyStore(failing)).app.test_client()
    reply = json.loads(await (await _post(client, ORDER, key="k-down")).get_data())

    assert (reply["error"]["kind"], reply.get("order_id")) == ("store_unavailable", "o-1")


async def test_a_store_that_cannot_begin_is_503_with_retry_after() -> None:
    client = assemble(Settings(), store=FlakyStore("begin")).app.test_client()
    await verify(
        await _post(client, ORDER, key="k-down"),
        "POST",
        "/order",
        Expect(503, "store_unavailable", retry_after=True),
    )


async def test_a_result_not_recorded_yet_is_503_with_its_location(
    autojump_clock: trio.abc.Clock,
) -> None:
    client = assemble(Settings(), store=FlakyStore("finished_reply")).app.test_client()
    await verify(
        await _post(client, ORDER, key="k-held"),
        "POST",
        "/order",
        Expect(503, "store_unavailable", content_location="/order/k-held", retry_after=True),
    )


async def test_a_ledger_that_cannot_be_written_fails_the_order_503(
    autojump_clock: trio.abc.Clock,
) -> None:
    client = assemble(Settings(), store=FlakyStore("charge")).app.test_client()
    await verify(
        await _post(client, ORDER, key="k-ledger"),
        "POST",
        "/order",
        Expect(503, "store_unavailable", content_location="/order/k-ledger", retry_after=True),
    )


async def test_an_order_taken_over_while_it_ran_answers_409_or_interrupted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Its process's lease lapsed (here: it never held one) and another claimed and undid it."""
    store = MemoryStore()
    first, claimer = assemble(Settings(), store=store), assemble(Settings(), store=store)
    answers: list[Response] = []

    async def send() -> None:
        answers.append(
            await _post(first.app.test_client(), {**ORDER, "delay_ms": {"vendor": 3000}}, "k-1")
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        await trio.sleep(0.5)
        await nursery.start(claimer.desk.maintain)
        while not answers:  # noqa: ASYNC110
            await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    [answer] = answers
    if answer.status_code == 409:
        expect = Expect(409, "order_in_progress", content_location="/order/k-1", retry_after=True)
    else:
        # Its key runs it again: a retry may cure it (README, "Overload").
        expect = Expect(503, "interrupted", content_location="/order/k-1", retry_after=True)
    await verify(answer, "POST", "/order", expect)


# -- POST /order: refused by the transport ----------------------------------------------------

BAD = [
    ("not JSON", b"{", {}),
    ("an array", b"[1, 2]", {}),
    ("unknown field", b'{"order_id": "o", "tip": 1}', {}),
    ("wrong type", b'{"order_id": "o", "amount": "1"}', {}),
    ("key twice in body", b'{"order_id": "o", "order_id": "p"}', {}),
    ("empty body", b"", {}),
    ("bad key", json.dumps(ORDER).encode(), {"Idempotency-Key": "a b"}),
    ("long key", json.dumps(ORDER).encode(), {"Idempotency-Key": "x" * 256}),
]


@pytest.mark.parametrize(("name", "body", "headers"), BAD, ids=[b[0] for b in BAD])
async def test_a_bad_request_is_400(name: str, body: bytes, headers: dict[str, str]) -> None:
    client = assemble(Settings()).app.test_client()
    response = await client.post("/order", data=body, headers=headers)
    await verify(response, "POST", "/order", Expect(400, "bad_request"))


async def test_a_key_given_twice_is_400() -> None:
    client = assemble(Settings()).app.test_client()
    response = await client.post(
        "/order",
        data=json.dumps(ORDER).encode(),
        headers=[("Idempotency-Key", "k-a"), ("Idempotency-Key", "k-b")],
    )
    await verify(response, "POST", "/order", Expect(400, "bad_request"))


async def test_a_body_over_the_limit_is_413() -> None:
    client = assemble(Settings()).app.test_client()
    response = await client.post(
        "/order", data=b" " * (64 * 1024 + 1), headers={"Idempotency-Key": "k-big"}
    )
    await verify(response, "POST", "/order", Expect(413, "payload_too_large"))
    assert response.headers["Connection"] == "close"


@pytest.mark.parametrize("coding", ["gzip", "GZIP", "br", "identity, gzip", "x-custom"])
async def test_a_body_with_a_content_coding_is_415(coding: str) -> None:
    """A body the client says it compressed is refused before anything else is read of it
    (here a plain JSON order that would run): 415, `Accept-Encoding: identity`, no order."""
    store = MemoryStore()
    client = assemble(Settings(), store=store).app.test_client()
    headers = {"Idempotency-Key": "k-coded", "Content-Encoding": coding}
    response = await client.post("/order", data=json.dumps(ORDER).encode(), headers=headers)
    await verify(
        response,
        "POST",
        "/order",
        Expect(415, "unsupported_media_type", accept_encoding="identity"),
    )
    assert await store.get("k-coded") is None


@pytest.mark.parametrize(
    "coding", ["identity", "Identity", " identity ", "", "identity, identity", "identity,identity"]
)
async def test_a_body_sent_as_is_is_read_whatever_the_header_says_of_it(coding: str) -> None:
    client = assemble(Settings()).app.test_client()
    headers = {"Idempotency-Key": "k-plain", "Content-Encoding": coding}
    response = await client.post("/order", data=json.dumps(ORDER).encode(), headers=headers)
    await verify(response, "POST", "/order", Expect(200, content_location=r"/order/k-plain"))


async def test_a_body_too_slow_to_arrive_is_408(autojump_clock: trio.abc.Clock) -> None:
    """The body's first bytes, then nothing: 408 request_timeout at 10 s."""
    app = assemble(Settings()).app
    async with app.test_client().request("/order", method="POST") as connection:
        await connection.send(b'{"order_id": ')
        response = await connection.as_response()
    assert trio.current_time() == pytest.approx(10)
    await verify(response, "POST", "/order", Expect(408, "request_timeout"))
    assert response.headers["Connection"] == "close"


async def test_a_crashing_desk_is_500_internal() -> None:
    app = create_app(StubProcessor(raises=RuntimeError("secret detail")))
    await verify(await _post(app.test_client(), ORDER), "POST", "/order", Expect(500, "internal"))


# -- GET /order/{key} ---------------------------------------------------------------------------


async def test_lookups(autojump_clock: trio.abc.Clock) -> None:
    """Running, finished, unknown, a key no order can hold, and HEAD."""
    client = assemble(Settings()).app.test_client()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(_post, client, {**ORDER, "delay_ms": {**LONG, "payment": 0}}, "k-run")
        )
        await trio.testing.wait_all_tasks_blocked()
        running = await client.get("/order/k-run")
        nursery.cancel_scope.cancel()
    await verify(running, "GET", "/order/{key}", Expect(200, content_location="/order/k-run"))
    assert json.loads(await running.get_data())["status"] == "running"
    await _post(client, ORDER, key="k-done")
    for method in ("GET", "HEAD"):
        done = await client.open("/order/k-done", method=method)  # type: ignore[call-arg]
        await verify(done, method, "/order/{key}", Expect(200, content_location="/order/k-done"))
    for path in ("/order/nobody", "/order/a%20b", "/order/" + "x" * 256):
        unknown = await client.get(path)
        await verify(unknown, "GET", "/order/{key}", Expect(404, "not_found"))


async def test_a_lookup_with_the_store_down_is_503_with_retry_after() -> None:
    client = assemble(Settings(), store=FlakyStore("get")).app.test_client()
    response = await client.get("/order/k-1")
    await verify(
        response, "GET", "/order/{key}", Expect(503, "store_unavailable", retry_after=True)
    )


# -- health, readiness, metrics, the document, 404 and 405 ------------------------------------


async def test_the_other_endpoints_and_head() -> None:
    assembly = assemble(Settings())
    client = assembly.app.test_client()
    for method in ("GET", "HEAD"):
        for path in ("/healthz", "/readyz", "/openapi.json"):
            response = await client.open(path, method=method)  # type: ignore[call-arg]
            await verify(response, method, path, Expect(200))
        metrics = await client.open("/metrics", method=method)  # type: ignore[call-arg]
        await verify(metrics, method, "/metrics", Expect(200, media="text/plain"))
    assembly.readiness.start_draining()
    draining = await client.get("/readyz")
    await verify(draining, "GET", "/readyz", Expect(503, retry_after=True))
    assert json.loads(await draining.get_data()) == {"status": "draining"}


METHOD_NOT_ALLOWED = [
    *(
        (m, "/order", "/order", {"POST"})
        for m in ("GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS")
    ),
    *(
        (m, "/order/k-1", "/order/{key}", {"GET", "HEAD"})
        for m in ("POST", "PUT", "DELETE", "OPTIONS")
    ),
    *(
        (m, p, p, {"GET", "HEAD"})
        for m in ("POST", "OPTIONS")
        for p in ("/healthz", "/readyz", "/metrics", "/openapi.json")
    ),
]


@pytest.mark.parametrize(("method", "path", "template", "allow"), METHOD_NOT_ALLOWED)
async def test_a_method_a_path_does_not_take_is_405_with_allow(
    method: str, path: str, template: str, allow: set[str]
) -> None:
    client = assemble(Settings()).app.test_client()
    response = await client.open(path, method=method)  # type: ignore[call-arg]
    await verify(
        response, method, template, Expect(405, "method_not_allowed", allow=frozenset(allow))
    )


@pytest.mark.parametrize("method", ["GET", "POST", "HEAD", "OPTIONS", "DELETE"])
@pytest.mark.parametrize(
    "path", ["/", "/orders", "/order/", "/order//k-1", "/order/k-1/steps", "/static/x"]
)
async def test_an_unknown_path_is_404(method: str, path: str) -> None:
    client = assemble(Settings()).app.test_client()
    response = await client.open(path, method=method)  # type: ignore[call-arg]
    await verify(response, method, path, Expect(404, "not_found"))


# -- over a socket: what hypercorn adds or takes away -----------------------------------------


@attrs.frozen
class _Wire:
    """An httpx response with the little of Quart's Response that `verify` reads."""

    status_code: int
    headers: Any
    body: bytes

    async def get_data(self, as_text: bool = False) -> bytes:
        return self.body


async def test_the_same_replies_over_a_socket() -> None:
    """A sample of the paths through hypercorn: its framing keeps every promised header, and
    HEAD has headers without a body."""
    import httpx

    from .conftest import serving

    fast = {**ORDER, "delay_ms": dict.fromkeys(("payment", "vendor", "courier"), 0)}
    async with serving(Settings()) as (_, url), httpx.AsyncClient(base_url=url) as client:

        async def call(method: str, path: str, **kwargs: Any) -> Any:
            r = await client.request(method, path, **kwargs)
            return _Wire(r.status_code, r.headers, r.content)

        ok = await call("POST", "/order", json=fast, headers={"Idempotency-Key": "w-1"})
        await verify(ok, "POST", "/order", Expect(200, content_location="/order/w-1"))
        again = await call("POST", "/order", json=fast, headers={"Idempotency-Key": "w-1"})
        replay = Expect(200, content_location="/order/w-1", replayed=True)
        await verify(again, "POST", "/order", replay)
        declined = await call("POST", "/order", json={**fast, "amount": 0})
        await verify(
            declined,
            "POST",
            "/order",
            Expect(400, "payment_declined", content_location="/order/[0-9a-f]{32}"),
        )
        bad = await call("POST", "/order", content=b"{", headers={"Idempotency-Key": "w 2"})
        await verify(bad, "POST", "/order", Expect(400, "bad_request"))
        big = await call("POST", "/order", content=b" " * (64 * 1024 + 1))
        await verify(big, "POST", "/order", Expect(413, "payload_too_large"))
        assert big.headers["Connection"] == "close"
        head = await call("HEAD", "/order/w-1")
        await verify(head, "HEAD", "/order/{key}", Expect(200, content_location="/order/w-1"))
        assert head.body == b""
        allow = frozenset({"POST"})
        for method in ("GET", "OPTIONS"):
            refused = await call(method, "/order")
            await verify(refused, method, "/order", Expect(405, "method_not_allowed", allow=allow))
        unknown = await call("GET", "/order//w-1")
        await verify(unknown, "GET", "/order//w-1", Expect(404, "not_found"))
