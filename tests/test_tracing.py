"""OpenTelemetry spans: the tree of an order that succeeds, fails, times out or is cancelled
from outside; compensations; the courier's wait; the caller's `traceparent`; configuration.

Each test records into an in-memory exporter of its own provider (never the global one),
and the spans' timestamps come from Trio's virtual clock (`Tracing(clock=...)`), so "the
siblings of a failing step end at the same instant" is asserted exactly, to the nanosecond.
The in-memory exporter keeps spans in the order they ended (SimpleSpanProcessor exports
each as it ends), which pins the order of events as well.
"""

from __future__ import annotations

import atexit
import inspect
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, cast

import attrs
import pytest
import trio
from hypercorn.typing import HTTPScope
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers

from order_pipeline.desk import OrderDesk
from order_pipeline.http import create_app
from order_pipeline.http.asgi import _ids_of
from order_pipeline.kinds import (
    CANCELED,
    COMPENSATION_FAILED,
    INTERNAL,
    INTERRUPTED,
    PAYMENT_DECLINED,
    TIMEOUT,
)
from order_pipeline.logs import request_id
from order_pipeline.metrics import Metrics
from order_pipeline.model import (
    STEP_NAMES,
    Attempt,
    StepError,
    StepResult,
    StepStatus,
    current_attempt,
)
from order_pipeline.orchestrator import Pipeline, Step
from order_pipeline.reporting import OrderReporter
from order_pipeline.server import Settings, assemble
from order_pipeline.services import CourierPool, CourierService
from order_pipeline.store import MemoryStore
from order_pipeline.tracing import (
    TracedPipeline,
    Tracing,
    configure_tracing,
    export_timeout,
    flush_spans,
    span_exporter_from_env,
    tracer_provider,
)

from .conftest import make_order
from .fakes import Hangs, Instant, Sleeps


def ns(seconds: float) -> int:
    """A time on Trio's clock as the spans carry it."""
    return round(seconds * 1e9)


def trio_clock() -> int:
    return ns(trio.current_time())


@attrs.frozen
class Traces:
    """A provider of the test's own, its in-memory exporter, and a `Tracing` on Trio's clock."""

    provider: TracerProvider
    exporter: InMemorySpanExporter
    tracing: Tracing

    def spans(self) -> list[ReadableSpan]:
        """Every finished span, in the order they ended."""
        return list(self.exporter.get_finished_spans())

    def named(self) -> dict[str, ReadableSpan]:
        """The finished spans by name (of one order: each name once)."""
        spans = self.spans()
        by_name = {span.name: span for span in spans}
        assert len(by_name) == len(spans), [span.name for span in spans]
        return by_name


@pytest.fixture(name="traces")
def _traces() -> Iterator[Traces]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Traces(provider, exporter, Tracing(provider.get_tracer("test"), clock=trio_clock))
    provider.shutdown()


UNDO = Sleeps(0.02)


def steps(
    payment: Sleeps | Hangs | Instant,
    vendor: Sleeps | Hangs | Instant,
    courier: Sleeps | Hangs | Instant,
    undo: Sleeps | Hangs | Instant = UNDO,
) -> list[Step]:
    return [
        Step("payment", payment, undo),
        Step("vendor", vendor, undo),
        Step("courier", courier, undo),
    ]


def traced(
    traces: Traces, of: Sequence[Step], *, timeout: float = 10.0, compensation_timeout: float = 5.0
) -> Pipeline:
    pipeline = Pipeline(of, timeout=timeout, compensation_timeout=compensation_timeout)
    return traces.tracing.instrument(pipeline)


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


def children_of(parent: ReadableSpan, spans: Sequence[ReadableSpan]) -> list[str]:
    return sorted(span.name for span in spans if parent_of(span) == span_id(parent))


def in_request() -> None:
    """Set what the HTTP layer and the desk set for an order: in the test's own task, whose
    context ends with it (a sync fixture's would stay set for every later test)."""
    request_id.set("req-1")
    current_attempt.set(Attempt("key-1", "attempt-1", "owner-1"))


