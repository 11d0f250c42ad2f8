"""The gRPC service on a real socket: every RPC, every status code, health, batching, limits, shutdown."""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from raee_server.core.engine import Engine
from raee_server.errors import InvalidInput
from raee_server.models.backbone import CausalLMBackbone
from raee_server.models.encoders import HashingEncoder
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.settings import Settings
from raee_server.stores.metadata import MetadataStore
from raee_server.stores.vectors import EdgeVectorStore, collection_name

from .conftest import SENTIMENT
from .grpc_harness import ServerThread
from .test_engine import ROWS
from .tiny_models import tiny_causal_lm, tiny_tokenizer


def tiny_engine_factory(data_dir: Path, settings: Settings, gate: threading.Event | None = None):  # type: ignore[no-untyped-def]
    def factory() -> Engine:
        if gate is not None:
            gate.wait(30)
        backbone = CausalLMBackbone(tiny_causal_lm(), tiny_tokenizer(), "tiny-gemma3")
        encoder = HashingEncoder(32)
        vectors = EdgeVectorStore(data_dir / "qdrant", collection_name(backbone.model_id, encoder.model_id), 32)
        engine = Engine(backbone, encoder, vectors, MetadataStore(settings.sql_url), settings)
        try:
            engine.create_task(SENTIMENT)
        except Exception:
            pass  # already there on a restart
        return engine

    return factory


def make_settings(tmp_path: Path, **overrides: object) -> Settings:
    base: dict[str, object] = dict(data_dir=tmp_path, address="127.0.0.1:0", http_address="127.0.0.1:0",
                                   metrics_port=-1, max_wait_ms=20,
                                   ingest_batch_size=4, max_text_chars=200, max_k=32)
    base.update(overrides)
    return Settings(**base)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServerThread]:
    settings = make_settings(tmp_path, metrics_port=0)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    server.wait_ready()
    yield server
    server.stop()


def ingest(stub, task: str, rows: list[tuple[str, str]], chunk: int = 3) -> pb.IngestResponse:  # type: ignore[no-untyped-def]
    def messages() -> Iterator[pb.IngestRequest]:
        for i in range(0, len(rows), chunk):
            yield pb.IngestRequest(task=task if i == 0 else "",
                                   examples=[pb.Example(text=t, label=l) for t, l in rows[i : i + chunk]])

    return stub.Ingest(messages())


