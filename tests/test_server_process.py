"""`raee-server` as its own process: CLI talking to it, the embedded-store lock, SIGTERM with work in flight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.protos.raee.v1 import raee_pb2_grpc as pb_grpc

from .conftest import admin_cli, write_tsv
from .processes import free_port, sentiment_task, start_server
from .test_cli import SPEC
from .test_engine import ROWS
from .tiny_models import save_tiny_backbone


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, list[str]]]:
    model = save_tiny_backbone(tmp_path / "model")
    base = ["--data-dir", str(tmp_path / "data"), "--backbone", str(model), "--encoder", "hashing:32"]
    address = f"127.0.0.1:{free_port()}"
    proc = start_server(base, address, {**os.environ, "RAEE_MAX_BATCH_SIZE": "4", "RAEE_GRACE_SECONDS": "20"})
    yield proc, address, base
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_cli_through_the_server_and_the_store_lock(server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, address, _ = server
    run = admin_cli(tmp_path / "data", tmp_path / "model")

    assert f"{address}: SERVING" in run("health", "--server", address)
    (tmp_path / "s.toml").write_text(SPEC)
    assert "created task sentiment" in run("task", "create", "--file", str(tmp_path / "s.toml"), "--server", address)
    data = write_tsv(tmp_path / "d.tsv", ROWS[:5] + [("meh", "neutral")] + ROWS[5:])
    out = run("ingest", "--task", "sentiment", str(data), "--server", address, code=1)
    assert "added 10, already present 0, rejected 1" in out and f"{data}:7: rejected: unknown label" in out
    out = run("classify", "--task", "sentiment", "--server", address, "a great film")
    assert "exit" in out and "/4" in out
    # --server before the command, as the README writes it, for every command that reads or writes state
    listed = json.loads(run("--server", address, "task", "list", "--json"))
    assert listed == [{"name": "sentiment", "records": 10, "labels": ["negative", "positive"]}]
    shown = json.loads(run("--server", address, "task", "show", "sentiment"))
    assert shown["name"] == "sentiment" and shown["records"] == "10" and shown["label_records"]["positive"] == "5"
    assert "exit" in run("--server", address, "classify", "--task", "sentiment", "a fine film")
    # Opening the embedded store directly while the server holds it is refused with a pointer to --server.
    out = run("classify", "--task", "sentiment", "a great film", code=4)  # unavailable: the server holds it
    assert "open in another process" in out and "--server" in out
    out = run("index", code=4)  # locally refused, with the pointer to the server's operation ...
    assert "open in another process" in out and "index --server" in out
    assert "points, indexes up to date" in run("index", "--server", address)  # ... which works


def test_sigterm_finishes_work_in_flight_and_exits_cleanly(server) -> None:  # type: ignore[no-untyped-def]
    proc, address, _ = server
    stub = pb_grpc.RaeeServiceStub(grpc.insecure_channel(address))
    sentiment_task(stub, "t", ROWS)
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


@pytest.mark.parametrize("retry", [False, True], ids=["resend", "back-off"])
def test_short_soak_sees_only_answers_or_backpressure(server, retry: bool) -> None:  # type: ignore[no-untyped-def]
    """The short version of the soak benchmark (docs/reliability.md has the long one's figures)."""
    from raee_server.bench.soak import soak

    proc, address, _ = server
    stub = pb_grpc.RaeeServiceStub(grpc.insecure_channel(address))
    sentiment_task(stub, "t", ROWS)
    result = soak(address, "t", clients=8, seconds=4, warmup=1, server_pid=proc.pid, retry=retry)
    assert result.requests > 0  # how many is a benchmark figure (raee-admin soak), not a test
    assert set(result.codes) <= {"OK", "RESOURCE_EXHAUSTED"}, result.codes
    assert result.percentile(99) >= result.percentile(50) > 0
    assert set(result.rss_mb) == {"after_warmup", "end"}
    with pytest.raises(ValueError, match="not a loopback address"):
        soak("10.1.2.3:50051", "t", clients=1, seconds=0.1)


def test_loadtest_compares_policies_in_one_run(server) -> None:  # type: ignore[no-untyped-def]
    from raee_server.bench.soak import compare_policies

    _, address, _ = server
    sentiment_task(pb_grpc.RaeeServiceStub(grpc.insecure_channel(address)), "t", ROWS)
    results = compare_policies(address, "t", [t for t, _ in ROWS], ["paper", "full"], clients=4, seconds=2,
                               sequential=5)
    assert set(results) == {"paper", "full"}
    for r in results.values():
        assert r["errors"] == 0 and r["throughput_rps"] > 0 and r["sequential_p50_ms"] > 0


def test_the_open_loop_load_sends_every_request_at_its_rate_and_draws_latency_against_load(  # type: ignore[no-untyped-def]
        server, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from raee_server.cli.main import cli

    _, address, _ = server
    sentiment_task(pb_grpc.RaeeServiceStub(grpc.insecure_channel(address)), "t", ROWS)
    rows = tmp_path / "texts.tsv"
    rows.write_text("text\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in ROWS))
    out = tmp_path / "openloop"
    run = CliRunner().invoke(cli, ["--json", "loadtest-open", "--server", address, "--task", "t", str(rows),
                                   "--rate", "8", "--rate", "2", "--seconds", "1.5", "--policy", "paper",
                                   "--out", str(out)], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    report = json.loads((out / "openloop.json").read_text())["policies"]
    assert [r["offered_rps"] for r in report["paper"]] == [2, 8]  # ascending
    for r in report["paper"]:
        assert r["requests"] == round(r["offered_rps"] * 1.5)  # every one sent, whatever the answers
        assert r["errors"] == 0 and r["codes"] == {"OK": r["requests"]} and r["p99_ms"] >= r["p50_ms"] > 0
    assert (out / "openloop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| paper | 8 |" in (out / "openloop.md").read_text()
    refused = CliRunner().invoke(cli, ["loadtest-open", "--server", "10.1.2.3:50051", "--task", "t", str(rows)])
    assert refused.exit_code != 0 and "not a loopback address" in refused.output
