"""Where the tests find a real Postgres and (later) a Qdrant server.

Postgres: RAEE_TEST_DATABASE_URL when set (CI sets it to this machine's server),
else a testcontainers PostgresContainer when a Docker daemon answers a ping,
else the Postgres cases are skipped with the reason.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url


@functools.cache
def docker_available() -> bool:
    try:
        import docker

        return bool(docker.from_env(timeout=3).ping())
    except Exception:
        return False


@functools.cache
def postgres_server_url() -> str | None:
    url = os.environ.get("RAEE_TEST_DATABASE_URL")
    if url:
        return url
    if docker_available():
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:16-alpine", driver="psycopg")
        container.start()
        import atexit

        atexit.register(container.stop)
        return container.get_connection_url()
    return None


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A new, empty database on the test server, dropped afterwards: tests never share state."""
    server = postgres_server_url()
    if server is None:
        pytest.skip("no Postgres: set RAEE_TEST_DATABASE_URL or run a Docker daemon")
    name = f"raee_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"))
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@contextmanager
def database(kind: str, tmp_path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'metadata.sqlite'}"
    else:
        with fresh_postgres_database() as url:
            yield url
