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


TRACE = "0af7651916cd43dd8448eb211c80319c"


def test_the_caller_trace_id_reaches_the_access_line_over_grpc_and_through_the_gateway(tmp_path: Path) -> None:
    import http.client

    model = save_tiny_backbone(tmp_path / "model")
    base = ["--data-dir", str(tmp_path / "data"), "--backbone", str(model), "--encoder", "hashing:32"]
    address, log, http_port = f"127.0.0.1:{free_port()}", tmp_path / "server.log", free_port()
    proc = start_server(base, address, {**os.environ, "RAEE_LOG_FORMAT": "json"}, log=log,
                        http_address=f"127.0.0.1:{http_port}")
    parent = f"00-{TRACE}-b7ad6b7169203331-01"
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.RaeeServiceStub(channel)
            sentiment_task(stub, "t", ROWS)
            stub.Classify(pb.ClassifyRequest(task="t", text="a great movie"), timeout=60,
                          metadata=[("x-request-id", "grpc-1"), ("traceparent", parent)])
            zero = "00-" + "0" * 32 + "-b7ad6b7169203331-01"
            stub.Classify(pb.ClassifyRequest(task="t", text="a great movie"), timeout=60,
                          metadata=[("x-request-id", "grpc-2"), ("traceparent", zero)])
        connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
        connection.request("POST", "/v1/tasks/t:classify", body=json.dumps({"text": "a great movie"}),
                           headers={"traceparent": parent.replace(TRACE, TRACE[::-1]), "x-request-id": "http-1"})
        assert connection.getresponse().status == 200
        connection.close()
    finally:
        proc.terminate()
        proc.wait(60)
    access = {line["request_id"]: line for line in map(json.loads, log.read_text().splitlines())
              if line["logger"] == "raee.access"}
    assert access["grpc-1"]["trace_id"] == TRACE
    assert "trace_id" not in access["grpc-2"]  # an all-zero trace id is invalid (W3C): none
    assert access["http-1"]["trace_id"] == TRACE[::-1]  # the gateway forwarded the header


def test_every_line_written_during_a_call_carries_its_ids(capsys) -> None:  # type: ignore[no-untyped-def]
    import logging

    from raee_server.serving import logs

    logs.configure("INFO", "text")
    try:
        logging.getLogger("raee.test").warning("outside")
        token = logs.CALL.set(("req-7", TRACE))
        logging.getLogger("raee.test").warning("inside")
        logs.CALL.reset(token)
        logs.configure("INFO", "json")
        token = logs.CALL.set(("req-8", ""))
        logging.getLogger("raee.test").warning("inside json")
        logs.CALL.reset(token)
    finally:
        logging.getLogger().handlers[:] = []
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("raee.test: outside")
    assert lines[1].endswith(f"raee.test: inside request_id=req-7 trace_id={TRACE}")
    entry = json.loads(lines[2])
    assert entry["request_id"] == "req-8" and "trace_id" not in entry and entry["message"] == "inside json"
