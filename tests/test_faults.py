"""Faults: unreachable stores, a vanished SQL database, SIGKILL during online ingest, corrupt data dirs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import create_engine, text

from raee_server.errors import NotReady
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.protos.raee.v1 import raee_pb2_grpc as pb_grpc
from raee_server.stores.vectors import QdrantServerStore

from .databases import fresh_postgres_database
from .grpc_harness import ServerThread
from .processes import free_port, sentiment_task, start_server
from .test_concurrent_writers import corpus
from .test_grpc import code_of, ingest, make_settings, tiny_engine_factory
from .tiny_models import save_tiny_backbone

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health_of(server: ServerThread, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                            timeout=2).status


def wait_for(predicate: Any, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_an_unreachable_qdrant_is_unavailable_quickly() -> None:
    start = time.monotonic()
    with pytest.raises(NotReady, match="unreachable"):
        QdrantServerStore(f"http://127.0.0.1:{free_port()}", "c", 8, timeout=2)
    assert time.monotonic() - start < 5


class FlakyStore:
    """The real Edge store behind a switch that makes it unreachable (the network fault, isolated)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.down = threading.Event()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if name in ("search", "upsert", "ping", "count") and callable(attr):
            def guarded(*args: Any, **kwargs: Any) -> Any:
                if self.down.is_set():
                    raise NotReady("Qdrant is unreachable: connection refused")
                return attr(*args, **kwargs)
            return guarded
        return attr


