"""Alembic migrations against SQLite and the real Postgres: up, down, and agreement with the models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect, text

from raee_server.cli.main import cli
from raee_server.errors import StoreMismatch
from raee_server.stores import migrate
from raee_server.stores.metadata import MetadataStore
from raee_server.stores.sql import Base

from .databases import database

TABLES = {"tasks", "ingest_batches", "exit_records", "layer_results"}
ROOT = Path(__file__).resolve().parents[1]


def test_upgrade_to_head_and_downgrade_to_base(database_url: str) -> None:
    engine = create_engine(database_url)
    migrate.upgrade(engine)
    assert set(inspect(engine).get_table_names()) >= TABLES
    assert migrate.current_revision(engine) == migrate.head_revision(engine)
    migrate.check(engine)  # models and migrations agree: autogenerate finds nothing to do
    migrate.downgrade(engine, "base")
    assert not TABLES & set(inspect(engine).get_table_names())
    assert migrate.current_revision(engine) is None
    engine.dispose()


def test_models_drifting_from_migrations_fail_the_check(database_url: str) -> None:
    from sqlalchemy import Column, Integer, Table

    engine = create_engine(database_url)
    migrate.upgrade(engine)
    extra = Table("drift_probe", Base.metadata, Column("id", Integer, primary_key=True))
    try:
        with pytest.raises(Exception, match="drift_probe|New upgrade operations"):
            migrate.check(engine)
    finally:
        Base.metadata.remove(extra)
        engine.dispose()


def test_first_use_migrates_an_empty_database_and_refuses_an_unknown_one(database_url: str) -> None:
    MetadataStore(database_url).close()
    engine = create_engine(database_url)
    assert migrate.current_revision(engine) == migrate.head_revision(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    with pytest.raises(StoreMismatch, match="run `raee-admin migrate`"):
        MetadataStore(database_url)
    engine.dispose()


def test_raee_admin_migrate(tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["--data-dir", str(tmp_path)]
    up = runner.invoke(cli, [*base, "migrate"], catch_exceptions=False)
    assert up.exit_code == 0 and "schema empty -> 0006" in up.output
    down = runner.invoke(cli, [*base, "migrate", "--downgrade", "--revision", "base"], catch_exceptions=False)
    assert down.exit_code == 0 and "0006 -> base" in down.output
    assert not TABLES & set(inspect(create_engine(f"sqlite:///{tmp_path / 'metadata.sqlite'}")).get_table_names())


def schema(url: str) -> dict[str, Any]:
    """Everything a migration decides about a database, in a comparable form."""
    engine = create_engine(url)
    found = inspect(engine)
    out = {
        table: {
            "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in found.get_columns(table)],
            "primary_key": found.get_pk_constraint(table)["constrained_columns"],
            "foreign_keys": sorted((tuple(f["constrained_columns"]), f["referred_table"], f.get("options", {}).get(
                "ondelete")) for f in found.get_foreign_keys(table)),
            "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                              for i in found.get_indexes(table)),
            "unique": sorted(tuple(u["column_names"]) for u in found.get_unique_constraints(table)),
        }
        for table in found.get_table_names()
    }
    with engine.connect() as conn:
        out["revision"] = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    engine.dispose()
    return out


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_alembic_from_the_root_gives_the_schema_raee_admin_migrate_gives(kind: str, tmp_path: Path) -> None:
    """`alembic upgrade head` from the repository root (alembic.ini, migrations/) on RAEE_DATABASE_URL builds
    the very schema `raee-admin migrate` builds: the same scripts, one environment."""
    with database(kind, tmp_path / "by-alembic") as by_alembic, database(kind, tmp_path / "by-admin") as by_admin:
        for folder in ("by-alembic", "by-admin"):
            (tmp_path / folder).mkdir()
        env = {**os.environ, "RAEE_DATABASE_URL": by_alembic, "RAEE_DATA_DIR": str(tmp_path / "unused")}
        alembic = Path(sys.executable).with_name("alembic")
        run = subprocess.run([str(alembic), "upgrade", "head"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr
        assert "Running upgrade 0005 -> 0006" in run.stderr
        assert not (tmp_path / "unused").exists()  # the URL was the one given, not the data dir's SQLite
        admin = CliRunner().invoke(cli, ["migrate"], env={"RAEE_DATABASE_URL": by_admin}, catch_exceptions=False)
        assert admin.exit_code == 0, admin.output
        built = schema(by_alembic)
        assert set(built) >= TABLES and built["revision"] == migrate.head_revision(create_engine(by_admin))
        assert built == schema(by_admin)


def test_downgrades_keep_the_records(database_url: str) -> None:
    """Dropping a column of `tasks` must not rebuild the table: on SQLite, with foreign keys on, a rebuilt
    `tasks` takes every record with it (ON DELETE CASCADE)."""
    from raee_server.types import Label, TaskSpec

    store = MetadataStore(database_url)
    store.create_task(TaskSpec("t", "{text} :", (Label("a", " a"), Label("b", " b"))), "bb", "enc")
    from raee_server.stores.records import ExitRecord, record_id

    store.write_pending("t", [ExitRecord(record_id("t", "x"), "t", "x", "a", 0, ())], None)
    for revision in ("0005", "0004", "0003", "0001"):
        migrate.downgrade(store.engine, revision)
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM exit_records")).scalar() == 1, revision
            assert conn.execute(text("SELECT count(*) FROM tasks")).scalar() == 1, revision
    migrate.upgrade(store.engine)
    store.close()


def test_heads_versions_stored_twice_are_numbered_again_before_they_become_unique(database_url: str) -> None:
    """Two servers fitting at once could store version N twice before 0006; the upgrade numbers a
    task's versions again in the order they were stored, so the newest stays the newest."""
    engine = create_engine(database_url)
    migrate.upgrade(engine, "0005")
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tasks (id, name, template, labels, description, backbone_id, encoder_id, "
                          "created_at, edits) VALUES (1, 't', '{text}', '[]', '', 'b', 'e', '2026-01-01', 0)"))
        for row_id, version in ((1, 1), (2, 2), (3, 2), (4, 3)):
            conn.execute(text("INSERT INTO task_heads (id, task_id, version, fitted_at, summary, data) "
                              "VALUES (:i, 1, :v, '2026-01-01', '{}', :d)"), {"i": row_id, "v": version, "d": b""})
    migrate.upgrade(engine)
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, version FROM task_heads ORDER BY id")).all()
        assert [tuple(r) for r in rows] == [(1, 1), (2, 2), (3, 3), (4, 4)]
        with pytest.raises(Exception, match="(?i)unique"):
            conn.execute(text("INSERT INTO task_heads (task_id, version, fitted_at, summary, data) "
                              "VALUES (1, 4, '2026-01-01', '{}', :d)"), {"d": b""})
    migrate.downgrade(engine, "base")
    engine.dispose()
