"""`raee-server` as its own process: CLI talking to it, the embedded-store lock, SIGTERM with work in flight."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from grpc_health.v1 import health_pb2, health_pb2_grpc

from admin.cli import cli
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.protos.raee.v1 import raee_pb2_grpc as pb_grpc

from .conftest import write_tsv
from .test_cli import SPEC
from .test_engine import ROWS
from .tiny_models import save_tiny_backbone


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, list[str]]]:
    model = save_tiny_backbone(tmp_path / "model")
    base = ["--data-dir", str(tmp_path / "data"), "--backbone", str(model), "--encoder", "hashing:32"]
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "RAEE_MAX_BATCH_SIZE": "4", "RAEE_GRACE_SECONDS": "20"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from raee_server.grpc_server import main; main()", *base,
         "--address", address, "--metrics-port", "-1"], env=env, stderr=subprocess.PIPE)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + 120
    while True:
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.RpcError:
            pass
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "server exited"
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.2)
    yield proc, address, base
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_cli_through_the_server_and_the_store_lock(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, address, base = server
    runner = CliRunner()

    def run(*args: str, code: int = 0):  # type: ignore[no-untyped-def]
        result = runner.invoke(cli, [*base, *args], catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result.output

    assert f"{address}: SERVING" in run("health", "--server", address)
    (tmp_path / "s.toml").write_text(SPEC)
    assert "created task sentiment" in run("task", "create", "--file", str(tmp_path / "s.toml"), "--server", address)
    data = write_tsv(tmp_path / "d.tsv", ROWS[:5] + [("meh", "neutral")] + ROWS[5:])
    out = run("ingest", "--task", "sentiment", str(data), "--server", address, code=1)
    assert "added 10, already present 0, rejected 1" in out and f"{data}:7: rejected: unknown label" in out
    out = run("classify", "--task", "sentiment", "--server", address, "a great film")
    assert "exit" in out and "/4" in out
    # Opening the embedded store directly while the server holds it is refused with a pointer to --server.
    out = run("classify", "--task", "sentiment", "a great film", code=2)
    assert "open in another process" in out and "--server" in out


def test_sigterm_finishes_work_in_flight_and_exits_cleanly(server) -> None:  # type: ignore[no-untyped-def]
    proc, address, _ = server
    stub = pb_grpc.RaeeStub(grpc.insecure_channel(address))
    stub.CreateTask(pb.CreateTaskRequest(name="t", template="{text} ?", labels=[
        pb.Label(name="negative", word=" negative"), pb.Label(name="positive", word=" positive")]))
    stub.Ingest(iter([pb.IngestRequest(task="t", examples=[pb.Example(text=t, label=l) for t, l in ROWS])]))
    futures = [stub.ClassifyBatch.future(pb.ClassifyBatchRequest(task="t", texts=[f"good film {i}"] * 8))
               for i in range(12)]
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    answers = [f.result(60) for f in futures]  # none lost
    assert all(len(a.results) == 8 for a in answers)
    assert proc.wait(60) == 0
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(pb.ClassifyRequest(task="t", text="hi"), timeout=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_short_soak_sees_only_answers_or_backpressure(server) -> None:  # type: ignore[no-untyped-def]
    """The short version of the soak benchmark (docs/reliability.md has the long one's figures)."""
    from raee_server.soak import soak

    proc, address, _ = server
    stub = pb_grpc.RaeeStub(grpc.insecure_channel(address))
    stub.CreateTask(pb.CreateTaskRequest(name="t", template="{text} ?", labels=[
        pb.Label(name="negative", word=" negative"), pb.Label(name="positive", word=" positive")]))
    stub.Ingest(iter([pb.IngestRequest(task="t", examples=[pb.Example(text=t, label=l) for t, l in ROWS])]))
    result = soak(address, "t", clients=8, seconds=4, warmup=1, server_pid=proc.pid)
    assert result.requests > 20
    assert set(result.codes) <= {"OK", "RESOURCE_EXHAUSTED"}, result.codes
    assert result.percentile(99) >= result.percentile(50) > 0
    assert set(result.rss_mb) == {"after_warmup", "end"}
    with pytest.raises(ValueError, match="not a loopback address"):
        soak("10.1.2.3:50051", "t", clients=1, seconds=0.1)
