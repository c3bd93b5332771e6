"""What each kind of outcome leaves for an operator: exactly one line on the
`order_pipeline.orders` logger and one count in `order_pipeline_orders_total`, with the
same kind and status, for every order run, refused or cancelled (README, "Logs" and
"Metrics"); nothing for a replay; and a recovered order's metrics only of what happened.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from quart import Response

from order_pipeline.desk import canonical
from order_pipeline.metrics import Metrics
from order_pipeline.reporting import ORDERS_LOGGER
from order_pipeline.server import Assembly, Settings, assemble
from order_pipeline.store import Begun, MemoryStore, StepRecord

from .conftest import make_order
from .test_reply_paths import LONG, ORDER, FlakyStore

Counts = dict[tuple[str, str], float]


def counts(metrics: Metrics) -> Counts:
    """orders_total by (kind, http_status)."""
    return {
        (s.labels["kind"], s.labels["http_status"]): s.value
        for family in metrics.registry.collect()
        if family.name == "order_pipeline_orders"
        for s in family.samples
        if s.name == "order_pipeline_orders_total" and s.value
    }


def lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.name == ORDERS_LOGGER]  # type: ignore[attr-defined]


def _post(assembly: Assembly, body: Any, key: str | None = None) -> Awaitable[Response]:
    headers = {} if key is None else {"Idempotency-Key": key}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return assembly.app.test_client().post("/order", data=data, headers=headers)


async def _slow_body(assembly: Assembly) -> Response:
    async with assembly.app.test_client().request("/order", method="POST") as connection:
        await connection.send(b'{"order_id": ')
        return await connection.as_response()


def _compressed(assembly: Assembly) -> Awaitable[Response]:
    headers = {"Content-Encoding": "gzip"}
    return assembly.app.test_client().post("/order", data=gzip.compress(b"{}"), headers=headers)


async def _while_running(assembly: Assembly, then: Callable[[], Awaitable[Response]]) -> Response:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(_post, assembly, {**ORDER, "delay_ms": LONG}, "k-busy"))
        await trio.testing.wait_all_tasks_blocked()
        answer = await then()
        nursery.cancel_scope.cancel()
    return answer


# Each: (name, store calls that fail, the action, its (kind, status) in line and count).
OUTCOMES: list[
    tuple[str, tuple[str, ...], Callable[[Assembly], Awaitable[Any]], tuple[str, int]]
] = [
    ("ok", (), lambda a: _post(a, ORDER, "k-ok"), ("ok", 200)),
    ("declined", (), lambda a: _post(a, {**ORDER, "amount": 0}), ("payment_declined", 400)),
    (
        "timeout",
        (),
        lambda a: _post(a, {**ORDER, "delay_ms": {"vendor": 20_000}}),
        ("timeout", 504),
    ),
    ("bad body", (), lambda a: _post(a, b"{"), ("bad_request", 400)),
    ("bad key", (), lambda a: _post(a, ORDER, "a b"), ("bad_request", 400)),
    ("too large", (), lambda a: _post(a, b" " * (64 * 1024 + 1)), ("payload_too_large", 413)),
    ("too slow", (), _slow_body, ("request_timeout", 408)),
    ("compressed", (), _compressed, ("unsupported_media_type", 415)),
    ("store down", ("begin",), lambda a: _post(a, ORDER, "k-1"), ("store_unavailable", 503)),
    ("ledger down", ("charge",), lambda a: _post(a, ORDER, "k-1"), ("store_unavailable", 503)),
    # Ran, its result not recorded yet: the line and count of its own result (README, "Logs").
    ("not recorded", ("finished_reply",), lambda a: _post(a, ORDER, "k-1"), ("ok", 200)),
]


@pytest.mark.parametrize(
    ("name", "failing", "action", "outcome"), OUTCOMES, ids=[o[0] for o in OUTCOMES]
)
async def test_each_outcome_has_one_line_and_one_count_that_agree(
    caplog: pytest.LogCaptureFixture,
    autojump_clock: trio.abc.Clock,
    name: str,
    failing: tuple[str, ...],
    action: Callable[[Assembly], Awaitable[Any]],
    outcome: tuple[str, int],
) -> None:
    assembly = assemble(Settings(), store=FlakyStore(*failing))
    with caplog.at_level(logging.INFO, logger=ORDERS_LOGGER):
        await action(assembly)

    kind, status = outcome
    [line] = lines(caplog)
    assert (line["kind"], line["http_status"]) == (kind, status)
    assert counts(assembly.metrics) == {(kind, str(status)): 1}


async def test_409_and_422_each_have_one_line_and_one_count(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    assembly = assemble(Settings())
    await _post(assembly, ORDER, "k-taken")
    with caplog.at_level(logging.INFO, logger=ORDERS_LOGGER):
        await _post(assembly, {**ORDER, "amount": 1}, "k-taken")
        await _while_running(
            assembly, lambda: _post(assembly, {**ORDER, "delay_ms": LONG}, "k-busy")
        )
    refused = [(x["kind"], x["http_status"]) for x in lines(caplog) if x["kind"] != "canceled"]
    assert refused == [("idempotency_key_reused", 422), ("order_in_progress", 409)]
    assert counts(assembly.metrics) == {
        ("ok", "200"): 1,
        ("idempotency_key_reused", "422"): 1,
        ("order_in_progress", "409"): 1,
        ("canceled", "408"): 1,  # the running order, cancelled when the test ends
    }


async def test_a_replay_is_neither_logged_nor_counted(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    """The desk's rule ("a replay is not an order of its own"). README "Tracing" says the
    opposite: replays "are in the log and the metrics"; only hypercorn's access log has them."""
    assembly = assemble(Settings())
    await _post(assembly, ORDER, "k-1")
    with caplog.at_level(logging.INFO, logger=ORDERS_LOGGER):
        replay = await _post(assembly, ORDER, "k-1")
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert lines(caplog) == []
    assert counts(assembly.metrics) == {("ok", "200"): 1}


