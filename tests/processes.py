"""`raee-server` as a separate process on a free localhost port, for tests that signal or kill it."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.protos.raee.v1 import raee_pb2_grpc as pb_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(base: list[str], address: str, env: dict[str, str], timeout: float = 120,
                 metrics_port: int = -1, log: Path | None = None, http_address: str = "") -> subprocess.Popen[bytes]:
    """Start raee-server with `base` flags and wait until its health check says SERVING.

    The server's stderr goes to `log` (default: a temporary file), never to a pipe: nobody reads
    it while the test runs, and a full pipe would block the server at its next log line (it writes
    one access line per RPC). HTTP is off unless `http_address` is given.
    """
    if log is None:
        log = Path(tempfile.mkstemp(prefix="raee-server-", suffix=".log")[1])
    stderr = log.open("wb")
    proc = subprocess.Popen([sys.executable, "-c", "from raee_server.cli.server import main; main()", *base,
                             "--address", address, "--metrics-port", str(metrics_port), "--http-address", http_address],
                            env=env, stderr=stderr)
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + timeout
    while True:
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                return proc
        except grpc.RpcError:
            pass
        if proc.poll() is not None:
            raise AssertionError(log.read_text(errors="replace"))
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.2)


def sentiment_task(stub: pb_grpc.RaeeServiceStub, name: str, rows: list[tuple[str, str]]) -> None:
    """Create a two-label task over gRPC and ingest `rows` into it."""
    stub.CreateTask(pb.CreateTaskRequest(name=name, template="{text} ?", labels=[
        pb.Label(name="negative", word=" negative"), pb.Label(name="positive", word=" positive")]))
    stub.Ingest(iter([pb.IngestRequest(task=name, examples=[pb.Example(text=t, label=l) for t, l in rows])]))
