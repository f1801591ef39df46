"""OpenTelemetry traces: a span per gRPC call (the instrumentation package's aio server
interceptor, which continues the trace Envoy starts through `traceparent`), a producer span
where a job is queued on NATS with the W3C trace context in the message headers, and a
consumer span, its child, where a worker takes the message.

Spans are exported over OTLP/gRPC only when OTEL_EXPORTER_OTLP_ENDPOINT is set (the other
OTEL_EXPORTER_OTLP_* variables apply as usual); otherwise the API's no-op tracer runs and
nothing is recorded or sent."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

_TRACER = trace.get_tracer("loramesh")
_provider = None


def configure(service: str, endpoint: str | None) -> list[grpc.aio.ServerInterceptor]:
    """With an endpoint: exports this process's spans under the service's name and returns
    the server interceptor that opens a span per call (health checks and reflection left
    out). Without one: nothing."""
    global _provider
    if not endpoint:
        return []
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    from opentelemetry.instrumentation.grpc.filters import any_of, health_check, negate, service_prefix
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    _provider = TracerProvider(resource=Resource.create({"service.name": service, "service.namespace": "loramesh"}))
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(_provider)
    return [aio_server_interceptor(filter_=negate(any_of(health_check(), service_prefix("grpc.reflection"))))]


def shutdown() -> None:
    """Sends the spans still buffered (at process exit)."""
    if _provider is not None:
        _provider.shutdown()


@contextlib.contextmanager
def publishing(subject: str) -> Iterator[dict[str, str] | None]:
    """A producer span around queuing a message on `subject`; yields the headers that carry
    its trace context to the consumer (None when there is no trace to continue)."""
    with _TRACER.start_as_current_span(f"{subject} publish", kind=SpanKind.PRODUCER, attributes={
            "messaging.system": "nats", "messaging.destination.name": subject, "messaging.operation": "publish"}):
        headers: dict[str, str] = {}
        propagate.inject(headers)
        yield headers or None


@contextlib.contextmanager
def processing(msg) -> Iterator[None]:
    """A consumer span around handling a work-queue message, a child of the span that
    queued it when its headers carry a trace context."""
    parent = propagate.extract(dict(msg.headers or {}))
    with _TRACER.start_as_current_span(f"{msg.subject} process", context=parent, kind=SpanKind.CONSUMER,
                                       attributes={"messaging.system": "nats", "messaging.destination.name": msg.subject,
                                                   "messaging.operation": "process"}):
        yield