async def test_a_successful_order_is_a_span_with_a_child_per_step(
    autojump_clock: trio.abc.Clock, traces: Traces
) -> None:
    """The order's span is the root, each step a child (Trio copied the context into each
    step's task), with the order's identity on the order and the outcome on each."""
    in_request()
    pipeline = traced(traces, steps(Sleeps(0.1), Sleeps(0.2), Sleeps(0.3)))

    result = await pipeline.process(make_order(amount=5))

    assert result.ok
    spans = traces.named()
    order = spans["order"]
    assert order.parent is None
    assert children_of(order, traces.spans()) == ["step courier", "step payment", "step vendor"]
    assert {trace_id(span) for span in spans.values()} == {trace_id(order)}
    assert dict(order.attributes or {}) == {
        "order_id": "o-1",
        "idempotency_key": "key-1",
        "attempt_id": "attempt-1",
        "request_id": "req-1",
        "kind": "ok",
    }
    assert order.status.status_code is StatusCode.UNSET
    assert (order.start_time, order.end_time) == (0, ns(0.3))
    for name, seconds in (("payment", 0.1), ("vendor", 0.2), ("courier", 0.3)):
        step = spans[f"step {name}"]
        assert dict(step.attributes or {}) == {"order_id": "o-1", "step": name, "outcome": "ok"}
        assert step.status.status_code is StatusCode.UNSET
        assert (step.start_time, step.end_time) == (0, ns(seconds))


async def test_a_failed_order_shows_the_failing_step_and_its_siblings_cancelled_then(
    autojump_clock: trio.abc.Clock, traces: Traces
) -> None:
    """The failing step is an error with its kind; its running sibling ends `canceled` at the
    same virtual nanosecond, right after it; the step that had succeeded is compensated in a
    span of its own under the order, which ends an error of the failing step's kind."""
    declined = Sleeps(0.1, StepError(PAYMENT_DECLINED))
    pipeline = traced(traces, steps(declined, Sleeps(0.05), Sleeps(0.3)))

    result = await pipeline.process(make_order())

    assert result.kind == PAYMENT_DECLINED
    assert [span.name for span in traces.spans()] == [
        "step vendor",
        "step payment",
        "step courier",
        "compensate vendor",
        "order",
    ]
    spans = traces.named()
    payment, courier = spans["step payment"], spans["step courier"]
    assert payment.status.status_code is StatusCode.ERROR
    assert payment.status.description == PAYMENT_DECLINED
    assert payment.attributes is not None
    assert (payment.attributes["outcome"], payment.attributes["kind"]) == (
        "error",
        "payment_declined",
    )
    assert payment.events == ()  # a classified failure: no traceback
    assert courier.attributes is not None
    assert courier.attributes["outcome"] == "canceled"
    assert courier.status.status_code is StatusCode.UNSET
    assert courier.end_time == payment.end_time == ns(0.1)
    undo = spans["compensate vendor"]
    assert parent_of(undo) == span_id(spans["order"])
    assert dict(undo.attributes or {}) == {"order_id": "o-1", "step": "vendor", "outcome": "ok"}
    assert (undo.start_time, undo.end_time) == (ns(0.1), ns(0.12))
    order = spans["order"]
    assert order.status.status_code is StatusCode.ERROR
    assert order.status.description == PAYMENT_DECLINED
    assert order.attributes is not None
    assert order.attributes["kind"] == PAYMENT_DECLINED


async def test_an_unexpected_error_is_internal_with_its_traceback(
    autojump_clock: trio.abc.Clock, traces: Traces
) -> None:
    """An exception with no kind is `internal` and its span records the exception."""
    pipeline = traced(traces, steps(Instant(RuntimeError("boom")), Hangs(), Hangs()))

    await pipeline.process(make_order())

    payment = traces.named()["step payment"]
    assert payment.status.description == INTERNAL
    (event,) = payment.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.message"] == "boom"


