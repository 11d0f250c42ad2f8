"""Server logs: JSON lines with one access line per RPC carrying the client's request id."""

from __future__ import annotations

import json
import os
from pathlib import Path

import grpc

from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.protos.raee.v1 import raee_pb2_grpc as pb_grpc
from raee_server.serving.logs import request_id

from .processes import free_port, sentiment_task, start_server
from .test_engine import ROWS
from .tiny_models import save_tiny_backbone


def test_request_ids_are_taken_when_sane_and_made_otherwise() -> None:
    assert request_id([("x-request-id", "abc-123")]) == "abc-123"
    made = request_id([("x-request-id", "bad id\nwith a newline")])
    assert made != "bad id\nwith a newline" and len(made) == 32
    assert request_id(None) != request_id(None)


def test_json_logs_have_one_access_line_per_rpc_with_its_request_id(tmp_path: Path) -> None:
    model = save_tiny_backbone(tmp_path / "model")
    base = ["--data-dir", str(tmp_path / "data"), "--backbone", str(model), "--encoder", "hashing:32"]
    address, log = f"127.0.0.1:{free_port()}", tmp_path / "server.log"
    proc = start_server(base, address, {**os.environ, "RAEE_LOG_FORMAT": "json"}, log=log)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.RaeeServiceStub(channel)
            sentiment_task(stub, "t", ROWS)
            reply, call = stub.Classify.with_call(pb.ClassifyRequest(task="t", text="a great movie"),
                                                  metadata=[("x-request-id", "req-42")], timeout=60)
            assert ("x-request-id", "req-42") in call.trailing_metadata()
            try:
                stub.Classify(pb.ClassifyRequest(task="nope", text="x"), metadata=[("x-request-id", "req-43")])
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
                assert ("x-request-id", "req-43") in exc.trailing_metadata()
            _, made = stub.GetTask.with_call(pb.GetTaskRequest(name="t"))
            generated = dict(made.trailing_metadata())["x-request-id"]
    finally:
        proc.terminate()
        proc.wait(60)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]  # every line is JSON
    access = [line for line in lines if line["logger"] == "raee.access"]
    mine = [line for line in access if line["request_id"] == "req-42"]
    assert len(mine) == 1 and mine[0]["method"] == "Classify" and mine[0]["code"] == "OK"
    assert mine[0]["task"] == "t" and mine[0]["exit_layer"] == reply.exit_layer and mine[0]["duration_ms"] > 0
    assert [line["code"] for line in access if line["request_id"] == "req-43"] == ["NOT_FOUND"]
    assert [line["method"] for line in access if line["request_id"] == generated] == ["GetTask"]
    assert not any(line["logger"].startswith("alembic") and line["level"] == "INFO" for line in lines)
