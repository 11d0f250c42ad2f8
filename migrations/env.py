"""Alembic environment, the same scripts for both ways in.

- `raee-admin migrate` and a server's first start (raee_server.stores.migrate) hand it an open connection
  in `config.attributes["connection"]`.
- `alembic upgrade head` / `alembic revision --autogenerate` from the repository root (alembic.ini) get the
  database from the service's own settings: RAEE_DATABASE_URL, else the SQLite file in RAEE_DATA_DIR.
"""

from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from raee_server.settings import Settings
from raee_server.stores.sql import Base, open_engine

config = context.config
target_metadata = Base.metadata
if config.config_file_name is not None:  # the alembic command line: its progress lines, as alembic.ini sets them
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    """An explicit `sqlalchemy.url` (`alembic -x` users, the programmatic config), else the service's."""
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    settings = Settings()
    if not settings.database_url:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings.sql_url


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        migrate(connection)
        return
    engine = open_engine(database_url())
    try:
        with engine.connect() as connection:
            migrate(connection)
    finally:
        engine.dispose()


def migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite cannot ALTER most things; batch mode copies the table instead
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