async def test_a_timed_out_order_cancels_the_steps_at_its_deadline(
    autojump_clock: trio.abc.Clock, traces: Traces
) -> None:
    """At the deadline the steps still running end `canceled`; the order is a timeout."""
    pipeline = traced(traces, steps(Sleeps(0.1), Hangs(), Hangs()), timeout=1.0)

    result = await pipeline.process(make_order())

    assert result.kind == TIMEOUT
    spans = traces.named()
    for name in ("vendor", "courier"):
        step = spans[f"step {name}"]
        assert step.attributes is not None
        assert step.attributes["outcome"] == "canceled"
        assert step.end_time == ns(1.0)
    assert children_of(spans["order"], traces.spans()) == [
        "compensate payment",
        "step courier",
        "step payment",
        "step vendor",
    ]
    order = spans["order"]
    assert order.attributes is not None
    assert order.attributes["kind"] == TIMEOUT
    assert order.status.description == TIMEOUT
    assert order.end_time == ns(1.02)


async def test_an_order_cancelled_from_outside_is_canceled_and_still_compensates(
    autojump_clock: trio.abc.Clock, traces: Traces
) -> None:
    """A disconnect: the cancellation passes through every span (re-raised, not swallowed),
    the running steps end `canceled` at that instant, the shielded compensation still has
    its span, and the order's span says `canceled`, though `process` raised."""
    pipeline = traced(traces, steps(Sleeps(0.1), Sleeps(0.5), Hangs()))

    with trio.move_on_after(0.25) as disconnect:
        await pipeline.process(make_order())

    assert disconnect.cancelled_caught
    spans = traces.named()
    for name in ("vendor", "courier"):
        step = spans[f"step {name}"]
        assert step.attributes is not None
        assert step.attributes["outcome"] == "canceled"
        assert step.end_time == ns(0.25)
    undo = spans["compensate payment"]
    assert (undo.start_time, undo.end_time) == (ns(0.25), ns(0.27))
    order = spans["order"]
    assert order.attributes is not None
    assert order.attributes["kind"] == CANCELED
    assert order.status.status_code is StatusCode.ERROR
    assert order.end_time == ns(0.27)


async def test_failed_and_stuck_compensations_are_errors(
    autojump_clock: trio.abc.Clock, traces: Traces
) -> None:
    """A compensation that raises is an error with its kind; one cut by the compensation
    deadline is an error `timeout`; the order is `compensation_failed`."""
    pipeline = traced(
        traces,
        [
            Step("payment", Instant(), Instant(StepError("refund_failed"))),
            Step("vendor", Instant(), Hangs()),
            Step("courier", Sleeps(0.1, StepError("no_courier"))),
        ],
        compensation_timeout=0.5,
    )

    result = await pipeline.process(make_order())

    assert result.kind == COMPENSATION_FAILED
    spans = traces.named()
    refund, stuck = spans["compensate payment"], spans["compensate vendor"]
    assert refund.attributes is not None
    assert (refund.attributes["outcome"], refund.attributes["kind"]) == ("error", "refund_failed")
    assert refund.status.description == "refund_failed"
    assert stuck.attributes is not None
    assert stuck.attributes["outcome"] == "timeout"
    assert stuck.status.status_code is StatusCode.ERROR
    assert stuck.end_time == ns(0.6)
    assert spans["order"].status.description == COMPENSATION_FAILED
    # The failing step keeps the kind it failed with, not the order's (README, "Tracing").
    failing = spans["step courier"]
    assert failing.attributes is not None
    assert failing.attributes["kind"] == "no_courier"
    assert failing.status.description == "no_courier"


async def test_a_recovered_order_has_a_span_of_its_own(
    autojump_clock: trio.abc.Clock, traces: Traces
) -> None:
    """Recovery's undo runs in a `recover order` span, its compensations under it."""
    current_attempt.set(Attempt("key-9", "attempt-9", "owner-2"))
    pipeline = traced(traces, steps(Instant(), Instant(), Instant()))
    known = [
        StepResult("payment", StepStatus.OK, 0),
        StepResult("vendor", StepStatus.ERROR, 0, "vendor_unavailable"),
        StepResult("courier", StepStatus.CANCELED, 0),
    ]

    await pipeline.undo(make_order(), known, INTERRUPTED)

    spans = traces.named()
    recover = spans["recover order"]
    assert children_of(recover, traces.spans()) == ["compensate payment"]
    assert dict(recover.attributes or {}) == {
        "order_id": "o-1",
        "idempotency_key": "key-9",
        "attempt_id": "attempt-9",
        "kind": INTERRUPTED,
    }


