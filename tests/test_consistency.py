"""SQL and the vector store never diverge silently: crashes leave visible states that a rerun or the doctor repairs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from raee_server.cli.main import cli
from raee_server.core import doctor
from raee_server.core.datafile import read_rows
from raee_server.core.engine import Engine
from raee_server.stores.records import record_id
from raee_server.stores.vectors import VectorPoint

from .conftest import SENTIMENT, write_tsv
from .test_cli import SPEC
from .test_engine import ROWS
from .tiny_models import WORDS, save_tiny_backbone


class Crash(Exception):
    pass


def test_a_crash_between_sql_and_vectors_is_repaired_by_rerunning(engine: Engine, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    engine.create_task(SENTIMENT)
    data = write_tsv(tmp_path / "d.tsv", ROWS)
    real_upsert = engine.vectors.upsert
    calls = {"n": 0}

    def crash_on_second(points):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise Crash("killed between the SQL write and the vector upsert")
        real_upsert(points)

    monkeypatch.setattr(engine.vectors, "upsert", crash_on_second)
    with pytest.raises(Crash):
        engine.ingest(SENTIMENT.name, read_rows(data))
    monkeypatch.setattr(engine.vectors, "upsert", real_upsert)
    sick = doctor.diagnose(engine, SENTIMENT.name)
    assert not sick.healthy and len(sick.pending) == 4 and sick.committed == 4 == sick.vectors
    again = engine.ingest(SENTIMENT.name, read_rows(data))  # the rerun recomputes what was pending
    assert (again.added, again.present) == (6, 4)
    assert doctor.diagnose(engine, SENTIMENT.name).healthy


def test_doctor_repairs_missing_and_orphan_vectors(engine: Engine, tmp_path: Path) -> None:
    engine.create_task(SENTIMENT)
    engine.ingest(SENTIMENT.name, read_rows(write_tsv(tmp_path / "d.tsv", ROWS)))
    lost = sorted(engine.vectors.ids(SENTIMENT.name))[:3]
    engine.vectors.delete_ids(lost)
    stray = record_id(SENTIMENT.name, "never ingested")
    engine.vectors.upsert([VectorPoint(stray, np.ones(32, dtype=np.float32), {"task": SENTIMENT.name})])
    sick = doctor.diagnose(engine, SENTIMENT.name)
    assert (sick.missing_vectors, sick.orphan_vectors) == (lost, [stray])
    healed = doctor.repair(engine, sick)
    assert healed.healthy and healed.vectors == healed.committed == len(ROWS)


def test_sigkill_during_ingest_then_rerun_leaves_both_stores_equal(tmp_path: Path) -> None:
    model = save_tiny_backbone(tmp_path / "model")
    base = ["--data-dir", str(tmp_path / "data"), "--backbone", str(model), "--encoder", "hashing:32"]
    runner = CliRunner()
    (tmp_path / "s.toml").write_text(SPEC)
    assert runner.invoke(cli, [*base, "task", "create", "--file", str(tmp_path / "s.toml")]).exit_code == 0
    rows = [(f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]} {i}", "positive" if i % 2 else "negative")
            for i in range(600)]
    data = write_tsv(tmp_path / "big.tsv", rows + rows[:50])  # 600 distinct rows, 50 repeated
    env = {**os.environ, "RAEE_INGEST_BATCH_SIZE": "8"}
    proc = subprocess.Popen([sys.executable, "-c", "from raee_server.cli.main import main; main()", *base, "ingest",
                             "--task", "sentiment", str(data)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    sql = create_engine(f"sqlite:///{tmp_path / 'data' / 'metadata.sqlite'}")
    deadline = time.monotonic() + 120
    while True:
        with sql.connect() as conn:
            done = conn.execute(text("SELECT count(*) FROM exit_records WHERE status='committed'")).scalar()
        if done and done >= 100:
            break
        assert proc.poll() is None and time.monotonic() < deadline, "ingest ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with sql.connect() as conn:
        partial = conn.execute(text("SELECT count(*) FROM exit_records")).scalar()
    assert 100 <= partial < 600  # it really was part-way
    rerun = runner.invoke(cli, [*base, "ingest", "--task", "sentiment", str(data)])
    assert rerun.exit_code == 0, rerun.output
    check = runner.invoke(cli, [*base, "doctor"])
    assert check.exit_code == 0 and "sentiment: consistent: 600 committed rows, 600 vectors, 0 pending" in check.output
