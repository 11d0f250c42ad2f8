"""End to end on the real packaged models: Gemma 3 270M (GGUF, converted once) and all-MiniLM-L6-v2.

A few hundred rows of corpora/sst2 (in the repository); the first run converts the GGUF into the
model cache (RAEE_MODEL_CACHE, default ~/.local/share/raee/models), later runs load it in seconds.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from raee_server.core.datafile import read_rows
from raee_server.core.engine import Engine
from raee_server.core.evaluation import evaluate
from raee_server.settings import Settings
from raee_server.stores.records import record_id
from raee_server.types import Row, TaskSpec

from .conftest import CORPORA

pytestmark = pytest.mark.real_model

SST2 = Path(__file__).resolve().parents[1] / "raee_server" / "cli" / "tasks" / "sst2.toml"
TRAIN_ROWS, DEV_ROWS = 240, 100


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    settings = Settings(data_dir=tmp_path_factory.mktemp("real"), model_cache=Settings().models_dir)
    engine = Engine.open(settings)
    engine.create_task(TaskSpec.from_toml(SST2))
    yield engine
    engine.close()


def test_the_lens_at_the_last_exit_is_gemmas_own_answer(real: Engine) -> None:
    spec = real.task_info("sst2").spec
    _, head = real._task("sst2")
    prompts = [spec.prompt(t) for t in ("a masterpiece", "a total waste of two hours", "it 's fine")]
    lens = real.backbone.all_exit_logits(prompts, head)
    assert lens.shape == (3, 19, 2)
    for i, prompt in enumerate(prompts):
        enc = real.backbone.tokenizer([prompt], return_tensors="pt")
        with torch.no_grad():
            own = real.backbone.model(**enc).logits[0, -1, list(head.token_ids)]
        torch.testing.assert_close(lens[i, -1], own.float(), rtol=1e-3, atol=1e-3)
    for layer in (0, 5, 12):  # a truncated forward gives the lens at its exit
        torch.testing.assert_close(real.backbone.exit_logits(prompts, head, layer), lens[:, layer],
                                   rtol=1e-3, atol=1e-3)


def test_ingest_then_eval_on_sst2(real: Engine) -> None:
    train = CORPORA / "sst2" / "train.tsv"
    report = real.ingest("sst2", itertools.islice(read_rows(train), TRAIN_ROWS))
    assert report.rejected == [] and report.added + report.present == TRAIN_ROWS
    assert real.vectors.count("sst2") == real.task_info("sst2").records == report.added
    assert real.ingest("sst2", itertools.islice(read_rows(train), TRAIN_ROWS)).added == 0

    dev = [r for r in itertools.islice(read_rows(CORPORA / "sst2" / "dev.tsv"), DEV_ROWS) if isinstance(r, Row)]
    result = evaluate(real, "sst2", dev, ["paper"])
    paper, full, vote = result.results
    assert full.exits == [18] * len(dev)
    # Retrieval with real MiniLM keys must carry signal, and the paper policy must exit early.
    assert vote.accuracy > 0.6
    assert paper.mean_exit < 0.5 * real.depth

    # The served path (truncated forwards) answers as the evaluation says it does.
    served = real.classify("sst2", [r.text for r in dev[:16]], policy="paper")
    found, _ = real.neighbours("sst2", [r.text for r in dev[:16]], 12)
    assert [p.exit_layer for p in served] == paper.exits[:16]
    lens = real.all_exits("sst2", [r.text for r in dev[:16]])[0]
    labels = real.task_info("sst2").spec.label_names
    assert [p.label for p in served] == [labels[int(lens[i, e].argmax())] for i, e in enumerate(paper.exits[:16])]
    assert len(found) == 16


PAIR_TRAIN, PAIR_DEV = 200, 8


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from raee_server.bench.pairs import build

    root = tmp_path_factory.mktemp("pairs")
    build(CORPORA, root)
    return root


def test_a_sentence_pair_task_is_ingested_fit_and_tuned_on_the_real_backbone(real: Engine, pair_data: Path) -> None:
    from raee_server.core import auto

    spec = TaskSpec.from_toml(SST2.parent / "trec-pairs.toml")
    real.create_task(spec)
    rows = list(itertools.islice(read_rows(pair_data / "trec-pairs" / "train.tsv", inputs=spec.inputs), PAIR_TRAIN))
    report = real.ingest(spec.name, rows)
    assert report.rejected == [] and report.added == PAIR_TRAIN == real.task_info(spec.name).records
    heads = auto.fit_task_heads(real, spec.name)
    assert heads.exits == real.depth + 1 and heads.key is not None
    choice = auto.tune(real, spec.name)
    assert choice.heads_version == heads.version
    # a record's own inputs retrieve it first (its key is its filled template), whatever order they come in
    first = spec.values_of(rows[0].text)
    found, _ = real.neighbours(spec.name, [spec.text_of(dict(reversed(list(first.items()))), "inputs", 4000)], 1)
    assert found[0][0].id == record_id(spec.name, rows[0].text)
    dev = [r for r in itertools.islice(read_rows(pair_data / "trec-pairs" / "dev.tsv", inputs=spec.inputs),
                                       PAIR_DEV) if isinstance(r, Row)]
    answers = real.classify(spec.name, [spec.values_of(r.text) for r in dev])  # auto: the tuned choice
    assert all(a.label in ("same", "different") and a.policy.startswith("auto=") for a in answers)


def test_grpc_classify_on_the_real_backbone(real: Engine) -> None:
    """Last in this module: the server takes over the engine and closes it when it stops."""
    from raee_server.protos.raee.v1 import raee_pb2 as pb

    from .grpc_harness import ServerThread

    real.ingest("sst2", itertools.islice(read_rows(CORPORA / "sst2" / "train.tsv"), 40))  # no-op after the test above
    from click.testing import CliRunner

    from raee_server.cli.main import cli
    from raee_server.client import RaeeClient

    from .test_gateway import call as http_call

    server = ServerThread(real.settings.model_copy(update={"address": "127.0.0.1:0", "http_address": "127.0.0.1:0",
                                                           "metrics_port": -1}), lambda: real)
    try:
        server.wait_ready()
        texts = ["an utterly charming and funny film", "a dull , lifeless exercise"]
        direct = real.classify("sst2", texts)
        reply = server.stub.ClassifyBatch(pb.ClassifyBatchRequest(
            task="sst2", texts=texts, options=pb.ClassifyOptions(return_neighbours=True)))
        assert [(r.label, r.exit_layer) for r in reply.results] == [(p.label, p.exit_layer) for p in direct]
        assert all(r.depth == 18 and len(r.neighbours) == 12 for r in reply.results)
        assert all(r.timings.encode_us > 0 and r.timings.retrieve_us > 0 for r in reply.results)

        # the pair task of the test above, by its inputs over gRPC, HTTP, the client and the CLI
        pair = {"question1": "Who wrote the novel Dracula ?", "question2": "Who invented the light bulb ?"}
        expected = real.classify("trec-pairs", [pair], policy="paper-heads")[0]
        options = pb.ClassifyOptions(policy="paper-heads")
        by_grpc = server.stub.Classify(pb.ClassifyRequest(task="trec-pairs", inputs=pair, options=options))
        status, _, body = http_call(server, "POST", "/v1/tasks/trec-pairs:classify",
                                    json.dumps({"inputs": pair, "options": {"policy": "paper-heads"}}))
        client = RaeeClient(f"127.0.0.1:{server.port}")
        by_client = client.classify("trec-pairs", [pair], policy="paper-heads")[0]
        client.close()
        cli_run = CliRunner().invoke(cli, ["--json", "classify", "--task", "trec-pairs", pair["question1"],
                                           pair["question2"], "--policy", "paper-heads", "--server",
                                           f"127.0.0.1:{server.port}"])
        assert cli_run.exit_code == 0, cli_run.output
        by_cli = json.loads(cli_run.stdout)[0]
        assert status == 200
        answers = [(by_grpc.label, by_grpc.exit_layer), (json.loads(body)["label"], json.loads(body)["exitLayer"]),
                   (by_client.label, by_client.exit_layer), (by_cli["label"], by_cli["exit_layer"])]
        assert answers == [(expected.label, expected.exit_layer)] * 4
    finally:
        server.stop()
