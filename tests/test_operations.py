"""Long-running operations: the runner's rules (one at a time, cancel, failure codes), and the model
verbs as operations of a real server over gRPC, HTTP and `raee-admin --server`."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from click.testing import CliRunner

from raee_server.cli.main import EXIT_USAGE, cli
from raee_server.client import RaeeClient, operation_result
from raee_server.errors import InvalidInput
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.serving.auth import add_key
from raee_server.serving.operations import Operations, Progress

from .conftest import corpus
from .grpc_harness import ServerThread
from .test_grpc import ingest, make_settings, tiny_engine_factory

State = pb.Operation.State


def test_operations_run_one_at_a_time_and_cancel_and_fail_cleanly() -> None:
    async def scenario() -> None:
        operations = Operations()
        release = asyncio.Event()
        ran: list[str] = []

        async def slow(progress: Progress) -> dict[str, Any]:
            progress("waiting", done=0, total=2)
            ran.append("slow")
            await release.wait()
            progress(advance=2)
            return {"answer": 42}

        async def never(progress: Progress) -> dict[str, Any]:
            ran.append("never")
            return {}

        async def forever(progress: Progress) -> dict[str, Any]:
            ran.append("forever")
            await asyncio.Event().wait()
            return {}

        async def failing(progress: Progress) -> dict[str, Any]:
            raise InvalidInput("policy: no such policy")

        first = operations.start("tune", "a", slow)
        second = operations.start("tune", "b", never)
        third = operations.start("fit-heads", "a", forever)
        fourth = operations.start("evaluate", "a", failing)
        while not ran:
            await asyncio.sleep(0)
        assert first.state == State.STATE_RUNNING and second.state == third.state == State.STATE_QUEUED  # one at a time
        assert first.message == "waiting" and first.total_units == 2
        assert operations.busy("tune", "a") and not operations.busy("tune", "c")
        operations.cancel(second.name)  # queued: dropped, its body never runs
        assert second.state == State.STATE_CANCELLED and second.done
        release.set()
        await operations.wait(first)
        assert first.state == State.STATE_SUCCEEDED and first.response == {"answer": 42} and first.done_units == 2
        while "forever" not in ran:
            await asyncio.sleep(0)
        operations.cancel(third.name)  # running: its body is cancelled at its await
        await operations.wait(third)
        assert third.state == State.STATE_CANCELLED and third.error is not None
        await operations.wait(fourth)
        assert fourth.state == State.STATE_FAILED and fourth.error is not None
        assert fourth.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "policy" in fourth.error.message
        assert ran == ["slow", "forever"]
        assert [op.name for op in operations.list()] == [fourth.name, third.name, second.name, first.name]
        with pytest.raises(InvalidInput):
            operation_result(fourth.to_proto())
        assert operation_result(first.to_proto()) == {"answer": 42}
        await operations.close()

    asyncio.run(scenario())


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ServerThread, dict[str, str]]]:
    key_file = tmp_path / "keys.toml"
    keys = {"admin": add_key(key_file, "ops", [], scope="admin"),
            "ingest": add_key(key_file, "team", ["sentiment"], scope="ingest"),
            "reader": add_key(key_file, "reader", ["sentiment"], scope="classify"),
            "other": add_key(key_file, "other", ["other"], scope="ingest")}
    settings = make_settings(tmp_path, api_keys_file=key_file, retune_check_seconds=3600)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    server.wait_ready()

    class Keyed:
        def Ingest(self, messages: Any) -> Any:
            return server.stub.Ingest(messages, metadata=(("x-api-key", keys["admin"]),))

    ingest(Keyed(), "sentiment", corpus(40))
    yield server, keys
    server.stop()


def _client(server: ServerThread, key: str) -> RaeeClient:
    return RaeeClient(f"127.0.0.1:{server.port}", timeout=30, api_key=key)


def test_fit_heads_tune_and_evaluate_run_as_operations_of_the_server(served: tuple[ServerThread, dict[str, str]]
                                                                    ) -> None:
    server, keys = served
    client = _client(server, keys["ingest"])
    seen: list[int] = []
    fitted = client.wait(client.start("FitHeads", pb.FitHeadsRequest(task="sentiment"), "sentiment"),
                         lambda op: seen.append(op.state), poll=0.1)
    assert fitted["version"] == 1 and fitted["records"] == 40
    assert len(fitted["accuracy"]) == server.server.worker.engine.depth + 1  # one head per exit
    assert fitted["auto"]["heads_version"] == 1
    assert seen[-1] == State.STATE_SUCCEEDED
    task = server.stub.GetTask(pb.GetTaskRequest(name="sentiment"), metadata=(("x-api-key", keys["ingest"]),)).task
    assert task.heads.version == 1 and task.auto.heads_version == 1  # stored, and served from now on

    rows = corpus(40)[:12]
    reader = _client(server, keys["reader"])
    report = reader.wait(reader.start("Evaluate", pb.EvaluateRequest(
        task="sentiment", examples=[pb.Example(text=t, label=lb) for t, lb in rows], policies=["heads"]),
        "sentiment"), poll=0.1)
    by_name = {p["policy"]: p for p in report["policies"]}
    assert {"full", "knn-vote"} <= set(by_name) and any(n.startswith("heads") for n in by_name)
    assert by_name["full"]["rows"] == 12
    full = reader.classify("sentiment", [t for t, _ in rows], policy="full")
    assert by_name["full"]["accuracy"] == pytest.approx(
        sum(p.label == lb for p, (_, lb) in zip(full, rows)) / len(rows))  # the same answers as served

    with pytest.raises(InvalidInput, match=r"examples\[1\].label"):
        reader.start("Evaluate", pb.EvaluateRequest(task="sentiment", examples=[
            pb.Example(text="fine", label="positive"), pb.Example(text="fine", label="neutral")]), "sentiment")
    failed = reader.start("Evaluate", pb.EvaluateRequest(
        task="sentiment", examples=[pb.Example(text="fine", label="positive")], policies=["no-such-policy"]),
        "sentiment")
    with pytest.raises(InvalidInput, match="no-such-policy"):
        reader.wait(failed, poll=0.1)
    reader.close()
    client.close()


def test_operation_keys_follow_the_rpc_that_starts_them(served: tuple[ServerThread, dict[str, str]]) -> None:
    server, keys = served
    reader, other, admin = (_client(server, keys[k]) for k in ("reader", "other", "admin"))
    from raee_server.errors import PermissionDenied

    with pytest.raises(PermissionDenied):
        reader.start("FitHeads", pb.FitHeadsRequest(task="sentiment"), "sentiment")  # classify-only key
    with pytest.raises(PermissionDenied):
        reader.start("BuildIndex", pb.BuildIndexRequest())  # admin only
    from raee_server.errors import TaskNotFound

    with pytest.raises(TaskNotFound):  # refused at the start, not queued to fail later
        admin.start("Tune", pb.TuneRequest(task="no-such-task"), "no-such-task")
    assert "no-such-task" not in server.server.accounting.known_tasks
    op = admin.start("Tune", pb.TuneRequest(task="sentiment", validation=8), "sentiment")
    with pytest.raises(PermissionDenied):
        other.operation(op.name)  # another task's key cannot read it ...
    assert op.name not in {o.name for o in other.operations()}  # ... nor list it
    assert op.name in {o.name for o in reader.operations("sentiment")}
    with pytest.raises(PermissionDenied):
        reader.cancel(op.name)  # a task's key reads its operations; cancelling needs what starting needs
    done = admin.wait(op, poll=0.1)
    assert done["choice"]["validation_rows"] == 8
    checked = admin.wait(admin.start("CheckRecords", pb.CheckRecordsRequest(task="sentiment"), "sentiment"), poll=0.1)
    assert checked["healthy"] is True and "40 committed rows" in checked["found"]
    for c in (reader, other, admin):
        c.close()


def test_operations_over_http_and_the_cli(served: tuple[ServerThread, dict[str, str]]) -> None:
    server, keys = served
    headers = {"x-api-key": keys["admin"], "Content-Type": "application/json"}
    base = f"http://127.0.0.1:{server.server.http_port}"

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                         method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read())

    started = call("POST", "/v1/tasks/sentiment:tune", {"validation": 8})
    assert started["kind"] == "tune" and started["task"] == "sentiment"
    deadline = time.monotonic() + 300
    while not (op := call("GET", f"/v1/operations/{started['name']}"))["done"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert op["state"] == "STATE_SUCCEEDED" and op["response"]["choice"]["validation_rows"] == 8
    assert started["name"] in {o["name"] for o in call("GET", "/v1/operations")["operations"]}
    assert call("POST", f"/v1/operations/{started['name']}:cancel", {})["state"] == "STATE_SUCCEEDED"  # done: kept

    runner = CliRunner(env={"RAEE_API_KEY": keys["admin"]})
    address = f"127.0.0.1:{server.port}"
    result = runner.invoke(cli, ["--server", address, "--api-key", keys["admin"], "--json", "fit-heads", "--task",
                                 "sentiment"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["version"] >= 1
    result = runner.invoke(cli, ["--server", address, "--api-key", keys["admin"], "--json", "eval", "--task",
                                 "sentiment", str(write_rows(server))], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert {"full", "knn-vote"} <= {p["policy"] for p in json.loads(result.stdout)["policies"]}
    listed = runner.invoke(cli, ["--server", address, "--api-key", keys["admin"], "--json", "operation", "list"])
    assert {"tune", "fit-heads", "evaluate"} <= {o["kind"] for o in json.loads(listed.stdout)}
    # A verb with no server form is refused when a server is named, never run locally.
    refused = runner.invoke(cli, ["--server", address, "export", "--task", "sentiment", "x.gz"])
    assert refused.exit_code == EXIT_USAGE and "not on a server" in refused.output


def write_rows(server: ServerThread) -> Path:
    path = server.server.settings.data_dir / "dev.tsv"
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{lb}\n" for t, lb in corpus(40)[:8]))
    return path


def test_a_started_operation_outlives_its_client_and_a_cancel_stops_it(served: tuple[ServerThread, dict[str, str]]
                                                                      ) -> None:
    """The CLI can go away (a closed channel, a killed process): the operation goes on and another
    client reads its result. A cancel sent while it is queued or running ends it CANCELLED, and the
    next operation still runs."""
    server, keys = served
    first = _client(server, keys["admin"])
    op = first.start("Tune", pb.TuneRequest(task="sentiment", validation=8), "sentiment")
    first.close()  # disconnects at once
    second = _client(server, keys["admin"])
    assert second.wait(second.operation(op.name), poll=0.1)["choice"]["validation_rows"] == 8
    # A fit's child takes at least a process start: a cancel sent right after the start finds it not done.
    fit = second.start("FitHeads", pb.FitHeadsRequest(task="sentiment", full=True), "sentiment")
    cancelled = second.cancel(fit.name)
    assert cancelled.state in (State.STATE_QUEUED, State.STATE_RUNNING, State.STATE_CANCELLED)
    deadline = time.monotonic() + 300
    while not (now := second.operation(fit.name)).done:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert now.state == State.STATE_CANCELLED and now.error.code == grpc.StatusCode.CANCELLED.value[0]
    from raee_server.errors import RaeeError

    with pytest.raises(RaeeError, match="cancel") as info:
        operation_result(now)
    assert info.value.reason == "CANCELLED"
    task = server.stub.GetTask(pb.GetTaskRequest(name="sentiment"), metadata=(("x-api-key", keys["admin"]),)).task
    assert not task.HasField("heads")  # the cancelled fit stored nothing
    assert second.wait(second.start("Tune", pb.TuneRequest(task="sentiment", validation=8), "sentiment"),
                       poll=0.1)["choice"]["validation_rows"] == 8  # the runner goes on
    second.close()
