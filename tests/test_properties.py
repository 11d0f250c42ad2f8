"""Property tests: random input never gets an undocumented answer, and tenants never see each other."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raee_server.datafile import Row
from raee_server.engine import Engine
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.records import record_id
from raee_server.tasks import TaskSpec

from .conftest import SENTIMENT
from .grpc_harness import ServerThread
from .test_grpc import make_settings, tiny_engine_factory
from .tiny_models import WORDS

DOCUMENTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    tmp = tmp_path_factory.mktemp("props")
    s = make_settings(tmp, max_text_chars=300)
    srv = ServerThread(s, tiny_engine_factory(tmp, s))
    srv.wait_ready()
    yield srv
    srv.stop()


texts = st.one_of(st.text(max_size=40), st.text(min_size=290, max_size=320),
                  st.lists(st.sampled_from(WORDS), max_size=8).map(" ".join))
policies = st.one_of(st.just(""), st.sampled_from(["paper", "full", "static:2", "static:9", "knn-vote", "auto",
                                                   "confidence:0.7", "knn-agree", "nope", "static:x"]), st.text(max_size=8))


@PROPERTY
@given(task=st.sampled_from(["sentiment", "missing", ""]), text=texts, k=st.integers(0, 80), policy=policies)
def test_classify_answers_validly_or_with_a_documented_code(server: ServerThread, task: str, text: str, k: int,
                                                            policy: str) -> None:
    request = pb.ClassifyRequest(task=task, text=text, options=pb.ClassifyOptions(k=k, policy=policy))
    try:
        reply = server.stub.Classify(request, timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() in DOCUMENTED, (exc.code(), exc.details())
        assert exc.details() and "Traceback" not in exc.details()
        return
    assert reply.label in SENTIMENT.label_names and 0 <= reply.exit_layer <= reply.depth == 4
    assert abs(sum(s.score for s in reply.scores) - 1) < 1e-4


@PROPERTY
@given(examples=st.lists(st.tuples(texts, st.sampled_from(["negative", "positive", "Positive", " neutral", ""])),
                         max_size=12))
def test_ingest_accounts_for_every_example(server: ServerThread, examples: list[tuple[str, str]]) -> None:
    request = pb.IngestRequest(task="sentiment", examples=[pb.Example(text=t, label=l) for t, l in examples])
    reply = server.stub.Ingest(iter([request]), timeout=60)
    assert reply.added + reply.already_present + reply.rejected == len(examples)
    assert sorted(r.index for r in reply.rejections) == [r.index for r in reply.rejections]
    for r in reply.rejections:
        text, label = examples[r.index]
        assert r.reason and (not text.strip() or label.strip() not in SENTIMENT.label_names or len(text) > 300
                             or "\x00" in text)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.lists(st.tuples(st.sampled_from(["t0", "t1", "t2"]), st.lists(st.sampled_from(WORDS), min_size=1,
                                                                               max_size=5).map(" ".join),
                               st.sampled_from(["negative", "positive"])), min_size=3, max_size=30),
       queries=st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=5).map(" ".join), min_size=1,
                        max_size=4))
def test_a_task_never_reads_or_is_influenced_by_another(engine_factory_dir: Path, data: list[tuple[str, str, str]],
                                                        queries: list[str]) -> None:
    where = engine_factory_dir / uuid.uuid4().hex
    engine: Engine = tiny_engine_factory(where, make_settings(where))()
    try:
        for name in ("t0", "t1", "t2"):
            engine.create_task(TaskSpec(name, SENTIMENT.template, SENTIMENT.labels))
        t0_rows = [Row(i, text, label) for i, (task, text, label) in enumerate(data) if task == "t0"]
        engine.ingest("t0", t0_rows)
        alone = engine.classify("t0", queries, k=32, policy="paper")
        # The same texts and labels in the other tenants must change nothing for t0.
        for name in ("t1", "t2"):
            engine.ingest(name, [Row(i, text, label) for i, (_, text, label) in enumerate(data)])
        shared = engine.classify("t0", queries, k=32, policy="paper")
        own = {record_id("t0", r.text) for r in t0_rows}
        for a, b in zip(alone, shared):
            assert (a.label, a.exit_layer, [n.id for n in a.neighbours]) == (b.label, b.exit_layer,
                                                                             [n.id for n in b.neighbours])
            assert {n.id for n in b.neighbours} <= own
    finally:
        engine.close()


@pytest.fixture(scope="module")
def engine_factory_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tenants")
