"""Moving a task between deployments: SQLite + Qdrant Edge -> Postgres + a Qdrant server (qdrant-client's
local mode, or a real server with RAEE_TEST_QDRANT_URL) and back, with the same answers; a damaged
or foreign file writes nothing."""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from raee_server.cli.main import cli
from raee_server.core import auto, doctor, transfer
from raee_server.core.datafile import read_rows
from raee_server.core.engine import Engine
from raee_server.errors import InvalidInput, StoreMismatch, TaskExists
from raee_server.models.backbone import Backbone
from raee_server.models.encoders import HashingEncoder
from raee_server.settings import Settings
from raee_server.stores import feature_rows as feature_rows_module
from raee_server.stores.metadata import MetadataStore
from raee_server.stores.vectors import EdgeVectorStore, QdrantServerStore, VectorStore, collection_name

from .conftest import SENTIMENT, write_tsv
from .databases import database
from .test_concurrent_writers import corpus
from .test_vector_store_congruence import qdrant_server_url

DEV = [t for t, _ in corpus(90)[60:]]
# Retrieval over every record (k = 60): the tiny hashing keys tie often, and two engines may break a tie at
# a cut differently. `auto`'s choice is compared as stored (its k cuts among ties).
POLICIES = ["heads", "heads:2", "cascade:0.02", "knn-vote", "paper", "paper-heads", "full"]


@contextmanager
def deployment(kind: str, tmp_path: Path, backbone: Backbone) -> Iterator[Engine]:
    """embedded: SQLite + Qdrant Edge; server: Postgres + a Qdrant server (local mode unless a URL is given)."""
    encoder = HashingEncoder(32)
    collection = collection_name(backbone.model_id, encoder.model_id)
    with database("sqlite" if kind == "embedded" else "postgres", tmp_path) as url:
        vectors: VectorStore
        if kind == "embedded":
            vectors = EdgeVectorStore(tmp_path / "qdrant", collection, encoder.dim)
        else:
            server = qdrant_server_url()
            vectors = QdrantServerStore(server or ":memory:", f"{collection}_{uuid.uuid4().hex[:6]}", encoder.dim)
        settings = Settings(data_dir=tmp_path, database_url=url, ingest_batch_size=8)
        engine = Engine(backbone, encoder, vectors, MetadataStore(settings.sql_url), settings)
        try:
            yield engine
        finally:
            engine.close()


def answers(engine: Engine) -> dict[str, list[tuple[str, int, list[float]]]]:
    return {p: [(a.label, a.exit_layer, [round(s, 5) for s in a.scores])
                for a in engine.classify(SENTIMENT.name, DEV, policy=p, k=60)] for p in POLICIES}


