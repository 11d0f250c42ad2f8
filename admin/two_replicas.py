"""Two raee-server replicas in one process, over one Postgres and one in-memory Qdrant client, for a
machine with no Qdrant server (this one): the replicas share the vector store as two processes
share a Qdrant server. Each replica has its own name, address, model worker, background loop and
leases, exactly as `raee-server` runs them. Usage (from the checkout; settings from RAEE_* as usual):

    .venv/bin/python admin/two_replicas.py POSTGRES_URL [--ingest TASK=FILE:ROWS] [--ports 50061,50062]

`--ingest` builds the task's records first (a local ingest through the first replica's engine);
the replicas' background loops then race to fit its heads and tune `auto` (one wins the lease).
Then, from another shell: `raee-admin loadtest --server 127.0.0.1:50061 --server 127.0.0.1:50062
--task sst2 corpora/sst2/dev.tsv`. Stops on SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import signal
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from raee_server.bench.harness import build
from raee_server.cli.assets import task_spec
from raee_server.core.engine import Engine
from raee_server.serving.server import RaeeServer
from raee_server.settings import Settings


def ensure_database(url: str) -> None:
    """Create the Postgres database of `url` if it does not exist yet."""
    parsed = make_url(url)
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if not conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": parsed.database}).first():
            conn.execute(text(f'CREATE DATABASE "{parsed.database}"'))
    admin.dispose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database_url")
    parser.add_argument("--ingest", help="TASK=FILE:ROWS, e.g. sst2=corpora/sst2/train.tsv:400")
    parser.add_argument("--ports", default="50061,50062")
    args = parser.parse_args()
    ensure_database(args.database_url)
    engines: list[Engine] = []
    servers: list[RaeeServer] = []
    for i, port in enumerate(args.ports.split(",")):
        settings = Settings(database_url=args.database_url, qdrant_url=":memory:", address=f"127.0.0.1:{port}",
                            http_address="", metrics_port=-1, replica_id=f"replica-{i + 1}")
        engine = Engine.open(settings)
        if engines:  # the first replica's store object over its in-memory client: what a server would share
            engine.vectors.close()
            shared = copy.copy(engines[0].vectors)
            shared._shard_keys = set()  # type: ignore[attr-defined]
            engine.vectors = shared
        engines.append(engine)
        servers.append(RaeeServer(settings, lambda e=engine: e))
    if args.ingest:
        task, _, where = args.ingest.partition("=")
        file, _, rows = where.rpartition(":")
        spec = task_spec(task)
        if spec is None:
            raise SystemExit(f"no shipped task spec {task!r}")
        if task not in [i.spec.name for i in engines[0].metadata.list_tasks()]:
            engines[0].create_task(spec)
        build(engines[0], task, Path(file), int(rows))
    for server in servers:
        await server.start()
        await server.wait_ready()
        print(f"{server.servicer.replica} serving on 127.0.0.1:{server.port}", flush=True)
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stopping.set)
    await stopping.wait()
    for server in servers:
        await server.stop()


if __name__ == "__main__":
    asyncio.run(main())