async def test_the_courier_wait_is_a_span_only_when_an_order_waits(
    autojump_clock: trio.abc.Clock, traces: Traces
) -> None:
    """With one courier, of two orders at once one waits for the other's 0.1 s: only its
    courier step has a `courier wait` child, and each order's spans are its own trace."""
    pool = CourierPool(1, wait_span=traces.tracing.courier_wait)
    courier = CourierService(pool, delay_ms=100)
    pipeline = traced(traces, [Step("courier", courier.assign, courier.unassign)])

    async with trio.open_nursery() as nursery:
        for order_id in ("o-1", "o-2"):
            nursery.start_soon(pipeline.process, make_order(order_id))

    spans = traces.spans()
    (wait,) = (span for span in spans if span.name == "courier wait")
    (waiting_step,) = (span for span in spans if span_id(span) == parent_of(wait))
    assert waiting_step.name == "step courier"
    assert dict(wait.attributes or {}) == {"waiting_ahead": 0, "outcome": "ok"}
    assert (wait.start_time, wait.end_time) == (0, ns(0.1))
    orders = [span for span in spans if span.name == "order"]
    assert len({trace_id(order) for order in orders}) == 2
    for order in orders:
        (step,) = (span for span in spans if parent_of(span) == span_id(order))
        assert trace_id(step) == trace_id(order)


async def test_a_courier_wait_cut_by_the_deadline_is_canceled(
    autojump_clock: trio.abc.Clock, traces: Traces
) -> None:
    """An order whose deadline passes while it waits for a courier: the wait ends `canceled`."""
    pool = CourierPool(1, wait_span=traces.tracing.courier_wait)
    courier = CourierService(pool, delay_ms=1000)
    step = [Step("courier", courier.assign, courier.unassign)]
    patient, hasty = traced(traces, step), traced(traces, step, timeout=0.25)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(patient.process, make_order("o-1"))
        await trio.sleep(0.01)
        nursery.start_soon(hasty.process, make_order("o-2"))

    (wait,) = (span for span in traces.spans() if span.name == "courier wait")
    assert wait.attributes is not None
    assert wait.attributes["outcome"] == "canceled"
    assert (wait.start_time, wait.end_time) == (ns(0.01), ns(0.26))


async def test_tracing_off_wraps_nothing() -> None:
    """Without a tracer provider nothing is wrapped: an order costs what it did before."""
    off = Tracing.from_global()  # tests never install the global provider
    pipeline = Pipeline(steps(Instant(), Instant(), Instant()))
    pool = CourierPool(1, wait_span=off.courier_wait)

    assert not off.on
    assert off.instrument(pipeline) is pipeline
    assert off.traced(pipeline.steps[0]) is pipeline.steps[0]
    assert pool.wait_span is None
    async with pool.slot():  # the plain path still works
        pass


async def test_tracing_is_on_once_a_provider_is_installed(
    traces: Traces, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`from_global` takes the installed provider's tracer (faked here: the process's global
    provider can be set only once), and its spans carry the wall clock's time."""
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: traces.provider)
    before = time.time_ns()

    on = Tracing.from_global()
    await on.traced(Step("payment", Instant())).run(make_order())

    assert on.on
    assert on.courier_wait is not None
    (span,) = traces.spans()
    assert span.start_time is not None
    assert span.end_time is not None
    assert before <= span.start_time <= span.end_time <= time.time_ns()


def test_instrument_keeps_every_setting_of_the_pipeline(traces: Traces) -> None:
    """The traced pipeline is the same pipeline (its timeouts, its callbacks) plus spans."""
    on_step = print
    pipeline = Pipeline(
        steps(Instant(), Instant(), Instant()), timeout=3, compensation_timeout=2, on_step=on_step
    )

    instrumented = traces.tracing.instrument(pipeline)

    assert isinstance(instrumented, TracedPipeline)
    assert (instrumented.timeout, instrumented.compensation_timeout) == (3, 2)
    assert instrumented.on_step is on_step
    assert [s.name for s in instrumented.steps] == ["payment", "vendor", "courier"]


# --- the caller's trace, through the app ---------------------------------------------------

