"""Several writers on one task at once: overlapping rows end with no duplicate and no lost record."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from raee_server.cli.main import cli
from raee_server.core import doctor
from raee_server.core.datafile import read_rows
from raee_server.core.engine import Engine
from raee_server.models.backbone import CausalLMBackbone
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.stores.metadata import MetadataStore

from .conftest import SENTIMENT, corpus, write_tsv
from .databases import fresh_postgres_database
from .grpc_harness import ServerThread
from .test_cli import SPEC
from .test_grpc import ingest as grpc_ingest
from .test_grpc import make_settings, tiny_engine_factory
from .test_vector_store_congruence import qdrant_server_url
from .tiny_models import save_tiny_backbone, tiny_causal_lm, tiny_tokenizer


def test_two_online_ingest_clients_through_the_server(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    server.wait_ready()
    rows = corpus(120)
    halves = [rows[:80], rows[40:]]  # 40 rows in both
    replies: list[pb.IngestResponse] = []
    threads = [threading.Thread(target=lambda h=h: replies.append(grpc_ingest(server.stub, "sentiment", h, chunk=7)))
               for h in halves]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert sum(r.added for r in replies) == 120 and sum(r.already_present for r in replies) == 40
        engine = server.server.worker.engine
        assert engine.vectors.count("sentiment") == 120 == engine.task_info("sentiment").records
        assert doctor.diagnose(engine, "sentiment").healthy
    finally:
        server.stop()


def test_two_writers_share_the_sql_database(engine: Engine, tmp_path: Path) -> None:
    """Two engines (two SQL connection pools) write overlapping rows at the same time."""
    engine.create_task(SENTIMENT)
    # A backbone reads exits with hooks on its modules: one per thread, as in separate processes.
    second = Engine(CausalLMBackbone(tiny_causal_lm(), tiny_tokenizer(), engine.backbone.model_id), engine.encoder,
                    engine.vectors, MetadataStore(engine.metadata.url), engine.settings)
    rows = corpus(90)
    files = [write_tsv(tmp_path / "a.tsv", rows[:60]), write_tsv(tmp_path / "b.tsv", rows[30:])]
    errors: list[BaseException] = []

    def run(e: Engine, f: Path) -> None:
        try:
            e.ingest(SENTIMENT.name, read_rows(f))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e, f)) for e, f in zip((engine, second), files)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    second.metadata.close()
    assert errors == []
    assert engine.vectors.count(SENTIMENT.name) == 90 == engine.task_info(SENTIMENT.name).records
    assert doctor.diagnose(engine, SENTIMENT.name).healthy


def test_two_ingest_processes_against_postgres_and_a_qdrant_server(tmp_path: Path) -> None:
    url = qdrant_server_url()
    if url is None:
        pytest.skip("no Qdrant server: set RAEE_TEST_QDRANT_URL or run a Docker daemon")
    with fresh_postgres_database() as database_url:
        model = save_tiny_backbone(tmp_path / "model")
        env = {**os.environ, "RAEE_QDRANT_URL": url, "RAEE_DATABASE_URL": database_url,
               "RAEE_INGEST_BATCH_SIZE": "8"}
        base = ["--data-dir", str(tmp_path / "data"), "--backbone", str(model), "--encoder", "hashing:32"]
        (tmp_path / "s.toml").write_text(SPEC.replace('"sentiment"', f'"sentiment{os.getpid()}"'))
        runner = CliRunner(env=env)
        assert runner.invoke(cli, [*base, "task", "create", "--file", str(tmp_path / "s.toml")]).exit_code == 0
        rows = corpus(200)
        files = [write_tsv(tmp_path / "a.tsv", rows[:130]), write_tsv(tmp_path / "b.tsv", rows[70:])]
        admin = [sys.executable, "-c", "from raee_server.cli.main import main; main()"]
        procs = [subprocess.Popen([*admin, *base, "ingest", "--task", f"sentiment{os.getpid()}", str(f)], env=env)
                 for f in files]
        assert [p.wait(300) for p in procs] == [0, 0]
        check = runner.invoke(cli, [*base, "doctor"])
        assert "200 committed rows, 200 vectors, 0 pending" in check.output, check.output
