"""Deleting and relabelling records: vectors, SQL rows and features go together, in ingest's order
(reversed for a delete), over the engine, gRPC, HTTP and the CLI; a kill in between is finished by
the doctor; a tenant's key reaches its own task only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from sqlalchemy import text

from raee_server.cli.main import cli
from raee_server.core import auto, doctor
from raee_server.core.datafile import read_rows
from raee_server.core.engine import Engine
from raee_server.errors import InvalidInput
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.stores.records import record_id

from .conftest import SENTIMENT, write_tsv
from .grpc_harness import ServerThread
from .http_stub import HttpStub
from .test_cli import SPEC
from .test_concurrent_writers import corpus
from .test_engine import ROWS
from .test_grpc import code_of
from .test_security import keyed  # noqa: F401 (a fixture)
from .tiny_models import save_tiny_backbone

TASK = SENTIMENT.name


def stores(engine: Engine) -> tuple[set[str], set[str], int, int]:
    """(committed ids in SQL, ids in the vector store, layer-result rows, feature rows)."""
    with engine.metadata.engine.connect() as conn:
        committed = {r[0] for r in conn.execute(text("select id from exit_records where status = 'committed'"))}
        layers = conn.execute(text("select count(*) from layer_results")).scalar()
        features = conn.execute(text("select count(*) from exit_features")).scalar()
    return committed, engine.vectors.ids(TASK), int(layers or 0), int(features or 0)


def test_deleted_records_leave_every_store_and_are_never_neighbours_again(engine: Engine, tmp_path: Path) -> None:
    engine.create_task(SENTIMENT)
    engine.ingest(TASK, read_rows(write_tsv(tmp_path / "a.tsv", ROWS)))
    second = engine.ingest_session(TASK, source="second file")
    with second:
        second.add(read_rows(write_tsv(tmp_path / "b.tsv", [("a fresh batch of rows", "positive"),
                                                             ("and one more of them", "negative")])))
    before, _, layers, _ = stores(engine)
    text0, text1 = ROWS[0][0], ROWS[1][0]
    gone = engine.delete_records(TASK, ids=[record_id(TASK, text0), record_id(TASK, "never ingested")], texts=[text1])
    assert sorted(gone) == sorted([record_id(TASK, text0), record_id(TASK, text1)])
    gone += engine.delete_records(TASK, batch=second.batch_id)
    assert len(gone) == 4
    committed, vectors, layers_after, features = stores(engine)
    assert committed == vectors == before - set(gone) and features == len(committed)
    assert layers_after == layers * len(committed) // len(before)
    found, _ = engine.neighbours(TASK, [text0, text1], k=len(before))
    assert not {n.id for row in found for n in row} & set(gone)
    assert engine.task_info(TASK).records == len(before) - 4 and engine.task_info(TASK).edits == 4
    assert engine.delete_records(TASK, texts=[text0]) == []  # idempotent
    with pytest.raises(InvalidInput, match="name the records"):
        engine.delete_records(TASK)
    assert doctor.diagnose(engine, TASK).healthy


def test_names_no_record_or_task_can_have_are_refused_before_the_database(engine: Engine, tmp_path: Path) -> None:
    """Postgres refuses a NUL in a text parameter: such names must fail as bad input or an unknown task."""
    from raee_server.errors import TaskNotFound

    engine.create_task(SENTIMENT)
    engine.ingest(TASK, read_rows(write_tsv(tmp_path / "a.tsv", ROWS)))
    for bad in ("x\x00y", "not-a-uuid", record_id(TASK, "t").upper()):
        with pytest.raises(InvalidInput, match=r"ids\[0\].*not a record id"):
            engine.delete_records(TASK, ids=[bad])
        with pytest.raises(InvalidInput, match=r"records\[0\].*not a record id"):
            engine.relabel(TASK, {bad: "positive"})
    with pytest.raises(InvalidInput, match="NUL"):
        engine.delete_records(TASK, texts=["a\x00b"])
    for task in ("sen\x00timent", "\x00", "s" * 65):
        with pytest.raises(TaskNotFound):
            engine.delete_records(task, ids=[record_id(TASK, ROWS[0][0])])
        with pytest.raises(TaskNotFound):
            engine.task_info(task)
    assert engine.task_info(TASK).records == len(ROWS)


def test_a_relabel_recomputes_the_record_and_counts_toward_the_heads_refit(engine: Engine, tmp_path: Path) -> None:
    engine.settings = engine.settings.model_copy(update={"heads_refit_rows": 3})
    engine.create_task(SENTIMENT)
    engine.ingest(TASK, read_rows(write_tsv(tmp_path / "a.tsv", corpus(60))))
    auto.fit_task_heads(engine, TASK)
    assert not auto.needs_heads(engine, TASK)
    victim, old = corpus(60)[0]
    new = "negative" if old == "positive" else "positive"
    rid = record_id(TASK, victim)
    nope = record_id(TASK, "never ingested")
    done, missing = engine.relabel(TASK, {rid: new, nope: new})
    assert (done, missing) == (1, [nope])
    [(payload_label, exits)] = [(n.label, n.exits) for n in engine.neighbours(TASK, [victim], 1)[0][0]]
    assert payload_label == new
    with engine.metadata.engine.connect() as conn:
        rows = conn.execute(text("select r.label, l.predicted, l.correct from exit_records r join layer_results l "
                                 "on l.record_id = r.id where r.id = :id"), {"id": rid}).all()
    assert {r[0] for r in rows} == {new} and all(bool(r[2]) == (r[1] == new) for r in rows)
    assert {layer for layer, _ in exits} == {i for i, r in enumerate(rows) if r[2]}
    with pytest.raises(InvalidInput, match="unknown label"):
        engine.relabel(TASK, {rid: "neutral"})
    engine.delete_records(TASK, ids=[record_id(TASK, t) for t, _ in corpus(60)[1:3]])
    assert auto.needs_heads(engine, TASK)  # one relabel and two deletes since the fit: 3 edits
    heads = auto.fit_task_heads(engine, TASK)
    assert rid in heads.record_ids and len(heads.record_ids) == 58
    assert heads.gold is not None and heads.labels[heads.gold[heads.record_ids.index(rid)]] == new


def test_a_delete_stopped_half_way_is_finished_by_the_doctor(engine: Engine, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    engine.create_task(SENTIMENT)
    engine.ingest(TASK, read_rows(write_tsv(tmp_path / "a.tsv", ROWS)))
    before, _, _, _ = stores(engine)

    def crash(ids):  # type: ignore[no-untyped-def]
        raise RuntimeError("killed after marking the rows, before the vectors went")

    monkeypatch.setattr(engine.vectors, "delete_ids", crash)
    with pytest.raises(RuntimeError):
        engine.delete_records(TASK, texts=[ROWS[0][0], ROWS[1][0]])
    monkeypatch.undo()
    sick = doctor.diagnose(engine, TASK)
    assert len(sick.deleting) == 2 and not sick.pending and not sick.healthy
    assert engine.task_info(TASK).records == len(before) - 2  # already gone for SQL readers
    healed = doctor.repair(engine, sick)
    assert healed.healthy and healed.committed == healed.vectors == len(before) - 2


@pytest.mark.parametrize("where", ["after-mark", "after-vectors", "relabel-after-mark"])
def test_sigkill_in_the_middle_of_a_delete_or_relabel_then_doctor(tmp_path: Path, where: str) -> None:
    """A real SIGKILL at each step boundary (the process kills itself on entering the next step); the
    CLI's doctor finishes the work."""
    model = save_tiny_backbone(tmp_path / "model")
    base = ["--data-dir", str(tmp_path / "data"), "--backbone", str(model), "--encoder", "hashing:32"]
    runner = CliRunner()
    (tmp_path / "s.toml").write_text(SPEC)
    assert runner.invoke(cli, [*base, "task", "create", "--file", str(tmp_path / "s.toml")]).exit_code == 0
    assert runner.invoke(cli, [*base, "ingest", "--task", "sentiment",
                               str(write_tsv(tmp_path / "a.tsv", ROWS))]).exit_code == 0
    step = {"after-mark": "raee_server.stores.vectors.EdgeVectorStore.delete_ids",
            "after-vectors": "raee_server.stores.metadata.MetadataStore.delete_records",
            "relabel-after-mark": "raee_server.core.engine.Engine.ingest"}[where]
    module, cls, method = step.rsplit(".", 2)
    script = f"""
import importlib, os, signal
target = getattr(importlib.import_module({module!r}), {cls!r})
def dying(self, *a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
setattr(target, {method!r}, dying)
from raee_server.cli.main import main
main()
"""
    command = (["records", "relabel", "--task", "sentiment", "--text", ROWS[0][0], "--label",
                "negative" if ROWS[0][1] == "positive" else "positive"] if where.startswith("relabel")
               else ["records", "delete", "--yes", "--task", "sentiment", "--text", ROWS[0][0], "--text", ROWS[1][0]])
    proc = subprocess.run([sys.executable, "-c", script, *base, *command], env=dict(os.environ), capture_output=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    check = runner.invoke(cli, [*base, "doctor"])
    expected = "1 pending, 0 deleting" if where.startswith("relabel") else "0 pending, 2 deleting"
    assert expected in check.output and "INCONSISTENT" in check.output
    repaired = runner.invoke(cli, [*base, "doctor", "--repair"])
    assert repaired.exit_code == 0, repaired.output
    remaining = len(ROWS) - (0 if where.startswith("relabel") else 2)
    assert f"sentiment: consistent: {remaining} committed rows, {remaining} vectors, 0 pending, 0 deleting" \
        in repaired.output
    if where.startswith("relabel"):  # the repair recomputed the record with its new label
        shown = runner.invoke(cli, [*base, "--json", "classify", "--task", "sentiment", "--neighbours", ROWS[0][0]])
        assert shown.exit_code == 0 and ROWS[0][1] not in shown.output.split('"neighbours"')[1].split("]")[0]


@pytest.fixture
def keyed_rows(request: pytest.FixtureRequest) -> tuple[ServerThread, dict[str, str]]:
    """test_security's server with admin, sentiment and other keys, and ROWS ingested."""
    server, keys = request.getfixturevalue("keyed")
    server.stub.Ingest(iter([pb.IngestRequest(task="sentiment", examples=[pb.Example(text=t, label=lb)
                                                                         for t, lb in ROWS])]),
                       metadata=[("x-api-key", keys["admin"])])
    return server, keys


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_delete_and_relabel_over_the_wire_with_tenant_keys(keyed_rows, transport: str) -> None:  # type: ignore[no-untyped-def]
    server, keys = keyed_rows
    stub = server.stub if transport == "grpc" else HttpStub(server.server.http_port)
    mine, theirs = [("x-api-key", keys["sentiment"])], [("x-api-key", keys["other"])]
    delete = pb.DeleteRecordsRequest(task="sentiment", texts=[ROWS[0][0]])
    code, details = code_of(lambda: stub.DeleteRecords(delete, metadata=theirs))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "does not grant task 'sentiment'" in details
    relabel = pb.RelabelRecordsRequest(task="sentiment", records=[
        pb.Relabel(text=ROWS[1][0], label="negative" if ROWS[1][1] == "positive" else "positive"),
        pb.Relabel(id=record_id("sentiment", "never ingested"), label="positive")])
    assert code_of(lambda: stub.RelabelRecords(relabel, metadata=theirs))[0] == grpc.StatusCode.PERMISSION_DENIED
    reply = stub.DeleteRecords(delete, metadata=mine)
    assert list(reply.deleted_ids) == [record_id("sentiment", ROWS[0][0])]
    answer = stub.Classify(pb.ClassifyRequest(task="sentiment", text=ROWS[0][0], options=pb.ClassifyOptions(
        policy="knn-vote", k=len(ROWS), return_neighbours=True)), metadata=mine)
    assert record_id("sentiment", ROWS[0][0]) not in {n.id for n in answer.neighbours}
    assert len(answer.neighbours) == len(ROWS) - 1
    relabelled = stub.RelabelRecords(relabel, metadata=mine)
    assert relabelled.relabelled == 1 and [(r.index, record_id("sentiment", "never ingested") in r.reason)
                                           for r in relabelled.rejections] == [(1, True)]
    bad = pb.RelabelRecordsRequest(task="sentiment", records=[pb.Relabel(text=ROWS[1][0], label="neutral")])
    code, details = code_of(lambda: stub.RelabelRecords(bad, metadata=mine))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown label" in details
    empty = pb.DeleteRecordsRequest(task="sentiment")
    assert code_of(lambda: stub.DeleteRecords(empty, metadata=mine))[0] == grpc.StatusCode.INVALID_ARGUMENT
    task = stub.GetTask(pb.GetTaskRequest(name="sentiment"), metadata=mine).task
    assert task.records == len(ROWS) - 1


def test_the_cli_deletes_and_relabels_through_a_server(keyed_rows, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, keys = keyed_rows
    base = ["--server", f"127.0.0.1:{server.port}", "--api-key", keys["sentiment"], "--json"]
    runner = CliRunner()
    gone = runner.invoke(cli, [*base, "records", "delete", "--yes", "--task", "sentiment", "--text", ROWS[2][0]])
    assert gone.exit_code == 0, gone.output
    assert record_id("sentiment", ROWS[2][0]) in gone.output
    flipped = "negative" if ROWS[3][1] == "positive" else "positive"
    relabel = write_tsv(tmp_path / "relabel.tsv", [(ROWS[3][0], flipped), ("never ingested", "positive")])
    out = runner.invoke(cli, [*base, "records", "relabel", "--task", "sentiment", "--file", str(relabel)])
    assert out.exit_code == 1 and '"relabelled": 1' in out.output and "never ingested" in out.output
    other = runner.invoke(cli, ["--server", f"127.0.0.1:{server.port}", "--api-key", keys["other"], "records",
                                "delete", "--yes", "--task", "sentiment", "--text", ROWS[4][0]])
    assert other.exit_code == 3 and "does not grant task 'sentiment'" in other.output
    usage = runner.invoke(cli, [*base, "records", "delete", "--yes", "--task", "sentiment"])
    assert usage.exit_code == 2 and "--id, --text or --batch" in usage.output