def test_store_outage_turns_health_and_answers_then_recovers_without_restart(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, health_interval_seconds=0.1, retry_seconds=0.1)
    inner = tiny_engine_factory(tmp_path, settings)
    attempts = {"n": 0}
    flaky: dict[str, FlakyStore] = {}

    def factory():  # type: ignore[no-untyped-def]
        attempts["n"] += 1
        if attempts["n"] <= 2:  # Qdrant not up yet when the server starts
            raise NotReady("Qdrant is unreachable: connection refused")
        engine = inner()
        flaky["store"] = engine.vectors = FlakyStore(engine.vectors)
        return engine

    server = ServerThread(settings, factory)
    try:
        assert health_of(server) == NOT_SERVING and health_of(server, "liveness") == SERVING  # still loading
        server.wait_ready()  # recovered by retrying, no restart
        assert attempts["n"] == 3 and health_of(server) == SERVING
        ingest(server.stub, "sentiment", corpus(10))
        request = pb.ClassifyRequest(task="sentiment", text="a great movie")
        assert server.stub.Classify(request).label
        flaky["store"].down.set()
        wait_for(lambda: health_of(server) == NOT_SERVING)
        assert health_of(server, "readiness") == NOT_SERVING
        assert health_of(server, "liveness") == SERVING  # a store outage is no reason to restart the process
        start = time.monotonic()
        code, details = code_of(lambda: server.stub.Classify(request, timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE and "unreachable" in details and time.monotonic() - start < 2
        flaky["store"].down.clear()
        wait_for(lambda: health_of(server) == SERVING)
        assert server.stub.Classify(request).label
    finally:
        server.stop()


def test_sql_outage_keeps_classify_answering_and_ingest_fails_cleanly(tmp_path: Path) -> None:
    with fresh_postgres_database() as url:
        settings = make_settings(tmp_path, database_url=url)
        server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
        try:
            server.wait_ready()
            ingest(server.stub, "sentiment", corpus(12))
            request = pb.ClassifyRequest(task="sentiment", text="a great movie")
            before = server.stub.Classify(request)
            engine = server.server.worker.engine
            engine.metadata.engine.dispose()
            admin = create_engine(url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:  # the database goes away under the server
                name = url.rsplit("/", 1)[1]
                conn.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname='{name}'"))
                conn.execute(text(f'ALTER DATABASE "{name}" RENAME TO "{name}_away"'))
            try:
                after = server.stub.Classify(request)
                assert (after.label, after.exit_layer) == (before.label, before.exit_layer)
                code, details = code_of(lambda: ingest(server.stub, "sentiment", corpus(20)[12:]))
                assert code == grpc.StatusCode.UNAVAILABLE and "metadata database" in details, details
                assert engine.vectors.count("sentiment") == 12  # nothing stored half-way
            finally:
                with admin.connect() as conn:
                    conn.execute(text(f'ALTER DATABASE "{name}_away" RENAME TO "{name}"'))
                admin.dispose()
            assert ingest(server.stub, "sentiment", corpus(20)[12:]).added == 8  # and it recovers
        finally:
            server.stop()


def test_sigkill_during_online_ingest_loses_no_acknowledged_example(tmp_path: Path) -> None:
    model = save_tiny_backbone(tmp_path / "model")
    base = ["--data-dir", str(tmp_path / "data"), "--backbone", str(model), "--encoder", "hashing:32"]
    env = {**os.environ, "RAEE_INGEST_BATCH_SIZE": "4"}
    address = f"127.0.0.1:{free_port()}"
    proc = start_server(base, address, env)
    stub = pb_grpc.RaeeServiceStub(grpc.insecure_channel(address))
    sentiment_task(stub, "t", [])
    rows = corpus(400)
    acknowledged: list[tuple[str, str]] = []
    try:
        for i in range(0, len(rows), 10):
            if i == 200:  # half-way, whatever the machine's speed: the kill lands during a later call
                threading.Timer(0.02, lambda: proc.send_signal(signal.SIGKILL)).start()
            ingest(stub, "t", rows[i : i + 10], chunk=10)
            acknowledged += rows[i : i + 10]
    except grpc.RpcError:
        pass
    proc.wait(30)
    assert 0 < len(acknowledged) < len(rows), "the kill must land part-way"
    proc = start_server(base, address, env)  # restarts on the same data directory
    try:
        stub = pb_grpc.RaeeServiceStub(grpc.insecure_channel(address))
        probe = ingest(stub, "t", acknowledged, chunk=50)
        assert probe.added == 0 and probe.already_present == len(acknowledged)  # every acknowledged one is there
        resend = ingest(stub, "t", rows, chunk=50)  # the client re-sends everything
        assert resend.added + resend.already_present == len(rows)
        assert stub.GetTask(pb.GetTaskRequest(name="t")).task.records == len(rows)  # no duplicates
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@pytest.mark.parametrize("damage", ["sqlite", "qdrant"])
def test_a_corrupt_data_dir_stops_the_server_with_a_clear_error(tmp_path: Path, damage: str) -> None:
    model = save_tiny_backbone(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir()
    if damage == "sqlite":
        (data / "metadata.sqlite").write_bytes(b"not a database " * 100)
        expected = "corrupt or not a database"
    else:
        shard = data / "qdrant" / "raee__model__hashing-32"
        shard.mkdir(parents=True)
        (shard / "segments").mkdir()
        expected = "partly written"
    proc = subprocess.run(
        [sys.executable, "-c", "from raee_server.cli.server import main; main()", "--data-dir", str(data),
         "--backbone", str(model), "--encoder", "hashing:32", "--address", f"127.0.0.1:{free_port()}",
         "--metrics-port", "-1", "--http-address", ""], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert expected in proc.stderr and "Traceback" not in proc.stderr.splitlines()[-1]


def test_store_errors_are_classified_by_type_and_edge_messages_in_one_place(tmp_path: Path) -> None:
    import grpc
    import httpx
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    from raee_server.errors import StoreMismatch
    from raee_server.stores.vectors import EdgeVectorStore, already_exists, edge_open_error, unreachable

    class Rpc(grpc.RpcError):
        def __init__(self, code: grpc.StatusCode) -> None:
            self._code = code

        def code(self) -> grpc.StatusCode:
            return self._code

    assert unreachable(Rpc(grpc.StatusCode.UNAVAILABLE)) and unreachable(Rpc(grpc.StatusCode.DEADLINE_EXCEEDED))
    assert unreachable(ResponseHandlingException(ConnectionRefusedError("refused")))
    assert not unreachable(Rpc(grpc.StatusCode.INVALID_ARGUMENT))
    assert not unreachable(ValueError("the word unavailable in a message means nothing"))
    assert already_exists(Rpc(grpc.StatusCode.ALREADY_EXISTS))
    assert already_exists(UnexpectedResponse(409, "Conflict", b"", httpx.Headers()))
    assert not already_exists(RuntimeError("already exists"))
    assert isinstance(edge_open_error(tmp_path, RuntimeError("WouldBlock: lock held")), NotReady)
    assert isinstance(edge_open_error(tmp_path, RuntimeError("bad segment")), StoreMismatch)
    # The real case: a second open of the same shard while the first holds its lock.
    first = EdgeVectorStore(tmp_path / "q", "c", 4)
    try:
        with pytest.raises(NotReady, match="open in another process"):
            EdgeVectorStore(tmp_path / "q", "c", 4)
    finally:
        first.close()