async def test_a_cancelled_order_s_count_says_408_though_its_line_says_no_reply(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    """Pinned as it is: the line's http_status is null (nothing was sent), the count's
    http_status label is the kind's status, 408 (500 if its undoing failed too)."""
    assembly = assemble(Settings())
    with caplog.at_level(logging.INFO, logger=ORDERS_LOGGER):
        with trio.move_on_after(1):
            await _post(assembly, {**ORDER, "delay_ms": LONG}, "k-left")
    [line] = lines(caplog)
    assert (line["kind"], line["http_status"]) == ("canceled", None)
    assert counts(assembly.metrics) == {("canceled", "408"): 1}
    assert assembly.metrics.registry.get_sample_value("order_pipeline_orders_canceled_total") == 1


async def test_a_recovered_order_counts_once_and_only_the_steps_that_ended(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    """An order whose process died after its payment (the vendor and the courier still
    running): one line and one count, `interrupted`; a compensation counted for each step
    undone. But no step duration: recovery timed none of the steps, and observed a vendor and
    a courier that ended `ok` in 0 s, which never happened (`desk._known_steps` then gave a
    step with no record as ok, so that it was undone; it is `unknown` now, untimed)."""
    store = MemoryStore()
    order = make_order("o-orphan", amount=70)
    body = canonical(order)
    begun = await store.begin("k-6", order.order_id, hashlib.sha256(body).hexdigest(), body, "dead")
    assert isinstance(begun, Begun)
    await store.charge(begun.order.attempt_id, "k-6", 70)
    store.record_step("k-6", begun.order.attempt_id, StepRecord("payment", "ok", None, 150))
    assembly = assemble(Settings(), store=store)

    with caplog.at_level(logging.INFO, logger=ORDERS_LOGGER):
        async with trio.open_nursery() as nursery:
            await nursery.start(assembly.desk.maintain)
            await trio.sleep(2)
            nursery.cancel_scope.cancel()

    [line] = lines(caplog)
    assert (line["order_id"], line["kind"], line["http_status"]) == ("o-orphan", "interrupted", 503)
    assert counts(assembly.metrics) == {("interrupted", "503"): 1}
    registry = assembly.metrics.registry
    for step in ("payment", "vendor", "courier"):
        labels = {"step": step, "status": "ok"}
        assert registry.get_sample_value("order_pipeline_compensations_total", labels) == 1
    ended = {
        (step, status): registry.get_sample_value(
            "order_pipeline_step_duration_seconds_count", {"step": step, "status": status}
        )
        for step in ("payment", "vendor", "courier")
        for status in ("ok", "unknown")
    }
    assert set(ended.values()) == {None}


async def test_an_order_whose_client_left_while_it_compensated_says_no_reply_was_sent(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    """The vendor fails at 200 ms; the payment's refund takes 3 s; the client leaves at 1 s,
    while the (shielded) refund runs. No reply is sent, as for any order whose client left
    (or that a drain's grace gave up on: the same path, and then also no warning and a count
    among the orders the drain *finished*). README, "Logs": a cancelled order's line "says
    `no reply sent` and its `http_status` is `null`: its client is gone, or the drain gave
    up on it". As it is, the line says `vendor_unavailable 503 in 3200 ms`."""
    assembly = assemble(Settings())
    order = {
        **ORDER,
        "fail_step": "vendor",
        "delay_ms": {"payment": 0, "courier": 0},
        "compensation_delay_ms": {"payment": 3000},
    }
    with caplog.at_level(logging.INFO, logger=ORDERS_LOGGER):
        with trio.move_on_after(1) as gone:
            await _post(assembly, order, "k-left")
    assert gone.cancelled_caught
    [line] = lines(caplog)
    assert line["http_status"] is None, line


async def test_an_order_the_drain_gave_up_on_while_it_compensated_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same in a drain, over a socket: the grace (0.5 s) runs out while the failed
    order's refund (1.5 s) runs; its client gets no reply (the connection closes), so the line
    says `no reply sent`, with the drain's warning. As it was: `vendor_unavailable 503 in
    1603 ms` and no warning."""
    import httpx

    from .conftest import serving

    caplog.set_level(logging.INFO)
    stop = trio.Event()
    outcomes: list[object] = []
    order = {
        **ORDER,
        "fail_step": "vendor",
        "delay_ms": {"payment": 0, "courier": 0, "vendor": 100},
        "compensation_delay_ms": {"payment": 1500},
    }

    async def post(url: str) -> None:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            try:
                outcomes.append((await client.post("/order", json=order)).status_code)
            except httpx.HTTPError as exc:
                outcomes.append(type(exc).__name__)

    async with (
        serving(Settings(shutdown_grace=0.5), shutdown_trigger=stop.wait) as (service, url),
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(post, url)
        await service.tracker.wait_for(lambda n: n > 0)  # the steps run
        await service.tracker.wait_for(lambda n: n == 0)  # the vendor failed at 100 ms
        stop.set()  # the refund runs until 1.6 s

    assert outcomes == ["RemoteProtocolError"]
    [line] = lines(caplog)
    assert (line["kind"], line["http_status"]) == ("vendor_unavailable", None)
    warnings = [r.getMessage() for r in caplog.records if r.name == "order_pipeline.reporting"]
    assert [w.split(":")[0] for w in warnings] == ["order o-1 cancelled by the drain"]
