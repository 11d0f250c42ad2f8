"""Tasks with named inputs (sentence pairs): the spec, files, the engine, and every transport.

The tiny random-weight model answers nothing meaningful; these tests check where the inputs go, what
identifies a record, and that every bad input is refused naming the input and nothing is stored.
tests/test_real_model.py runs a pair task on the real model.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raee_server.bench.pairs import PAIR_TASKS, build, pairs_of
from raee_server.core.datafile import read_rows
from raee_server.core.engine import Engine
from raee_server.errors import InvalidInput
from raee_server.protos.inference import grpc_predict_v2_pb2 as v2
from raee_server.protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.stores.records import record_id
from raee_server.types import Label, Rejected, Row, TaskSpec, pack_inputs

from .conftest import SENTIMENT, admin_cli, write_tsv
from .grpc_harness import ServerThread
from .test_engine import ROWS
from .test_gateway import call
from .test_grpc import make_settings, tiny_engine_factory
from .tiny_models import tiny_causal_lm, tiny_tokenizer
from .unicode_strategies import weird_strings

PAIR = TaskSpec("pair", "first {first} second {second} ? the answer is",
                (Label("different", " negative"), Label("same", " positive")), inputs=("first", "second"))
PAIR_ROWS = [({"first": a, "second": b}, "same" if la == lb else "different")
             for (a, la), (b, lb) in zip(ROWS, ROWS[3:] + ROWS[:3])]


# -- the spec -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "says"), [
    (dict(template="first {first} ? the answer is"), "no {second} slot"),
    (dict(inputs=("first", "first")), "distinct"),
    (dict(inputs=("First", "second"), template="{First} {second}"), "input name 'First'"),
    (dict(inputs=("mask", "second"), template="{mask} {second}"), "input name 'mask'"),
    (dict(inputs=()), "1 to 8"),
    (dict(retrieval_key="concat"), "retrieval_key 'concat' is not one of template, joined, mean"),
])
def test_a_pair_spec_is_refused_naming_what_is_wrong(change: dict[str, object], says: str) -> None:
    fields = dict(name=PAIR.name, template=PAIR.template, labels=PAIR.labels, inputs=PAIR.inputs) | change
    with pytest.raises(InvalidInput, match=says):
        TaskSpec(**fields)  # type: ignore[arg-type]


def test_the_inputs_travel_in_one_order_free_form_and_fill_the_template_in_one_pass() -> None:
    one = PAIR.text_of({"first": "a {second} b", "second": "c"}, "inputs", 100)
    assert one == PAIR.text_of({"second": "c", "first": "a {second} b"}, "inputs", 100) == \
        pack_inputs({"second": "c", "first": "a {second} b"})
    assert PAIR.values_of(one) == {"first": "a {second} b", "second": "c"}
    # the first input holds the second's slot: it is text, never filled in again
    assert PAIR.prompt(one) == "first a {second} b second c ? the answer is"
    assert PAIR.text_of(one, "text", 100) == one  # a record's text is accepted as it is
    assert PAIR.key_text(one) == PAIR.prompt(one)
    joined = TaskSpec.from_dict({**PAIR.to_dict(), "retrieval_key": "joined"})
    assert joined.key_text(one) == "a {second} b\nc" and joined.inputs == PAIR.inputs
    assert TaskSpec.from_dict(PAIR.to_dict()) == PAIR


def test_a_single_text_task_is_unchanged() -> None:
    assert "inputs" not in SENTIMENT.to_dict()  # its export and `task show` are as before
    assert pack_inputs({"text": "a great movie"}) == "a great movie"  # so its record ids are too
    assert SENTIMENT.text_of({"text": "a great movie"}, "inputs", 100) == "a great movie"
    assert SENTIMENT.key_text("a great movie") == "a great movie"
    with pytest.raises(InvalidInput, match="inputs.first: task 'sentiment' has no input 'first'"):
        SENTIMENT.text_of({"first": "a"}, "inputs", 100)


@pytest.mark.parametrize(("example", "field", "says"), [
    ({"first": "a"}, "inputs.second", "missing"),
    ({"first": "a", "second": "b", "third": "c"}, "inputs.third", "has no input 'third'"),
    ({"first": "a", "second": " \u200b "}, "inputs.second", "empty text"),
    ({"first": "a\x00", "second": "b"}, "inputs.first", "NUL"),
    ({"first": "a" * 41, "second": "b"}, "inputs.first", "41 characters, over the limit of 40"),
    ({"first": "a" * 30, "second": "b" * 30}, "inputs", "60 characters in all inputs, over the limit of 40"),
    ("just one text", "text", "takes the inputs first, second by name"),
])
def test_bad_inputs_are_refused_naming_the_input(example: object, field: str, says: str) -> None:
    with pytest.raises(InvalidInput, match=says) as info:
        PAIR.text_of(example, "text" if isinstance(example, str) else "inputs", 40)  # type: ignore[arg-type]
    assert info.value.field == field and str(info.value).startswith(field)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["first", "second", "third", "text"]), weird_strings(), max_size=3))
def test_any_inputs_give_one_text_form_or_a_clear_error(values: dict[str, str]) -> None:
    try:
        text = PAIR.text_of(values, "inputs", 200)
    except InvalidInput as exc:
        assert exc.field and exc.field.startswith("inputs")
        return
    assert PAIR.values_of(text) == values and PAIR.prompt(text).count(" ? the answer is") >= 1


# -- files ----------------------------------------------------------------------------------------------

def test_files_take_a_column_per_input_and_reject_a_line_naming_its_input(tmp_path: Path) -> None:
    tsv = tmp_path / "p.tsv"
    tsv.write_text("first\tsecond\tlabel\na b\tc d\tsame\nx\t \tdifferent\n\ty\tsame\n", encoding="utf-8")
    rows = list(read_rows(tsv, inputs=PAIR.inputs))
    assert rows[0] == Row(2, pack_inputs({"first": "a b", "second": "c d"}), "same")
    assert rows[1:] == [Rejected(3, "second: empty text"), Rejected(4, "first: empty text")]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"first": "a b", "second": "c d", "label": "same"}) + "\n"
                     + json.dumps({"first": "a", "label": "same"}) + "\n", encoding="utf-8")
    assert list(read_rows(jsonl, inputs=PAIR.inputs)) == [Row(1, rows[0].text, "same"),  # no header line
                                                          Rejected(2, "missing field 'second'")]
    wrong = write_tsv(tmp_path / "w.tsv", [("a", "same")])
    with pytest.raises(InvalidInput, match="line 1: no column 'first'"):
        list(read_rows(wrong, inputs=PAIR.inputs))


def test_the_pair_tasks_are_built_without_a_pair_in_both_splits(tmp_path: Path) -> None:
    corpora = Path(__file__).resolve().parents[1] / "corpora"
    counts = build(corpora, tmp_path)
    for name, (_, inputs) in PAIR_TASKS.items():
        spec = TaskSpec.from_toml(Path(__file__).resolve().parents[1] / "raee_server" / "cli" / "tasks"
                                  / f"{name}.toml")
        assert spec.inputs == inputs
        train, dev = ([r for r in read_rows(tmp_path / name / f"{s}.tsv", inputs=inputs) if isinstance(r, Row)]
                      for s in ("train", "dev"))
        assert len(train) == counts[name]["train_rows"] and len(dev) == counts[name]["dev_rows"]
        assert 0.4 < counts[name]["dev_same"] / len(dev) < 0.6  # about half the pairs share their label
        pairs = {frozenset(spec.values_of(r.text).values()) for r in train}
        assert not any(frozenset(spec.values_of(r.text).values()) in pairs for r in dev)
    again = tmp_path / "again"
    build(corpora, again)
    assert (again / "trec-pairs" / "dev.tsv").read_bytes() == (tmp_path / "trec-pairs" / "dev.tsv").read_bytes()
    rows = [Row(i, f"t{i}", "ab"[i % 2]) for i in range(40)]
    assert all(a != b and (label == "same") == ((int(a[1:]) - int(b[1:])) % 2 == 0)
               for a, b, label in pairs_of(rows, 1))


# -- the engine -----------------------------------------------------------------------------------------

def test_a_pair_task_ingests_classifies_and_deletes_by_its_inputs(engine: Engine) -> None:
    engine.create_task(PAIR)
    rows = [Row(i + 1, pack_inputs(values), label) for i, (values, label) in enumerate(PAIR_ROWS)]
    swapped = Row(99, json.dumps(dict(reversed(list(PAIR_ROWS[0][0].items())))), PAIR_ROWS[0][1])
    bad = Row(100, json.dumps({"first": "a", "second": ""}), "same")
    report = engine.ingest("pair", [*rows, swapped, bad])
    assert (report.added, report.present) == (len(rows), 1)  # the same inputs in another order: the same record
    assert report.rejected == [Rejected(100, "second: empty text")]
    stored = dict((rid, text) for rid, text, _ in engine.metadata.committed_examples("pair"))
    assert stored[record_id("pair", rows[0].text)] == rows[0].text
    answers = engine.classify("pair", [PAIR_ROWS[1][0], PAIR_ROWS[2][0]], policy="knn-vote", k=3)
    assert [a.labels for a in answers] == [["different", "same"]] * 2
    # the query's key is the filled template's: its nearest record is itself
    found, _ = engine.neighbours("pair", [rows[1].text], 1)
    assert found[0][0].id == record_id("pair", rows[1].text)
    with pytest.raises(InvalidInput, match="inputs.second: missing") as info:
        engine.classify("pair", [{"first": "a"}])
    assert info.value.field == "inputs.second"
    with pytest.raises(InvalidInput, match=r"inputs\[1\].values.first: empty text"):
        engine.classify("pair", [PAIR_ROWS[0][0], {"first": "", "second": "b"}])
    assert engine.delete_records("pair", texts=[PAIR_ROWS[0][0]]) == [record_id("pair", rows[0].text)]
    assert engine.task_info("pair").records == len(rows) - 1
    assert engine.task_info("pair").spec == PAIR  # the inputs survive the metadata store


def test_each_retrieval_key_is_made_as_declared(engine: Engine) -> None:
    text = pack_inputs({"first": "a great movie", "second": "the worst plot"})
    keys = {mode: engine.keys(TaskSpec.from_dict({**PAIR.to_dict(), "retrieval_key": mode}), [text])[0]
            for mode in ("template", "joined", "mean")}
    encode = engine.encoder.encode
    np.testing.assert_allclose(keys["template"], encode([PAIR.prompt(text)])[0], atol=1e-6)
    np.testing.assert_allclose(keys["joined"], encode(["a great movie\nthe worst plot"])[0], atol=1e-6)
    mean = encode(["a great movie"])[0] + encode(["the worst plot"])[0]
    np.testing.assert_allclose(keys["mean"], mean / np.linalg.norm(mean), atol=1e-6)


# -- every transport --------------------------------------------------------------------------------------

@pytest.fixture
def served(tmp_path: Path) -> Iterator[ServerThread]:
    settings = make_settings(tmp_path)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    server.wait_ready()
    yield server
    server.stop()


def create_pair_task(stub: object) -> pb.Task:
    return stub.CreateTask(pb.CreateTaskRequest(  # type: ignore[attr-defined]
        name=PAIR.name, template=PAIR.template, inputs=list(PAIR.inputs), retrieval_key="joined",
        labels=[pb.Label(name=lb.name, word=lb.word) for lb in PAIR.labels])).task


def test_a_pair_task_over_grpc_http_and_the_open_inference_protocol(served: ServerThread) -> None:
    stub = served.stub
    made = create_pair_task(stub)
    assert list(made.inputs) == ["first", "second"] and made.retrieval_key == "joined"
    reply = stub.Ingest(iter([pb.IngestRequest(task="pair", examples=[
        *(pb.Example(inputs=values, label=label) for values, label in PAIR_ROWS),
        pb.Example(inputs={"first": "a"}, label="same"),
        pb.Example(text="a", inputs={"first": "a", "second": "b"}, label="same")])]))
    assert (reply.added, reply.rejected) == (len(PAIR_ROWS), 2)
    assert [r.reason for r in reply.rejections] == ["second: missing (task 'pair' takes first, second)",
                                                    "give text or inputs, not both"]
    one = stub.Classify(pb.ClassifyRequest(task="pair", inputs=PAIR_ROWS[0][0],
                                           options=pb.ClassifyOptions(policy="knn-vote", k=3)))
    batch = stub.ClassifyBatch(pb.ClassifyBatchRequest(task="pair", inputs=[pb.Inputs(values=PAIR_ROWS[0][0])],
                                                       options=pb.ClassifyOptions(policy="knn-vote", k=3)))
    assert (one.label, list(one.scores)) == (batch.results[0].label, list(batch.results[0].scores))
    for request, field in ((pb.ClassifyRequest(task="pair", text="only one"), "text"),
                           (pb.ClassifyRequest(task="pair", inputs={"first": "a"}), "inputs.second"),
                           (pb.ClassifyRequest(task="pair", text="a", inputs={"first": "a"}), "text")):
        with pytest.raises(grpc.RpcError) as info:
            stub.Classify(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith(field)
    # a single-text task answers `inputs: {"text": ...}` as it answers `text`
    stub.Ingest(iter([pb.IngestRequest(task="sentiment", examples=[pb.Example(text=t, label=l) for t, l in ROWS])]))
    by_text = stub.Classify(pb.ClassifyRequest(task="sentiment", text="a great movie"))
    by_input = stub.Classify(pb.ClassifyRequest(task="sentiment", inputs={"text": "a great movie"}))
    assert (by_text.label, list(by_text.scores)) == (by_input.label, list(by_input.scores))

    status, _, body = call(served, "POST", "/v1/tasks/pair:classify", json.dumps(
        {"inputs": PAIR_ROWS[0][0], "options": {"policy": "knn-vote", "k": 3}}))
    assert status == 200 and json.loads(body)["label"] == one.label
    status, _, body = call(served, "POST", "/v1/tasks/pair:classify", json.dumps({"inputs": {"first": "a"}}))
    assert status == 400 and json.loads(body)["message"].startswith("inputs.second: missing")
    status, _, body = call(served, "GET", "/v1/tasks/pair")
    assert json.loads(body)["inputs"] == ["first", "second"]

    v2stub = v2_grpc.GRPCInferenceServiceStub(served.channel)
    meta = v2stub.ModelMetadata(v2.ModelMetadataRequest(name="pair"))
    assert [t.name for t in meta.inputs] == ["first", "second"]

    def tensor(name: str, texts: list[str]) -> v2.ModelInferRequest.InferInputTensor:
        return v2.ModelInferRequest.InferInputTensor(
            name=name, datatype="BYTES", shape=[len(texts)],
            contents=v2.InferTensorContents(bytes_contents=[t.encode() for t in texts]))

    infer = v2stub.ModelInfer(v2.ModelInferRequest(
        model_name="pair", inputs=[tensor("second", [PAIR_ROWS[0][0]["second"]]),
                                   tensor("first", [PAIR_ROWS[0][0]["first"]])],
        parameters={"policy": v2.InferParameter(string_param="knn-vote"), "k": v2.InferParameter(int64_param=3)}))
    assert infer.raw_output_contents[0][4:].decode() == one.label
    with pytest.raises(grpc.RpcError) as info:
        v2stub.ModelInfer(v2.ModelInferRequest(model_name="pair", inputs=[tensor("first", ["a"])]))
    assert "this model takes 2 inputs, 'first', 'second'" in info.value.details()


def test_a_pair_task_through_the_client_and_the_cli(served: ServerThread, tmp_path: Path) -> None:
    from raee_server.client import RaeeClient

    client = RaeeClient(f"127.0.0.1:{served.port}")
    client.create_task(PAIR)
    assert client.inputs("pair") == ["first", "second"] and client.inputs("sentiment") == ["text"]
    assert client.ingest("pair", [Row(i, pack_inputs(v), lb) for i, (v, lb) in enumerate(PAIR_ROWS)]).added == \
        len(PAIR_ROWS)
    answers = client.classify("pair", [PAIR_ROWS[0][0]], policy="knn-vote", k=3)
    assert answers[0].labels == ["different", "same"]
    assert client.delete_records("pair", texts=[PAIR_ROWS[1][0]]) == [record_id("pair", pack_inputs(PAIR_ROWS[1][0]))]
    client.close()

    from click.testing import CliRunner

    from raee_server.cli.main import cli

    def run(*args: str, code: int = 0) -> str:
        """stdout (the JSON report), or everything printed where the command failed as a usage error."""
        result = CliRunner().invoke(cli, ["--json", *args, "--server", f"127.0.0.1:{served.port}"])
        assert result.exit_code == code, result.output
        return result.output if code == 2 else result.stdout

    by_name = json.loads(run("classify", "--task", "pair", "--input", f"first={PAIR_ROWS[0][0]['first']}",
                             "--input", f"second={PAIR_ROWS[0][0]['second']}", "--policy", "knn-vote", "--k", "3"))
    in_order = json.loads(run("classify", "--task", "pair", PAIR_ROWS[0][0]["first"], PAIR_ROWS[0][0]["second"],
                              "--policy", "knn-vote", "--k", "3"))
    assert by_name[0]["label"] == in_order[0]["label"] == answers[0].label
    assert by_name[0]["inputs"] == PAIR_ROWS[0][0]
    assert "takes 2 inputs (first, second)" in run("classify", "--task", "pair", "only one", code=2)
    tsv = tmp_path / "more.tsv"
    tsv.write_text("first\tsecond\tlabel\nfun film\tsad story\tdifferent\nfun\t\tsame\n", encoding="utf-8")
    report = json.loads(run("ingest", "--task", "pair", str(tsv), code=1))
    assert report["added"] == 1 and report["rejected"] == [{"line": 3, "reason": "second: empty text"}]


def test_a_pair_task_locally_through_the_cli(tmp_path: Path) -> None:
    model = tmp_path / "tiny"
    tiny_causal_lm().save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    run = admin_cli(tmp_path / "data", model)
    spec = tmp_path / "pair.toml"
    spec.write_text('name = "pair"\ninputs = ["first", "second"]\ntemplate = "first {first} second {second} ? '
                    'the answer is"\nlabels = [{ name = "different", word = " negative" }, '
                    '{ name = "same", word = " positive" }]\n', encoding="utf-8")
    run("task", "create", "--file", str(spec))
    tsv = tmp_path / "p.tsv"
    tsv.write_text("first\tsecond\tlabel\n" + "".join(f"{v['first']}\t{v['second']}\t{lb}\n" for v, lb in PAIR_ROWS),
                   encoding="utf-8")
    assert '"added": 10' in run("--json", "ingest", "--task", "pair", str(tsv))
    out = json.loads(run("--json", "classify", "--task", "pair", "a great movie", "the worst plot", "--policy",
                         "knn-vote").splitlines()[-1])  # the last line: the report (progress goes before)
    assert out[0]["inputs"] == {"first": "a great movie", "second": "the worst plot"}
    assert out[0]["label"] in ("same", "different")
    assert json.loads(run("--json", "task", "show", "pair").splitlines()[-1])["inputs"] == ["first", "second"]


def test_a_pair_task_moves_as_one_export_file_with_its_inputs(engine: Engine, tmp_path: Path) -> None:
    from raee_server.core import transfer

    engine.create_task(TaskSpec.from_dict({**PAIR.to_dict(), "retrieval_key": "mean"}))
    engine.ingest("pair", [Row(i + 1, pack_inputs(values), label) for i, (values, label) in enumerate(PAIR_ROWS)])
    query = engine.texts_of("pair", [PAIR_ROWS[4][0]])
    before = [(n.id, round(n.similarity, 5)) for n in engine.neighbours("pair", query, 4)[0][0]]
    assert transfer.export_task(engine, "pair", tmp_path / "pair.raee.gz") == len(PAIR_ROWS)
    engine.delete_task("pair")
    assert transfer.import_task(engine, tmp_path / "pair.raee.gz") == ("pair", len(PAIR_ROWS))
    moved = engine.task_info("pair").spec
    assert (moved.inputs, moved.retrieval_key) == (PAIR.inputs, "mean")
    after = [(n.id, round(n.similarity, 5)) for n in engine.neighbours("pair", query, 4)[0][0]]
    assert after == before


def test_the_bench_measures_a_pair_task_under_each_retrieval_key(engine: Engine, tmp_path: Path) -> None:
    from raee_server.bench.harness import bench_task

    from .conftest import corpus

    texts = corpus(160)
    lines = ["first\tsecond\tlabel"] + [f"{a}\t{b}\t{'same' if la == lb else 'different'}"
                                        for (a, la), (b, lb) in zip(texts[::2], texts[1::2])]
    (tmp_path / "train.tsv").write_text("\n".join(lines[:61]) + "\n", encoding="utf-8")
    (tmp_path / "dev.tsv").write_text("\n".join(lines[:1] + lines[61:]) + "\n", encoding="utf-8")
    report = bench_task(engine, PAIR, tmp_path / "train.tsv", tmp_path / "dev.tsv", 60, 20, latency_rows=2,
                        sweeps=("key",))
    assert report.dev_rows == 20 and {r.name for r in report.results} >= {"full", "knn-vote", "key-logreg"}
    keyed = report.to_dict()["key_sweep"]
    assert list(keyed) == ["template", "joined", "mean"]
    assert all([p["policy"] for p in results] == ["knn-vote", "paper", "key-logreg"] for results in keyed.values())
    assert all(p["vs_own_key"] == 0 for p in keyed["template"])  # the run's own key against itself
    for mode in ("joined", "mean"):  # a copy of the records, keyed again: no forward, the same records
        copy = engine.task_info(f"pair--key-{mode}")
        assert copy.spec.retrieval_key == mode and copy.records == engine.task_info("pair").records


def test_the_glue_pair_specs_read_glues_own_columns(tmp_path: Path) -> None:
    """No GLUE file is on this machine; where one is, `raee-admin bench rte --data DIR` reads it as GLUE
    writes it (a header with index, sentence1, sentence2, label): here a file in that layout."""
    from raee_server.cli.assets import task_spec

    rte = task_spec("rte")
    assert rte is not None and rte.inputs == ("sentence1", "sentence2")
    assert rte.label_names == ["entailment", "not_entailment"]
    glue = tmp_path / "train.tsv"
    glue.write_text("index\tsentence1\tsentence2\tlabel\n0\tA man is sleeping.\tNobody sleeps.\tnot_entailment\n",
                    encoding="utf-8")
    (row,) = read_rows(glue, inputs=rte.inputs)
    assert isinstance(row, Row) and rte.values_of(row.text) == {"sentence1": "A man is sleeping.",
                                                                 "sentence2": "Nobody sleeps."}
    qnli = task_spec("qnli")
    assert qnli is not None and qnli.inputs == ("question", "sentence")