CALLER_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
CALLER_SPAN = 0xB7AD6B7169203331
TRACEPARENT = f"00-{CALLER_TRACE:032x}-{CALLER_SPAN:016x}-01"


def traced_app(traces: Traces) -> QuartTrio:
    """The app, the desk and a pipeline of instant steps, wired as `assemble` wires them."""
    store = MemoryStore()
    reporter = OrderReporter(Metrics(), store)
    pipeline = Pipeline(
        [Step(name, Instant(), Instant()) for name in STEP_NAMES],
        on_finish=reporter.finished,
        on_step=reporter.step_ended,
    )
    desk = OrderDesk(traces.tracing.instrument(pipeline), store, on_refused=reporter.refused)
    return create_app(desk, on_refused=reporter.refused)


async def post_order(app: QuartTrio, headers: dict[str, str] | Headers) -> int:
    body = b'{"order_id": "o-7", "amount": 3}'
    response = await app.test_client().post("/order", data=body, headers=headers)
    return response.status_code


async def test_a_traceparent_continues_the_callers_trace(traces: Traces) -> None:
    """The order's span is a child of the caller's span, in the caller's trace, with its
    `tracestate`; it carries the request ID and the idempotency key the client sent."""
    headers = {
        "traceparent": TRACEPARENT,
        "tracestate": "congo=t61rcWkgMzE",
        "X-Request-ID": "req-42",
        "Idempotency-Key": "k-7",
    }

    assert await post_order(traced_app(traces), headers) == 200

    spans = traces.named()
    order = spans["order"]
    assert order.parent is not None
    assert (order.parent.trace_id, order.parent.span_id) == (CALLER_TRACE, CALLER_SPAN)
    assert order.parent.is_remote
    assert order.context is not None
    assert order.context.trace_state.to_header() == "congo=t61rcWkgMzE"
    assert {trace_id(span) for span in spans.values()} == {CALLER_TRACE}
    assert order.attributes is not None
    assert order.attributes["request_id"] == "req-42"
    assert order.attributes["idempotency_key"] == "k-7"
    assert order.attributes["kind"] == "ok"