def test_export_then_import_gives_the_same_answers_across_deployments_and_back(
        tmp_path: Path, backbone: Backbone, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(feature_rows_module, "LEARN_ROWS", 40)  # coded features, as a grown task has
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    with deployment("embedded", tmp_path / "a", backbone) as source:
        source.create_task(SENTIMENT)
        source.ingest(SENTIMENT.name, read_rows(write_tsv(tmp_path / "rows.tsv", corpus(60))))
        heads = auto.fit_task_heads(source, SENTIMENT.name)
        choice = auto.tune(source, SENTIMENT.name)
        assert source.metadata.codec(SENTIMENT.name) is not None
        expected = answers(source)
        assert transfer.export_task(source, SENTIMENT.name, tmp_path / "sentiment.raee.gz") == 60
    with deployment("server", tmp_path / "b", backbone) as production:
        assert transfer.import_task(production, tmp_path / "sentiment.raee.gz") == (SENTIMENT.name, 60)
        info = production.task_info(SENTIMENT.name)
        assert info.records == 60 and info.tuned is not None
        assert (info.tuned.policy, info.tuned.k, info.tuned.accuracy) == (choice.policy, choice.k, choice.accuracy)
        served = production.heads(SENTIMENT.name)
        assert served is not None and served.record_ids == heads.record_ids
        assert info.tuned.heads_version == served.version  # the choice points at the imported heads
        assert answers(production) == expected
        assert doctor.diagnose(production, SENTIMENT.name).healthy
        with pytest.raises(TaskExists):  # refused before anything is written
            transfer.import_task(production, tmp_path / "sentiment.raee.gz")
        assert transfer.export_task(production, SENTIMENT.name, tmp_path / "back.raee.gz") == 60
    with deployment("embedded", tmp_path / "c", backbone) as again:
        transfer.import_task(again, tmp_path / "back.raee.gz")
        assert answers(again) == expected
        with again.metadata.engine.connect() as conn:  # the features came as stored: codes, not raw
            assert {r[0] for r in conn.execute(text("select codec from exit_features"))} == {1}


def test_a_damaged_or_foreign_export_writes_nothing(tmp_path: Path, engine: Engine) -> None:
    engine.create_task(SENTIMENT)
    engine.ingest(SENTIMENT.name, read_rows(write_tsv(tmp_path / "rows.tsv", corpus(30))))
    good = tmp_path / "good.raee.gz"
    transfer.export_task(engine, SENTIMENT.name, good)
    engine.delete_task(SENTIMENT.name)
    lines = gzip.decompress(good.read_bytes()).decode().splitlines(keepends=True)

    def variant(name: str, new_lines: list[str]) -> Path:
        path = tmp_path / name
        path.write_bytes(gzip.compress("".join(new_lines).encode()))
        return path

    tampered = variant("tampered.gz", [lines[0], lines[1].replace('"text":"', '"text":"x', 1), *lines[2:]])
    assert '"text":"' in lines[1]  # the tamper changed a record
    cut = variant("cut.gz", lines[:-5])
    with pytest.raises(InvalidInput, match="damaged"):
        transfer.import_task(engine, tampered)
    with pytest.raises(InvalidInput, match="cut short"):
        transfer.import_task(engine, cut)
    (tmp_path / "junk.gz").write_bytes(b"not gzip at all")
    with pytest.raises(InvalidInput, match="not a complete task export"):
        transfer.import_task(engine, tmp_path / "junk.gz")
    foreign = variant("foreign.gz", [lines[0].replace(engine.backbone.model_id, "another-backbone"), *lines[1:]])
    with pytest.raises((StoreMismatch, InvalidInput)):
        transfer.import_task(engine, foreign)
    assert SENTIMENT.name not in engine.metadata.task_names(None, 100)
    assert engine.vectors.count() == 0
    transfer.import_task(engine, good)  # the intact file still imports
    assert engine.task_info(SENTIMENT.name).records == 30


def test_the_cli_exports_and_imports(tmp_path: Path) -> None:
    from .tiny_models import save_tiny_backbone

    model = save_tiny_backbone(tmp_path / "model")
    runner = CliRunner()
    src = ["--data-dir", str(tmp_path / "src"), "--backbone", str(model), "--encoder", "hashing:32", "--json"]
    dst = ["--data-dir", str(tmp_path / "dst"), "--backbone", str(model), "--encoder", "hashing:32", "--json"]
    spec = tmp_path / "s.toml"
    from .test_cli import SPEC

    spec.write_text(SPEC)
    assert runner.invoke(cli, [*src, "task", "create", "--file", str(spec)]).exit_code == 0
    assert runner.invoke(cli, [*src, "ingest", "--task", "sentiment",
                               str(write_tsv(tmp_path / "rows.tsv", corpus(30)))]).exit_code == 0
    out = runner.invoke(cli, [*src, "export", "--task", "sentiment", str(tmp_path / "s.raee.gz")])
    assert out.exit_code == 0 and '"records": 30' in out.stdout
    back = runner.invoke(cli, [*dst, "import", str(tmp_path / "s.raee.gz")])
    assert back.exit_code == 0 and '"records": 30' in back.stdout

    def answer(base: list[str]) -> list[tuple[str, int, dict[str, float]]]:
        out = runner.invoke(cli, [*base, "classify", "--task", "sentiment", "--policy", "paper", "--k", "30", *DEV[:5]])
        return [(a["label"], a["exit_layer"], a["scores"]) for a in json.loads(out.stdout)]

    assert answer(src) == answer(dst) and len(answer(src)) == 5


