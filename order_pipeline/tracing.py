"""OpenTelemetry spans for each order, each step, each compensation and each courier wait.

Tracing is an observer, like the metrics: the orchestrator and the services know
nothing of it. The composition root wraps what it builds (`Tracing.instrument`
for the pipeline and its steps, `Tracing.courier_wait` for the pool), as
`StepTracker` wraps steps. The span tree of one order::

    order                         order_id, idempotency_key, attempt_id, request_id; kind at the end
    ├── step payment              order_id, step, outcome ok | error | canceled (kind on error)
    ├── step vendor
    ├── step courier
    │   └── courier wait          only when the pool had no free slot: outcome ok | canceled
    └── compensate payment        (order failed) outcome ok | error | timeout

A recovered order (its process died) is a `recover order` span with its
compensations under it. The order's span is a child of the caller's span when
the request carried a W3C `traceparent` (`http/asgi.py`).

OpenTelemetry keeps its current span in a context variable and Trio copies the
context into every task it starts, so each step and compensation task opens its
span as a child of the order's without passing anything around. The first
failing step's span ends with status error and its siblings' with outcome
`canceled`, at the instant its failure cancelled them.

Only the `opentelemetry-api` package is required. Without a tracer provider
(`configure_tracing` installs one when the `otlp` extra is installed and the
`OTEL_*` environment asks for it), `Tracing.from_global()` is off and wraps
nothing: an order's path is the one it had before tracing existed.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Final

import attrs
import trio
from opentelemetry import context, trace
from opentelemetry.trace import Status, StatusCode

from .kinds import INTERNAL, kind_of, label
from .logs import request_id
from .model import OrderRequest, OrderResult, StepResult, current_attempt
from .orchestrator import OnFinish, Pipeline, Step, StepAction

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "TRACER_NAME",
    "TracedPipeline",
    "Tracing",
    "configure_tracing",
    "export_timeout",
    "flush_spans",
    "span_exporter_from_env",
    "tracer_provider",
]

log = logging.getLogger(__name__)

TRACER_NAME: Final = "order_pipeline"
# The OTLP exporter's default timeout of one export, seconds (OTEL_EXPORTER_OTLP_TIMEOUT).
EXPORT_TIMEOUT_S: Final = 10.0
SERVICE_NAME: Final = "order-pipeline"

# Span names.
ORDER: Final = "order"
RECOVER_ORDER: Final = "recover order"
COURIER_WAIT: Final = "courier wait"

# Attribute keys: the names the log lines use for the same things.
ORDER_ID: Final = "order_id"
IDEMPOTENCY_KEY: Final = "idempotency_key"
ATTEMPT_ID: Final = "attempt_id"
REQUEST_ID: Final = "request_id"
KIND: Final = "kind"
STEP: Final = "step"
OUTCOME: Final = "outcome"
WAITING_AHEAD: Final = "waiting_ahead"

Clock = Callable[[], "int | None"]
"""Span timestamps in nanoseconds; None lets the SDK read the wall clock (`time.time_ns`)."""


def _sdk_clock() -> int | None:
    return None


def _failed(span: trace.Span, kind: str, exc: BaseException | None = None) -> None:
    span.set_attribute(KIND, kind)
    span.set_status(Status(StatusCode.ERROR, kind))
    if exc is not None and kind == INTERNAL:  # an unexpected error: its traceback too
        span.record_exception(exc)


@attrs.frozen
class Tracing:
    """Opens the spans of orders, steps, compensations and courier waits on `tracer`.

    `Tracing()` (no tracer) is off: every method hands back what it was given.
    `clock` gives span timestamps (tests pass Trio's virtual clock); by default
    the SDK's wall clock.
    """

    tracer: trace.Tracer | None = None
    clock: Clock = attrs.field(default=_sdk_clock, kw_only=True)

    @classmethod
    def from_global(cls) -> Tracing:
        """On if a tracer provider was installed (`configure_tracing`, or the OpenTelemetry
        distro's auto-instrumentation) before this call; off otherwise, for good."""
        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return cls()
        return cls(provider.get_tracer(TRACER_NAME))

    @property
    def on(self) -> bool:
        return self.tracer is not None

    def instrument(self, pipeline: Pipeline) -> Pipeline:
        """`pipeline` with an `order` span around each order and its steps `traced`."""
        if self.tracer is None:
            return pipeline
        fields = {f.name: getattr(pipeline, f.name) for f in attrs.fields(Pipeline)}
        fields["steps"] = [self.traced(step) for step in pipeline.steps]
        fields["on_finish"] = _marking_kind(pipeline.on_finish)
        return TracedPipeline(**fields, tracing=self)

    def traced(self, step: Step) -> Step:
        """`step` whose run and compensation each run inside a span of their own."""
        if self.tracer is None:
            return step
        compensate = None if step.compensate is None else self._compensation(step)
        return Step(step.name, self._run(step), compensate)

    @property
    def courier_wait(self) -> Callable[[int], AbstractContextManager[None]] | None:
        """For `CourierPool(wait_span=...)`: a span around each real wait for a slot (None: off)."""
        return None if self.tracer is None else self._courier_wait

    def _run(self, step: Step) -> StepAction:
        # An order's step that neither returns nor raises an Exception was cancelled.
        return self._spanned(step.name, f"step {step.name}", step.run, unfinished="canceled")

    def _compensation(self, step: Step) -> StepAction:
        assert step.compensate is not None
        # Compensations run shielded: only their deadline can cancel them.
        span_name = f"compensate {step.name}"
        return self._spanned(step.name, span_name, step.compensate, unfinished="timeout")

    def _spanned(
        self, name: str, span_name: str, action: StepAction, *, unfinished: str
    ) -> StepAction:
        """`action` inside a span of its own, whose outcome is "ok", "error" or `unfinished`
        (cancelled: trio.Cancelled); a "timeout" is an error too."""
        tracer, clock = self.tracer, self.clock
        assert tracer is not None

        async def traced(order: OrderRequest) -> None:
            attributes = {ORDER_ID: order.order_id, STEP: name}
            span = tracer.start_span(span_name, attributes=attributes, start_time=clock())
            token = context.attach(trace.set_span_in_context(span))
            outcome = unfinished
            try:
                await action(order)
                outcome = "ok"
            except Exception as exc:
                outcome = "error"
                _failed(span, kind_of(exc), exc)
                raise
            finally:
                context.detach(token)
                span.set_attribute(OUTCOME, outcome)
                if outcome == "timeout":
                    span.set_status(Status(StatusCode.ERROR, "timeout"))
                span.end(end_time=clock())

        return traced

    @contextmanager
    def _courier_wait(self, waiting_ahead: int) -> Iterator[None]:
        assert self.tracer is not None
        span = self.tracer.start_span(
            COURIER_WAIT, attributes={WAITING_AHEAD: waiting_ahead}, start_time=self.clock()
        )
        outcome = "canceled"
        try:
            yield
            outcome = "ok"
        finally:
            span.set_attribute(OUTCOME, outcome)
            span.end(end_time=self.clock())

    def _order_span(self, name: str, order: OrderRequest) -> trace.Span:
        assert self.tracer is not None
        attributes: dict[str, str] = {ORDER_ID: order.order_id}
        attempt = current_attempt.get()
        if attempt is not None:
            attributes[IDEMPOTENCY_KEY] = attempt.key
            attributes[ATTEMPT_ID] = attempt.id
        given = request_id.get()
        if given is not None:
            attributes[REQUEST_ID] = given
        return self.tracer.start_span(name, attributes=attributes, start_time=self.clock())


def _marking_kind(on_finish: OnFinish) -> OnFinish:
    """`on_finish`, after writing the order's kind on its span (the current one in the order's
    task): also for an order cancelled from outside, whose `process` raises instead of returning."""

    def finished(result: OrderResult) -> None:
        span = trace.get_current_span()
        span.set_attribute(KIND, label(result.kind))
        if not result.ok:
            span.set_status(Status(StatusCode.ERROR, result.kind))
        on_finish(result)

    return finished


@attrs.frozen
class TracedPipeline(Pipeline):
    """A pipeline whose orders (and recoveries) each run inside a span, made by
    `Tracing.instrument`: the steps' and compensations' spans are its children."""

    tracing: Tracing = attrs.field(kw_only=True)

    async def process(self, order: OrderRequest) -> OrderResult:
        span = self.tracing._order_span(ORDER, order)
        token = context.attach(trace.set_span_in_context(span))
        try:
            return await super().process(order)
        finally:
            context.detach(token)
            span.end(end_time=self.tracing.clock())

    async def undo(
        self, order: OrderRequest, known: Sequence[StepResult], kind: str, *, report: bool = True
    ) -> OrderResult:
        span = self.tracing._order_span(RECOVER_ORDER, order)
        token = context.attach(trace.set_span_in_context(span))
        try:
            return await super().undo(order, known, kind, report=report)
        finally:
            context.detach(token)
            span.end(end_time=self.tracing.clock())


def _exporter_named(environ: Mapping[str, str]) -> str | None:
    """The exporter OTEL_TRACES_EXPORTER names (otlp, console), or otlp if it is unset and an
    OTLP endpoint is; else None. Off unless asked: the specification's default (otlp) would
    send every span to localhost:4318 whether a collector listens there or not."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    named = {
        name.strip().lower()
        for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",")
        if name.strip()
    }
    if not named:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return "otlp" if endpoint else None
    unknown = named - {"otlp", "console", "none"}
    if unknown:
        log.warning(
            "OTEL_TRACES_EXPORTER: %s not supported (otlp, console or none): ignored",
            ", ".join(sorted(unknown)),
        )
    return next((name for name in ("otlp", "console") if name in named), None)


def span_exporter_from_env(environ: Mapping[str, str] = os.environ) -> SpanExporter | None:
    """The exporter the `OTEL_*` environment asks for, or None: tracing stays off.

    `otlp` is OTLP over HTTP (protobuf); the exporter reads OTEL_EXPORTER_OTLP_* itself.
    Needs the `otlp` extra; without it, a warning and None.
    """
    name = _exporter_named(environ)
    if name is None:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
    except ImportError:
        log.warning(
            "tracing asked for by OTEL_* but the SDK is not installed "
            "(pip install 'order-pipeline[otlp]'): tracing is off"
        )
        return None
    if name == "console":
        return ConsoleSpanExporter()
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    if protocol != "http/protobuf":
        log.warning("OTLP protocol %r not supported: using http/protobuf", protocol)
    return OTLPSpanExporter()


def tracer_provider(exporter: SpanExporter) -> TracerProvider:
    """An SDK provider that exports in batches (OTEL_BSP_*), samples as OTEL_TRACES_SAMPLER
    says, and names the service OTEL_SERVICE_NAME, else order-pipeline."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)  # flushes at exit
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def configure_tracing(environ: Mapping[str, str] = os.environ) -> bool:
    """Install the global tracer provider that the `OTEL_*` environment asks for; whether
    tracing is on. Once per process, before `Tracing.from_global()` (that is, `assemble`)."""
    # The SDK warns about most OTEL_* values it cannot follow and uses its default, but raises
    # ValueError for some: a span limit (OTEL_SPAN_*_LIMIT, OTEL_ATTRIBUTE_*_LIMIT) as its
    # module loads or its provider is made, a batching out of range (OTEL_BSP_*).
    try:
        exporter = span_exporter_from_env(environ)
        if exporter is None:
            return False
        provider = tracer_provider(exporter)
    except ValueError as exc:
        log.warning("tracing cannot be set up as OTEL_* asks (%s): tracing is off", exc)
        return False
    trace.set_tracer_provider(provider)
    log.info("tracing on: exporting spans with %s", type(exporter).__name__)
    return True


def export_timeout(environ: Mapping[str, str] = os.environ) -> float:
    """Seconds one export may take, read as the OTLP exporter reads them: in seconds, from
    OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, else OTEL_EXPORTER_OTLP_TIMEOUT, else 10."""
    raw = environ.get("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT") or environ.get(
        "OTEL_EXPORTER_OTLP_TIMEOUT"
    )
    try:
        seconds = float(raw) if raw else EXPORT_TIMEOUT_S
    except ValueError:
        return EXPORT_TIMEOUT_S
    # A negative or NaN wait would fail the flush (and the exit's last line); an infinite one
    # would make it unbounded.
    return seconds if 0 <= seconds < math.inf else EXPORT_TIMEOUT_S


async def flush_spans(environ: Mapping[str, str] = os.environ) -> None:
    """Export the spans still queued and shut the tracer provider down, waiting at most one
    export's timeout (`export_timeout`): what a collector has not taken by then is dropped.

    A serving process calls it once its drain is over, while its hard deadline still holds.
    Left to the SDK's own shutdown at interpreter exit, the wait was out of the hard
    deadline's reach, and every stop signal was ignored by then: its batch processor waits
    up to 30 s for its thread, which sends the queue 512 spans at a time, each batch with a
    timeout of its own (a collector that never answered held a drained server 30 s)."""
    shutdown = getattr(trace.get_tracer_provider(), "shutdown", None)
    if shutdown is None:  # tracing is off: the API's provider has nothing to flush
        return
    with trio.move_on_after(export_timeout(environ)):
        # Abandoned at the timeout: the SDK's thread still sending is a daemon thread.
        await trio.to_thread.run_sync(shutdown, abandon_on_cancel=True)
    # Not again at interpreter exit: the provider unregisters it only once it has returned,
    # and before SDK 1.34 a second shutdown waits for the whole queue, with no timeout.
    atexit.unregister(shutdown)