@pytest.mark.parametrize(
    "traceparent",
    [
        None,
        "00-xyz",
        f"00-{0:032x}-{CALLER_SPAN:016x}-01",  # an all-zero trace ID is invalid
        f"00-{CALLER_TRACE:032x}-{CALLER_SPAN:016x}-01-{'0' * 600}",  # over 512 characters
    ],
)
async def test_no_valid_traceparent_starts_a_trace_of_our_own(
    traces: Traces, traceparent: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    """A missing, malformed, invalid or oversized traceparent is ignored, without a log line."""
    headers = {} if traceparent is None else {"traceparent": traceparent}

    with caplog.at_level(logging.WARNING, logger="opentelemetry"):
        assert await post_order(traced_app(traces), headers) == 200

    order = traces.named()["order"]
    assert order.parent is None
    assert trace_id(order) != CALLER_TRACE
    assert [r for r in caplog.records if r.name.startswith("opentelemetry")] == []


async def test_an_oversized_tracestate_is_dropped_but_the_parent_kept(traces: Traces) -> None:
    """A tracestate over 512 characters in all is left out, before the propagator warns."""
    headers = {"traceparent": TRACEPARENT, "tracestate": "a=" + "b" * 300 + ",c=" + "d" * 300}

    assert await post_order(traced_app(traces), headers) == 200

    order = traces.named()["order"]
    assert order.parent is not None
    assert order.parent.trace_id == CALLER_TRACE
    assert order.context is not None
    assert order.context.trace_state.to_header() == ""


@pytest.mark.parametrize(("length", "continued"), [(512, True), (513, False)])
async def test_a_traceparent_is_continued_up_to_the_propagators_limit(
    traces: Traces, length: int, continued: bool
) -> None:
    """A later version's traceparent may carry more fields: one of 512 characters, the
    propagator's limit, continues the caller's trace; a longer one is ignored."""
    prefix = f"01-{CALLER_TRACE:032x}-{CALLER_SPAN:016x}-01-"
    headers = {"traceparent": prefix + "0" * (length - len(prefix))}

    assert await post_order(traced_app(traces), headers) == 200

    order = traces.named()["order"]
    assert (order.parent is not None and order.parent.trace_id == CALLER_TRACE) is continued


def ids_of(*headers: tuple[bytes, bytes]) -> tuple[bytes, dict[str, list[str]] | None]:
    """What the middleware reads of a request with `headers`: its ID and trace context."""
    return _ids_of(cast(HTTPScope, {"headers": list(headers)}))


def test_tracestate_headers_are_combined_within_their_limit() -> None:
    """Several tracestate headers are one list (RFC 9110); over 512 characters in all, it is
    left out and the parent kept; a tracestate without a traceparent is nothing."""
    parent = (b"traceparent", TRACEPARENT.encode())

    _, combined = ids_of(parent, (b"tracestate", b"a=1"), (b"tracestate", b"b=2"))
    half = b"a=" + b"1" * 300
    _, too_long = ids_of(parent, (b"tracestate", half), (b"tracestate", half))
    _, one_too_long = ids_of(parent, (b"tracestate", b"a=" + b"1" * 600))
    _, orphan = ids_of((b"tracestate", b"a=1"))
    # The propagator's limit is 512 characters, the combining comma included: at it, kept.
    one_at_limit = b"a=" + b"1" * 510
    _, at_limit = ids_of(parent, (b"tracestate", one_at_limit))
    two_at_limit = (b"a=" + b"1" * 253, b"b=" + b"2" * 254)
    _, both_at_limit = ids_of(parent, *((b"tracestate", value) for value in two_at_limit))
    _, just_over = ids_of(parent, (b"tracestate", b"a=" + b"1" * 254), (b"tracestate", half[:256]))

    assert combined == {"traceparent": [TRACEPARENT], "tracestate": ["a=1", "b=2"]}
    assert at_limit == {"traceparent": [TRACEPARENT], "tracestate": [one_at_limit.decode()]}
    assert both_at_limit == {
        "traceparent": [TRACEPARENT],
        "tracestate": [value.decode() for value in two_at_limit],
    }
    assert too_long == one_too_long == just_over == {"traceparent": [TRACEPARENT]}
    assert orphan is None


@pytest.mark.parametrize(
    "second",
    [
        f"00-{CALLER_TRACE + 1:032x}-{CALLER_SPAN:016x}-01",  # another caller's
        TRACEPARENT,  # the same one again
        "garbage",
        f"00-{CALLER_TRACE:032x}-{CALLER_SPAN:016x}-01-{'0' * 600}",  # over 512 characters
    ],
)
async def test_two_traceparent_headers_start_a_trace_of_our_own(
    traces: Traces, second: str
) -> None:
    """A request with two traceparent headers has no one parent (their combined value is not
    a traceparent): a new trace, as the W3C test suite's test_traceparent_duplicated expects,
    whichever comes first and however long."""
    for pair in ((TRACEPARENT, second), (second, TRACEPARENT)):
        headers = Headers([("traceparent", value) for value in pair])
        assert await post_order(traced_app(traces), headers) == 200

    orders = [span for span in traces.spans() if span.name == "order"]
    assert [span.parent for span in orders] == [None, None]
    assert CALLER_TRACE not in {trace_id(span) for span in orders}


def test_the_request_id_header_is_read_as_before() -> None:
    """Reading the trace headers kept the rule: the first X-Request-ID decides."""
    given, carrier = ids_of((b"x-request-id", b"bad id!"), (b"x-request-id", b"good"))

    assert given != b"good"
    assert len(given) == 32
    assert carrier is None


ASSEMBLE_TAKES_TRACING = "tracing" in inspect.signature(assemble).parameters


@pytest.mark.skipif(not ASSEMBLE_TAKES_TRACING, reason="server.assemble takes no tracing yet")
async def test_assemble_wires_every_span(traces: Traces) -> None:
    """The composition root instruments the pipeline and the pool: two orders at once with
    one courier make every span, the second's courier step waiting for the first's."""
    settings = Settings(
        courier_pool_size=1, payment_delay_ms=0, vendor_delay_ms=0, courier_delay_ms=20
    )
    given: dict[str, Any] = {"tracing": traces.tracing}  # a keyword older assembles lack
    assembly = assemble(settings, **given)

    async def post(order_id: str) -> None:
        body = b'{"order_id": "%s", "amount": 1}' % order_id.encode()
        response = await assembly.app.test_client().post("/order", data=body)
        assert response.status_code == 200

    async with trio.open_nursery() as nursery:
        nursery.start_soon(post, "a-1")
        nursery.start_soon(post, "a-2")

    names = sorted(span.name for span in traces.spans())
    assert names == sorted(
        ["order", "step payment", "step vendor", "step courier"] * 2 + ["courier wait"]
    )
    assert isinstance(assembly.desk.pipeline, TracedPipeline)
    assert assembly.tracker.in_flight == 0


# --- configuration from the environment ----------------------------------------------------


@pytest.fixture(name="otel_environ")
def _otel_environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No OTEL_* variable from the machine's environment."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"},
        {"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "otlp"},
        {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://c:4318"},  # metrics are not ours
    ],
)
def test_tracing_stays_off_unless_the_environment_asks(environ: dict[str, str]) -> None:
    """Off by default, with OTEL_TRACES_EXPORTER=none, or OTEL_SDK_DISABLED=true."""
    assert span_exporter_from_env(environ) is None
    assert configure_tracing(environ) is False


@pytest.mark.parametrize(
    ("name", "value", "endpoint"),
    [
        ("OTEL_TRACES_EXPORTER", "otlp", "http://localhost:4318/v1/traces"),
        ("OTEL_TRACES_EXPORTER", " Console , otlp", "http://localhost:4318/v1/traces"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318", "http://collector:4318/v1/traces"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c:1234/t", "http://c:1234/t"),
    ],
)
def test_otlp_when_named_or_an_endpoint_is_set(
    otel_environ: pytest.MonkeyPatch, name: str, value: str, endpoint: str
) -> None:
    """OTLP over HTTP; the exporter itself reads OTEL_EXPORTER_OTLP_* (its endpoint shown)."""
    otel_environ.setenv(name, value)

    exporter = span_exporter_from_env(os.environ)

    assert exporter is not None
    assert endpoint_of(exporter) == endpoint
    exporter.shutdown()


def endpoint_of(exporter: SpanExporter) -> object:
    assert isinstance(exporter, OTLPSpanExporter)
    return exporter._endpoint  # private, but the one place the exporter shows it


@pytest.mark.parametrize(
    ("environ", "seconds"),
    [
        ({}, 10),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "3"}, 3),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "3", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2.5"}, 2.5),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, 10),  # as the exporter: its default
        # A wait the flush cannot take (it failed the exit's last line), or an unbounded one.
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "-1"}, 10),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "nan"}, 10),
        ({"OTEL_EXPORTER_OTLP_TIMEOUT": "inf"}, 10),
    ],
)
def test_the_flush_at_exit_waits_one_exports_timeout(
    environ: dict[str, str], seconds: float
) -> None:
    """What `flush_spans` waits at most: the exporter's timeout, read as the exporter does."""
    assert export_timeout(environ) == seconds


