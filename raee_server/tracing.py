"""Optional OpenTelemetry tracing, configured by the standard OTEL_* variables.

With the `[tracing]` extra installed and an exporter asked for (OTEL_TRACES_EXPORTER, or an
OTEL_EXPORTER_OTLP_ENDPOINT), the server records a span per RPC (opentelemetry-instrumentation-grpc's
server interceptor, which also continues a caller's trace from its `traceparent` metadata) and,
under it, a span per model batch (`raee.batch`, linked to every request it served) with its stages:
`raee.encode`, `raee.retrieve`, `raee.forward`. OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES and
OTEL_TRACES_SAMPLER apply as usual. Without the packages, or unconfigured, every call here costs
next to nothing and records nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
except ImportError:  # the [tracing] extra is not installed
    trace = None  # type: ignore[assignment]

_provider: Any = None  # the TracerProvider spans go to: configure()'s, or one a test chose with use()


def wanted() -> bool:
    """The OTEL_* variables ask for traces."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "")
    return exporter not in ("", "none") or bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                                                 or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure() -> bool:
    """Set up the SDK from OTEL_* when they ask for traces (and the extra is installed); True when on."""
    global _provider
    if trace is None or not wanted():
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())  # endpoint, headers, TLS: OTEL_EXPORTER_OTLP_*
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name != "none":
            raise ValueError(f"OTEL_TRACES_EXPORTER: {name!r} is not otlp, console or none")
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "raee-server"}))
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    use(provider)
    return True


def use(provider: Any) -> None:
    """Send spans to `provider` (None: stop recording)."""
    global _provider
    _provider = provider


def active() -> bool:
    return trace is not None and _provider is not None


def server_interceptors() -> list[Any]:
    """The gRPC server interceptor that opens a span per RPC, when tracing is on."""
    if not active():
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=_provider)]


def current() -> Any:
    """The caller's trace context, to carry across the model worker's queue (None when off)."""
    return otel_context.get_current() if active() else None


@contextmanager
def span(name: str, parent: Any = None, linked: Sequence[Any] = (), **attributes: Any) -> Iterator[None]:
    """A span around a block, child of `parent` (a context from current()) or of the current span,
    linked to the spans of the `linked` contexts."""
    if not active():
        yield
        return
    links = []
    for ctx in linked:
        found = trace.get_current_span(ctx).get_span_context()
        if found.is_valid:
            links.append(trace.Link(found))
    tracer = _provider.get_tracer("raee")
    with tracer.start_as_current_span(name, context=parent, links=links, attributes=attributes):
        yield
