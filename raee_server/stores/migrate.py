"""Running the Alembic migrations programmatically (no alembic.ini needed)."""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Engine

from raee_server.errors import StoreMismatch


def alembic_config(engine: Engine) -> Config:
    config = Config()
    config.set_main_option("script_location", str(resources.files("raee_server.migrations")))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return config


def head_revision(engine: Engine) -> str | None:
    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _run(engine: Engine, action: str, revision: str) -> None:
    config = alembic_config(engine)
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        getattr(command, action)(config, revision)


def upgrade(engine: Engine, revision: str = "head") -> None:
    if head_revision(engine) is None:  # else alembic "upgrades" to nothing and reports success
        raise StoreMismatch("this install ships no migrations (raee_server.migrations.versions is empty): reinstall")
    _run(engine, "upgrade", revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    _run(engine, "downgrade", revision)


def check(engine: Engine) -> None:
    """Raise if the SQLAlchemy models and the migrations at head disagree (alembic check)."""
    config = alembic_config(engine)
    with engine.connect() as conn:
        config.attributes["connection"] = conn
        command.check(config)


def ensure_schema(engine: Engine) -> None:
    """Migrate an empty database to head; refuse one at another revision (migrations are an admin act)."""
    current = current_revision(engine)
    head = head_revision(engine)
    if current == head:
        return
    if current is None and not inspect(engine).get_table_names():
        upgrade(engine)
        return
    raise StoreMismatch(
        f"metadata database {engine.url.render_as_string(hide_password=True)} is at schema revision "
        f"{current or 'none (tables without alembic_version)'}, this release needs {head}: run `raee-admin migrate`"
    )