class _Stuck(SpanExporter):
    """A collector that takes nothing until the test lets it."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(10)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.set()


async def test_a_flush_given_up_on_is_not_run_again_at_exit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`flush_spans` gives up on a collector that takes nothing after the export timeout; the
    provider's own flush at interpreter exit must not run then (before SDK 1.34 it waits for
    the whole queue with no timeout, after the hard deadline and with every signal ignored)."""
    exporter = _Stuck()
    provider = tracer_provider(exporter)  # registers its shutdown to run at exit
    provider.get_tracer("test").start_span("one").end()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    unregistered: list[object] = []
    monkeypatch.setattr(atexit, "unregister", unregistered.append)
    try:
        started = time.monotonic()
        await flush_spans({"OTEL_EXPORTER_OTLP_TIMEOUT": "0.2"})

        assert time.monotonic() - started < 5
        assert provider.shutdown in unregistered  # (the provider unregisters it only once done)
    finally:
        exporter.release.set()


def test_console_exporter_on_request(otel_environ: pytest.MonkeyPatch) -> None:
    otel_environ.setenv("OTEL_TRACES_EXPORTER", "console")
    assert isinstance(span_exporter_from_env(os.environ), ConsoleSpanExporter)


@pytest.mark.parametrize(
    ("environ", "warning"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "zipkin not supported"),
        (
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTLP protocol 'grpc' not supported: using http/protobuf",
        ),
    ],
)
def test_what_is_not_supported_is_said(
    otel_environ: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    environ: dict[str, str],
    warning: str,
) -> None:
    exporter = span_exporter_from_env(environ)
    if exporter is not None:
        exporter.shutdown()

    assert warning in caplog.text