def code_of(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_online_ingest_is_seen_by_the_next_classify(served: ServerThread) -> None:
    stub = served.stub
    assert stub.GetTask(pb.GetTaskRequest(name="sentiment")).task.records == 0
    before = stub.Classify(pb.ClassifyRequest(task="sentiment", text="a great movie",
                                              options=pb.ClassifyOptions(return_neighbours=True)))
    assert list(before.neighbours) == [] and before.exit_layer == before.depth == 4
    assert before.policy == "auto=full (no auto choice yet)"  # no policy named: auto, which has no records yet
    reply = ingest(stub, "sentiment", ROWS + [("so so", "neutral"), ("", "positive"), ROWS[0]])
    assert (reply.added, reply.already_present, reply.rejected) == (len(ROWS), 1, 2)
    assert [(r.index, r.reason.split(" (")[0]) for r in reply.rejections] == [
        (10, "unknown label 'neutral'"), (11, "empty text")]
    after = stub.Classify(pb.ClassifyRequest(task="sentiment", text="a great movie",
                                             options=pb.ClassifyOptions(return_neighbours=True, k=5)))
    assert len(after.neighbours) == 5 and after.exit_layer == 0
    assert after.policy == "auto=knn-vote (no auto choice yet)"  # records now, but no tuned choice or heads
    assert after.neighbours[0].similarity >= after.neighbours[-1].similarity
    assert after.label in ("negative", "positive") and [s.label for s in after.scores] == ["negative", "positive"]
    assert abs(sum(s.score for s in after.scores) - 1) < 1e-5
    assert after.timings.total_us >= after.timings.forward_us > 0
    task = stub.GetTask(pb.GetTaskRequest(name="sentiment")).task
    assert task.records == len(ROWS) and task.depth == 4
    assert sum(task.earliest_exit_counts) + task.never_correct == len(ROWS)
    assert dict(task.label_records) == {"positive": 5, "negative": 5} and not task.imbalanced
    assert task.objective == "balanced_accuracy" and task.prior_correction and not task.adapt_prior
    assert [t.name for t in stub.ListTasks(pb.ListTasksRequest()).tasks] == ["sentiment"]


def test_a_task_made_over_grpc_keeps_its_shares_objective_and_prior_options(served: ServerThread) -> None:
    stub = served.stub
    made = stub.CreateTask(pb.CreateTaskRequest(
        name="declared", template="review : {text} . sentiment :", objective="macro_f1", prior_correction=False,
        adapt_prior=True, labels=[pb.Label(name="negative", word=" negative", share=0.25),
                                  pb.Label(name="positive", word=" positive", share=0.75)])).task
    assert [lb.share for lb in made.labels] == [0.25, 0.75]
    assert (made.objective, made.prior_correction, made.adapt_prior) == ("macro_f1", False, True)
    assert made.traffic_prior_answers == 0 and not made.traffic_prior
    bad = pb.CreateTaskRequest(name="bad", template="{text}", labels=[
        pb.Label(name="a", word=" a", share=0.5), pb.Label(name="b", word=" b")])
    code, details = code_of(lambda: stub.CreateTask(bad))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "every label a share, or none" in details


def test_a_task_that_adapts_exports_its_traffic_prior_until_deleted(served: ServerThread) -> None:
    stub = served.stub
    stub.CreateTask(pb.CreateTaskRequest(name="adapting", template=SENTIMENT.template, adapt_prior=True,
                                         labels=[pb.Label(name=lb.name, word=lb.word) for lb in SENTIMENT.labels]))
    ingest(stub, "adapting", ROWS)
    registry = served.server.metrics.registry

    def share(label: str) -> float | None:
        return registry.get_sample_value("raee_traffic_prior", {"task": "adapting", "label": label})

    texts = [f"{t} {i}" for i in range(12) for t, _ in ROWS]  # 120 answers: past the estimate's minimum
    stub.ClassifyBatch(pb.ClassifyBatchRequest(task="adapting", texts=texts[:60]))
    assert share("positive") is None  # 60 answers: not yet estimated, nothing exported
    stub.ClassifyBatch(pb.ClassifyBatchRequest(task="adapting", texts=texts[60:]))
    task = stub.GetTask(pb.GetTaskRequest(name="adapting")).task
    assert task.traffic_prior_answers == 120 and task.traffic_prior_updated_at
    exported = {label: share(label) for label in ("negative", "positive")}
    assert exported == pytest.approx(dict(task.traffic_prior)) and sum(exported.values()) == pytest.approx(1)
    updated = registry.get_sample_value("raee_traffic_prior_updated_timestamp_seconds", {"task": "adapting"})
    assert updated == pytest.approx(datetime.fromisoformat(task.traffic_prior_updated_at).timestamp(), abs=1)
    assert registry.get_sample_value("raee_traffic_prior", {"task": "sentiment", "label": "positive"}) is None
    stub.DeleteTask(pb.DeleteTaskRequest(name="adapting"))
    assert share("positive") is None and share("negative") is None


def test_batch_and_stream_answer_in_order(served: ServerThread) -> None:
    stub = served.stub
    ingest(stub, "sentiment", ROWS)
    texts = [t for t, _ in ROWS]
    batch = stub.ClassifyBatch(pb.ClassifyBatchRequest(task="sentiment", texts=texts,
                                                       options=pb.ClassifyOptions(policy="static:2")))
    assert [r.exit_layer for r in batch.results] == [2] * len(texts)
    singles = [stub.Classify(pb.ClassifyRequest(task="sentiment", text=t)) for t in texts]
    stream = [a.result for a in stub.ClassifyStream(iter([pb.ClassifyStreamRequest(task="sentiment", text=t)
                                                          for t in texts]))]
    assert [(r.label, r.exit_layer) for r in stream] == [(r.label, r.exit_layer) for r in singles]
    for a, b in zip(stream, singles):
        assert [s.score for s in a.scores] == pytest.approx([s.score for s in b.scores], abs=1e-5)


def test_status_codes_name_the_field(served: ServerThread) -> None:
    stub = served.stub
    cases = {
        "unknown task": (lambda: stub.Classify(pb.ClassifyRequest(task="nope", text="hi")),
                         grpc.StatusCode.NOT_FOUND, "task 'nope'"),
        "empty text": (lambda: stub.Classify(pb.ClassifyRequest(task="sentiment", text="  ")),
                       grpc.StatusCode.INVALID_ARGUMENT, "text: empty"),
        "text too long": (lambda: stub.Classify(pb.ClassifyRequest(task="sentiment", text="x" * 201)),
                          grpc.StatusCode.INVALID_ARGUMENT, "text: 201 characters"),
        "k too large": (lambda: stub.Classify(pb.ClassifyRequest(task="sentiment", text="hi",
                                                                 options=pb.ClassifyOptions(k=33))),
                        grpc.StatusCode.INVALID_ARGUMENT, "k: 33 out of range"),
        "unknown policy": (lambda: stub.Classify(pb.ClassifyRequest(task="sentiment", text="hi",
                                                                    options=pb.ClassifyOptions(policy="fast"))),
                           grpc.StatusCode.INVALID_ARGUMENT, "policy: unknown exit policy"),
        "empty batch": (lambda: stub.ClassifyBatch(pb.ClassifyBatchRequest(task="sentiment")),
                        grpc.StatusCode.INVALID_ARGUMENT, "texts: no text"),
        "ingest without task": (lambda: ingest(stub, "", ROWS[:2]), grpc.StatusCode.INVALID_ARGUMENT, "task:"),
        "ingest unknown task": (lambda: ingest(stub, "nope", ROWS[:2]), grpc.StatusCode.NOT_FOUND, "task 'nope'"),
        "get unknown task": (lambda: stub.GetTask(pb.GetTaskRequest(name="nope")), grpc.StatusCode.NOT_FOUND, "nope"),
    }
    for name, (call, code, message) in cases.items():
        got_code, details = code_of(call)
        assert (got_code, message in details) == (code, True), f"{name}: {got_code} {details}"
    # A bad request inside a batch of concurrent good ones fails alone.
    futures = [stub.Classify.future(pb.ClassifyRequest(task="sentiment", text=t)) for t in ("good", "", "bad")]
    assert futures[0].result().label and futures[2].result().label
    assert futures[1].exception().code() == grpc.StatusCode.INVALID_ARGUMENT


def test_concurrent_requests_are_batched(served: ServerThread) -> None:
    stub = served.stub
    futures = [stub.Classify.future(pb.ClassifyRequest(task="sentiment", text=f"good movie {i}")) for i in range(12)]
    assert all(f.result().label for f in futures)
    body = urllib.request.urlopen(f"http://127.0.0.1:{served.server.metrics_port}/metrics").read().decode()
    sizes = served.server.metrics.batch_size.collect()[0].samples
    count = next(s.value for s in sizes if s.name.endswith("_count"))
    total = next(s.value for s in sizes if s.name.endswith("_sum"))
    assert total == 12 and count < 12  # fewer batches than requests
    assert 'raee_requests_total{code="OK",method="Classify",task="sentiment"} 12.0' in body
    assert "raee_exit_layer_bucket" in body and "raee_queue_depth" in body
    # One bucket per exit of the loaded backbone (depth 4): le="0.0" .. le="4.0", then +Inf, nothing past.
    buckets = re.findall(r'raee_exit_layer_bucket\{le="([^"]+)",task="sentiment"\}', body)
    assert buckets == ["0.0", "1.0", "2.0", "3.0", "4.0", "+Inf"], buckets
    assert "raee_request_duration_seconds_bucket" in body and "raee_build_info{version=" in body


def own_address() -> str:
    """This machine's address on its default route (a UDP connect sends nothing), else loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            return str(probe.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def test_metrics_bind_the_address_the_settings_name_and_carry_process_metrics(tmp_path: Path) -> None:
    served = ServerThread(make_settings(tmp_path, metrics_port=0, metrics_address="0.0.0.0"),
                          tiny_engine_factory(tmp_path, make_settings(tmp_path)))
    try:
        served.wait_ready()
        bound = served.server.metrics_port
        assert bound  # on every interface: this machine's own non-loopback name reaches it too
        host = own_address()
        body = urllib.request.urlopen(f"http://{host}:{bound}/metrics", timeout=10).read().decode()
        assert "process_resident_memory_bytes" in body and "process_cpu_seconds_total" in body
    finally:
        served.stop()


def test_health_is_not_serving_until_loaded_and_calls_are_unavailable(tmp_path: Path) -> None:
    gate = threading.Event()
    settings = make_settings(tmp_path)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings, gate))
    health = health_pb2_grpc.HealthStub(server.channel)
    try:
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        code, details = code_of(lambda: server.stub.Classify(pb.ClassifyRequest(task="sentiment", text="hi")))
        assert code == grpc.StatusCode.UNAVAILABLE and "loading" in details
        gate.set()
        server.wait_ready()
        assert health.Check(health_pb2.HealthCheckRequest(service="raee.v1.RaeeService")).status == \
            health_pb2.HealthCheckResponse.SERVING
    finally:
        gate.set()
        server.stop()


def test_deadline_passed_in_the_queue_is_dropped_not_computed(served: ServerThread) -> None:
    stub = served.stub
    ingest(stub, "sentiment", ROWS)
    engine = served.server.worker.engine
    busy = threading.Event()
    # Occupy the worker, so the next request waits in the queue past its deadline.
    blocker = served.submit(served.server.worker.call(lambda e: (busy.set(), time.sleep(1.0))))
    busy.wait(5)
    calls: list[int] = []
    engine.backbone.layers[0].register_forward_hook(lambda *_: calls.append(1))
    # `full` needs the backbone (an answer from retrieval or the key would not wait for it)
    request = pb.ClassifyRequest(task="sentiment", text="hi", options=pb.ClassifyOptions(policy="full"))
    code, details = code_of(lambda: stub.Classify(request, timeout=0.3))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    blocker.result(5)
    time.sleep(0.2)  # the worker has now seen the expired job
    assert calls == []  # nothing was computed for it


def test_a_full_queue_answers_resource_exhausted(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, queue_size=2, max_batch_size=1)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    server.wait_ready()
    try:
        busy = threading.Event()
        blocker = server.submit(server.server.worker.call(lambda e: (busy.set(), time.sleep(1.0))))
        busy.wait(5)
        futures = [server.stub.Classify.future(pb.ClassifyRequest(task="sentiment", text=f"x {i}")) for i in range(6)]
        codes = [f.exception().code() if f.exception() else grpc.StatusCode.OK for f in futures]
        blocker.result(5)
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 4, codes
        assert codes.count(grpc.StatusCode.OK) == 2
        from google.rpc import error_details_pb2
        from grpc_status import rpc_status

        for f in futures:
            if f.exception() is None:
                continue
            status = rpc_status.from_call(f.exception())  # what any gRPC client reads
            assert status is not None and status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            retry, info = error_details_pb2.RetryInfo(), error_details_pb2.ErrorInfo()
            assert any(d.Unpack(retry) for d in status.details if d.Is(retry.DESCRIPTOR))
            assert any(d.Unpack(info) for d in status.details if d.Is(info.DESCRIPTOR))
            assert retry.retry_delay.ToNanoseconds() > 0 and info.reason == "OVERLOADED"
    finally:
        server.stop()


def test_a_bad_field_comes_back_as_a_bad_request_naming_it(served: ServerThread) -> None:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    from raee_server.client import RaeeClient, error_details

    ingest(served.stub, "sentiment", ROWS)
    with pytest.raises(grpc.RpcError) as info:
        served.stub.Classify(pb.ClassifyRequest(task="sentiment", text="fine", options=pb.ClassifyOptions(k=10_000)))
    status = rpc_status.from_call(info.value)
    bad = error_details_pb2.BadRequest()
    assert status is not None and any(d.Unpack(bad) for d in status.details if d.Is(bad.DESCRIPTOR))
    assert [v.field for v in bad.field_violations] == ["options.k"]
    assert "out of range" in bad.field_violations[0].description
    assert error_details(info.value).retry_after is None  # retrying the same request cannot help
    for options, path in ((pb.ClassifyOptions(policy="static:²"), "options.policy"),
                          (pb.ClassifyOptions(), "text")):
        text = "" if path == "text" else "fine"
        with pytest.raises(grpc.RpcError) as info:
            served.stub.Classify(pb.ClassifyRequest(task="sentiment", text=text, options=options))
        assert list(error_details(info.value).fields) == [path]
    client = RaeeClient(f"127.0.0.1:{served.port}", timeout=10)
    try:
        with pytest.raises(InvalidInput) as typed:
            client.classify("sentiment", ["fine"], k=10_000)
        assert typed.value.field == "options.k" and typed.value.reason == "INVALID_INPUT"
        assert typed.value.retry_after is None
    finally:
        client.close()


def test_the_client_backs_off_and_retries_while_the_queue_is_full(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from raee_server.client import RaeeClient

    settings = make_settings(tmp_path, queue_size=2, max_batch_size=1)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    server.wait_ready()
    client = RaeeClient(f"127.0.0.1:{server.port}", timeout=30)

    def rejected() -> float:
        return server.server.metrics.registry.get_sample_value(
            "raee_requests_total", {"method": "ClassifyBatch", "task": "sentiment", "code": "RESOURCE_EXHAUSTED"}) or 0

    def hold_the_worker(_engine: Engine) -> None:  # until the burst has overflowed the queue
        deadline = time.monotonic() + 10
        while rejected() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)

    try:
        blocker = server.submit(server.server.worker.call(hold_the_worker))
        with ThreadPoolExecutor(6) as pool:
            labels = list(pool.map(lambda i: client.classify("sentiment", [f"x {i}"])[0].label, range(6)))
        blocker.result(5)
        assert rejected() >= 1  # the server did shed load ...
        assert len(labels) == 6 and set(labels) <= {"negative", "positive"}  # ... and every call got through
    finally:
        client.close()
        server.stop()


def test_graceful_stop_finishes_requests_in_flight(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_batch_size=2)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    server.wait_ready()
    health = health_pb2_grpc.HealthStub(server.channel)
    busy = threading.Event()
    server.submit(server.server.worker.call(lambda e: (busy.set(), time.sleep(0.5))))
    busy.wait(5)
    futures = [server.stub.Classify.future(pb.ClassifyRequest(task="sentiment", text=f"film {i}")) for i in range(8)]
    time.sleep(0.1)  # all eight are queued behind the busy worker
    stopping = server.submit(server.server.stop(5.0))
    time.sleep(0.05)
    assert all(f.result(10).label for f in futures)  # none lost
    stopping.result(10)
    with pytest.raises(grpc.RpcError):
        health.Check(health_pb2.HealthCheckRequest(), timeout=1)
    server.loop.call_soon_threadsafe(server.loop.stop)


def test_reflection_lists_the_services_and_admin_rpcs_work(served: ServerThread) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"raee.v1.RaeeService", "grpc.health.v1.Health"} <= names

    labels = [pb.Label(name="a", word=" good"), pb.Label(name="b", word=" bad")]
    created = served.stub.CreateTask(pb.CreateTaskRequest(name="other", template="{text} :", labels=labels)).task
    assert created.name == "other" and created.depth == 4 and created.records == 0
    code, details = code_of(lambda: served.stub.CreateTask(
        pb.CreateTaskRequest(name="other", template="{text}", labels=labels)))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, details = code_of(lambda: served.stub.CreateTask(
        pb.CreateTaskRequest(name="bad", template="no slot", labels=labels)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "{text}" in details
    ingest(served.stub, "other", [("good film", "a"), ("bad film", "b")])
    served.stub.DeleteTask(pb.DeleteTaskRequest(name="other"))
    assert served.server.worker.engine.vectors.count("other") == 0
    assert code_of(lambda: served.stub.GetTask(pb.GetTaskRequest(name="other")))[0] == grpc.StatusCode.NOT_FOUND


def test_messages_over_the_size_limit_are_refused(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, max_message_bytes=64 * 1024, max_text_chars=1_000_000)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    server.wait_ready()
    try:
        code, _ = code_of(lambda: server.stub.Classify(pb.ClassifyRequest(task="sentiment", text="x" * 100_000)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert server.stub.Classify(pb.ClassifyRequest(task="sentiment", text="fine")).label
    finally:
        server.stop()


def test_an_oversized_text_is_truncated_only_when_asked(served: ServerThread) -> None:
    long_text = "good " * 100  # 500 characters, the limit is 200
    code, details = code_of(lambda: served.stub.Classify(pb.ClassifyRequest(task="sentiment", text=long_text)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "over the limit of 200" in details
    cut = served.stub.Classify(pb.ClassifyRequest(task="sentiment", text=long_text,
                                                  options=pb.ClassifyOptions(truncate=True)))
    same = served.stub.Classify(pb.ClassifyRequest(task="sentiment", text=long_text[:200]))
    assert [s.score for s in cut.scores] == pytest.approx([s.score for s in same.scores], abs=1e-6)


def test_an_unexpected_engine_error_fails_its_request_alone_and_the_worker_goes_on(tmp_path: Path) -> None:
    """A bug deliberately planted in the engine (a plain exception, not one of the service's own)."""
    settings = make_settings(tmp_path, health_interval_seconds=0.2)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    server.wait_ready()
    try:
        engine = server.server.worker.engine
        real_prepare, real_complete = engine.prepare, engine.complete

        def planted(task, texts, policy, k, served=None):  # type: ignore[no-untyped-def]
            if any("boom" in t for t in texts):
                raise ValueError("planted bug")
            return real_prepare(task, texts, policy, k, served)

        def planted_in_backbone(prepared):  # type: ignore[no-untyped-def]
            if any("bang" in t for t in prepared.texts):
                raise ValueError("planted bug")
            return real_complete(prepared)

        engine.prepare = planted  # the key stage's thread
        engine.complete = planted_in_backbone  # the model thread's
        for text in ("boom", "bang"):
            with pytest.raises(grpc.RpcError) as info:
                server.stub.Classify(pb.ClassifyRequest(task="sentiment", text=text,
                                                        options=pb.ClassifyOptions(policy="full")), timeout=30)
            assert info.value.code() == grpc.StatusCode.INTERNAL and "planted" not in (info.value.details() or "")
        engine.validate = lambda *a: (_ for _ in ()).throw(KeyError("planted in validate"))  # type: ignore[method-assign]
        with pytest.raises(grpc.RpcError) as info:
            server.stub.Classify(pb.ClassifyRequest(task="sentiment", text="fine"), timeout=30)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        del engine.validate
        assert server.stub.Classify(pb.ClassifyRequest(task="sentiment", text="a fine film"), timeout=30).label
        assert server.server.worker.alive
    finally:
        server.stop()


def test_health_turns_not_serving_when_the_worker_loop_stops(tmp_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    settings = make_settings(tmp_path, health_interval_seconds=0.2)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    server.wait_ready()
    try:
        health = health_pb2_grpc.HealthStub(server.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        server.loop.call_soon_threadsafe(server.server.worker._runner.cancel)  # the loop is gone
        deadline = time.monotonic() + 60
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health still SERVING with no worker loop"
            time.sleep(0.1)
        with pytest.raises(grpc.RpcError) as info:
            server.stub.Classify(pb.ClassifyRequest(task="sentiment", text="hi"), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=5).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING  # no worker loop: restart the process
    finally:
        server.stop()


class EndedCall:
    """A servicer context whose call has already ended (deadline passed, or the client went away)
    while its cancellation has not reached the handler: the race a busy machine opens, where the
    request stream just ends as a finished one does."""

    def __init__(self, remaining: float | None, cancelled: bool) -> None:
        self.remaining, self._cancelled = remaining, cancelled

    def time_remaining(self) -> float | None:
        return self.remaining

    def cancelled(self) -> bool:
        return self._cancelled


@pytest.mark.parametrize(("remaining", "cancelled", "status"), [
    (None, False, "done"), (5.0, False, "done"), (-0.1, False, "cancelled"), (None, True, "cancelled")])
def test_an_ingest_stream_that_ended_with_its_call_is_recorded_cancelled(
        served: ServerThread, remaining: float | None, cancelled: bool, status: str) -> None:
    import asyncio
    import concurrent.futures

    async def messages():  # type: ignore[no-untyped-def]
        yield pb.IngestRequest(task="sentiment", examples=[pb.Example(text=t, label=l) for t, l in ROWS[:4]])

    call = served.server.servicer.Ingest(messages(), EndedCall(remaining, cancelled))  # type: ignore[arg-type]
    if status == "done":
        assert served.run(call).added == 4
    else:
        with pytest.raises((asyncio.CancelledError, concurrent.futures.CancelledError)):
            served.run(call)
    store = MetadataStore(served.server.settings.sql_url)
    try:
        [batch] = store.list_batches("sentiment")
    finally:
        store.close()
    assert (batch.status, batch.added) == (status, 4)  # what was written stays, and the row says how it ended


def test_a_task_created_through_the_client_is_the_task_created_locally(served: ServerThread) -> None:
    """Every TaskSpec field crosses the wire (shares, objective, both prior switches), and the
    client's errors are the service's own types."""
    from raee_server.client import RaeeClient
    from raee_server.errors import TaskExists
    from raee_server.types import Label, TaskSpec

    spec = TaskSpec("pairs-of-news", "News: {text}\nTopic:",
                    (Label("world", " world", 0.7), Label("sports", " sports", 0.3)), "shares declared",
                    objective="macro_f1", prior_correction=False, adapt_prior=True)
    client = RaeeClient(f"127.0.0.1:{served.port}", timeout=10)
    try:
        client.create_task(spec)
        assert served.server.worker.engine.metadata.task(spec.name).spec == spec
        with pytest.raises(TaskExists):
            client.create_task(spec)
    finally:
        client.close()
