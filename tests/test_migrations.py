"""Alembic migrations against SQLite and the real Postgres: up, down, and agreement with the models."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect, text

from raee.cli.main import cli
from raee.errors import StoreMismatch
from raee.stores import migrate
from raee.stores.metadata import Base, MetadataStore

TABLES = {"tasks", "ingest_batches", "exit_records", "layer_results"}


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
    assert up.exit_code == 0 and "schema empty -> 0004" in up.output
    down = runner.invoke(cli, [*base, "migrate", "--downgrade", "--revision", "base"], catch_exceptions=False)
    assert down.exit_code == 0 and "0004 -> base" in down.output
    assert not TABLES & set(inspect(create_engine(f"sqlite:///{tmp_path / 'metadata.sqlite'}")).get_table_names())