def test_without_the_sdk_a_warning_and_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Asked for without the `otlp` extra installed: one warning naming the extra, and off."""
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)

    assert span_exporter_from_env({"OTEL_TRACES_EXPORTER": "otlp"}) is None
    assert "pip install 'order-pipeline[otlp]'" in caplog.text


@pytest.mark.parametrize(("service", "expected"), [(None, "order-pipeline"), ("shop", "shop")])
def test_configure_tracing_installs_a_batching_provider(
    otel_environ: pytest.MonkeyPatch, service: str | None, expected: str
) -> None:
    """The global provider is set once (captured here, so the process's stays unset); the
    service is named by OTEL_SERVICE_NAME, else order-pipeline."""
    installed: list[trace.TracerProvider] = []
    otel_environ.setattr(trace, "set_tracer_provider", installed.append)
    otel_environ.setenv("OTEL_TRACES_EXPORTER", "otlp")
    if service is not None:
        otel_environ.setenv("OTEL_SERVICE_NAME", service)

    assert configure_tracing(os.environ) is True

    (provider,) = installed
    assert isinstance(provider, TracerProvider)
    assert provider.resource.attributes["service.name"] == expected
    provider.shutdown()


def test_a_provider_batches_what_it_exports() -> None:
    exporter = InMemorySpanExporter()
    provider = tracer_provider(exporter)
    provider.get_tracer("test").start_span("one").end()

    assert exporter.get_finished_spans() == ()  # queued for the batch
    provider.force_flush()
    assert [span.name for span in exporter.get_finished_spans()] == ["one"]
    provider.shutdown()


@pytest.mark.parametrize(
    "batching",
    [
        {"OTEL_BSP_SCHEDULE_DELAY": "0"},
        {"OTEL_BSP_MAX_QUEUE_SIZE": "0"},
        {"OTEL_BSP_MAX_QUEUE_SIZE": "10", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "100"},
    ],
)
def test_batching_the_sdk_refuses_is_a_warning_and_off(
    otel_environ: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, batching: dict[str, str]
) -> None:
    """OTEL_BSP_* values the SDK's batch processor refuses (it raises ValueError, where it
    defaults an unparsable one) leave tracing off with one warning saying why; they ended
    the server at its start with a traceback."""
    installed: list[trace.TracerProvider] = []
    otel_environ.setattr(trace, "set_tracer_provider", installed.append)
    otel_environ.setenv("OTEL_TRACES_EXPORTER", "otlp")
    for name, value in batching.items():
        otel_environ.setenv(name, value)

    assert configure_tracing(os.environ) is False

    assert installed == []
    (warning,) = [r for r in caplog.records if r.name == "order_pipeline.tracing"]
    assert warning.levelno == logging.WARNING
    assert "tracing is off" in warning.getMessage()


def test_a_limit_the_sdk_refuses_as_it_loads_is_a_warning_and_off() -> None:
    """OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT=-1 makes the SDK raise ValueError as its module is
    imported, which happens when tracing is asked for: in a process of its own here (this
    one has the SDK loaded). One warning and off, not a traceback that ends the server."""
    environ = {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "-1",
    }
    code = (
        "import logging; logging.basicConfig(format='%(levelname)s %(message)s')\n"
        "from order_pipeline.tracing import configure_tracing\n"
        "print(configure_tracing())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=60
    )

    assert (done.returncode, done.stdout) == (0, "False\n"), done.stderr
    assert done.stderr.startswith("WARNING tracing cannot be set up as OTEL_* asks")
    assert done.stderr.count("\n") == 1
