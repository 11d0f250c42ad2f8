"""OpenTelemetry: a span per RPC that continues the caller's trace, and under it the model batch with its
encode, retrieve and forward stages (an in-memory exporter collects them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raee_server import tracing
from raee_server.protos.raee.v1 import raee_pb2 as pb

from .grpc_harness import ServerThread
from .test_engine import ROWS
from .test_grpc import ingest, make_settings, tiny_engine_factory

pytest.importorskip("opentelemetry.sdk")

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def test_an_rpc_span_continues_the_callers_trace_and_holds_the_batch_stages(tmp_path: Path) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    settings = make_settings(tmp_path)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    try:
        server.wait_ready()
        ingest(server.stub, "sentiment", ROWS)
        exporter.clear()
        # `paper` passes both stages: the key stage (key, retrieval) and the backbone
        reply = server.stub.Classify(pb.ClassifyRequest(task="sentiment", text="a great movie",
                                                        options=pb.ClassifyOptions(policy="paper")),
                                     metadata=[("traceparent", f"00-{TRACE_ID}-{CALLER_SPAN}-01")])
        assert reply.label
        spans = {s.name: s for s in exporter.get_finished_spans()}
        rpc = spans["/raee.v1.RaeeService/Classify"]
        assert format(rpc.context.trace_id, "032x") == TRACE_ID
        assert rpc.parent is not None and format(rpc.parent.span_id, "016x") == CALLER_SPAN
        for name, stages in (("raee.key_stage", ("raee.encode", "raee.retrieve")), ("raee.batch", ("raee.forward",))):
            batch = spans[name]
            assert batch.parent is not None and batch.parent.span_id == rpc.context.span_id
            assert batch.attributes is not None and batch.attributes["task"] == "sentiment"
            assert [link.context.span_id for link in batch.links] == [rpc.context.span_id]
            for stage in stages:
                assert spans[stage].parent is not None and spans[stage].parent.span_id == batch.context.span_id, stage
                assert spans[stage].context.trace_id == rpc.context.trace_id
    finally:
        tracing.use(None)
        server.stop()


def test_the_otel_variables_decide_whether_traces_are_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.configure() and not tracing.active()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "raee-test")
    try:
        assert tracing.configure() and tracing.active() and tracing.server_interceptors()
        assert tracing._provider.resource.attributes["service.name"] == "raee-test"
        monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
        assert not tracing.wanted()
        monkeypatch.setenv("OTEL_SDK_DISABLED", "false")
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin-ish")
        with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER"):
            tracing.configure()
    finally:
        tracing.use(None)
