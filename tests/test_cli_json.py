"""Every `raee-admin` command that reports takes --json and prints one JSON document, nothing else, on
stdout; exit codes tell usage errors, refused input and an unreachable service apart.

The walk is over click's own command tree, so a command added later without --json fails here."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from raee_server.cli.main import EXIT_REFUSED, EXIT_REJECTED, EXIT_UNAVAILABLE, EXIT_USAGE, cli

from .conftest import CORPORA, corpus, task_data, write_tsv
from .processes import free_port, start_server
from .test_cli import SPEC
from .tiny_models import save_tiny_backbone

# Commands that report nothing a script would parse, and why.
NOT_REPORTING = {
    "serve": "runs the server until stopped",
    "demo": "a guided tour: builds the demo database, then prints classify's lines",
    "openapi": "prints the OpenAPI document, which is JSON already",
}


def walk(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, click.Command]]:
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from walk(command, (*prefix, name))
        else:
            yield " ".join((*prefix, name)), command


COMMANDS = dict(walk(cli))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A tiny-model data dir with a task and records, a data root for the benches, and a running server
    (its own data dir) with HTTP on, for the commands that drive one."""
    root = tmp_path_factory.mktemp("cli-json")
    model = save_tiny_backbone(root / "model")
    base = ["--data-dir", str(root / "data"), "--backbone", str(model), "--encoder", "hashing:32"]
    (root / "s.toml").write_text(SPEC)
    task_data(root / "corpora", 120, train=80)
    data = write_tsv(root / "rows.tsv", corpus(40))  # enough records for exit heads
    address, http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    server_base = ["--data-dir", str(root / "served"), "--backbone", str(model), "--encoder", "hashing:32"]
    proc = start_server(server_base, address, dict(os.environ), http_address=http)
    runner = CliRunner()
    runner.invoke(cli, [*server_base[:2], "task", "create", "--file", str(root / "s.toml"), "--server", address],
                  catch_exceptions=False)
    runner.invoke(cli, ["ingest", "--task", "sentiment", str(data), "--server", address], catch_exceptions=False)
    from raee_server.client import RaeeClient
    from raee_server.protos.raee.v1 import raee_pb2 as pb

    client = RaeeClient(address)
    operation = client.start("Tune", pb.TuneRequest(task="sentiment", validation=8), "sentiment").name
    client.close()
    yield {"root": root, "base": base, "data": data, "address": address, "http": http, "operation": operation}
    proc.terminate()
    proc.wait(60)


def invocations(s: dict[str, Any]) -> dict[str, list[str]]:
    """One run per reporting command, in an order where each finds what it needs."""
    root, data, address = s["root"], str(s["data"]), s["address"]
    dev = str(root / "corpora" / "sst2" / "dev.tsv")
    return {
        "migrate": ["migrate"],
        "task create": ["task", "create", "--file", str(root / "s.toml")],
        "ingest": ["ingest", "--task", "sentiment", data],
        "task list": ["task", "list"],
        "task show": ["task", "show", "sentiment"],
        "ingest-batches": ["ingest-batches"],
        "classify": ["classify", "--task", "sentiment", "--neighbours", "a great film", "awful"],
        "eval": ["eval", "--task", "sentiment", data, "--policy", "paper"],
        "tune": ["tune", "--task", "sentiment", "--validation", "8"],
        "fit-heads": ["fit-heads", "--task", "sentiment"],
        "backfill-features": ["backfill-features", "--task", "sentiment"],
        "index": ["index"],
        "doctor": ["doctor"],
        "records relabel": ["records", "relabel", "--task", "sentiment", "--text", corpus(40)[0][0], "--label",
                            "negative" if corpus(40)[0][1] == "positive" else "positive"],
        "records delete": ["records", "delete", "--yes", "--task", "sentiment", "--text", corpus(40)[1][0]],
        "bench-features": ["bench-features", "sst2", "--data", str(root / "corpora"), "--train-rows", "60",
                           "--dev-rows", "20", "--form", "float16", "--form", "codec-8", "--out", str(root / "feat")],
        "bench-fit": ["bench-fit", "--size", "120", "--added", "20", "--exits", "3", "--dim", "8",
                      "--out", str(root / "fit")],
        "key create": ["key", "create", "--name", "ops", "--admin", "--file", str(root / "keys.toml")],
        "key list": ["key", "list", "--file", str(root / "keys.toml")],
        "key revoke": ["key", "revoke", "ops", "--file", str(root / "keys.toml")],
        "bench": ["bench", "sst2", "--data", str(root / "corpora"), "--train-rows", "60", "--dev-rows", "20",
                  "--latency-rows", "2", "--sweep", "k", "--out", str(root / "bench")],
        "bench-shift": ["bench-shift", "sst2", "--data", str(root / "corpora"), "--train-rows", "80", "--records",
                        "40", "--dev-rows", "20", "--out", str(root / "shift")],
        "bench-coverage": ["bench-coverage", "sst2", "--construction", "subtopic", "--data", str(root / "corpora"),
                           "--train-rows", "120", "--rows", "10", "--out", str(root / "coverage")],
        "bench-scale": ["bench-scale", "--size", "300", "--tenants", "3", "--queries", "5"],
        "bench-speed": ["bench-speed", "sst2:30", "--data", str(root / "corpora"), "--out", str(root / "speed")],
        "bench-keys": ["bench-keys", dev, "--limit", "20", "--out", str(root / "keys")],
        "pairs": ["pairs", "--data", str(CORPORA), "--out", str(root / "pairs")],
        "health": ["health", "--server", address],
        "operation list": ["operation", "list", "--server", address],
        "operation show": ["operation", "show", s["operation"], "--server", address],
        "operation cancel": ["operation", "cancel", s["operation"], "--server", address],
        "loadtest": ["loadtest", "--server", address, "--task", "sentiment", data, "--policy", "paper",
                     "--clients", "2", "--seconds", "1", "--sequential", "3"],
        "loadtest-open": ["loadtest-open", "--server", address, "--task", "sentiment", data, "--policy", "paper",
                          "--rate", "4", "--seconds", "0.5", "--out", str(root / "openloop")],
        "soak": ["soak", "--server", address, "--task", "sentiment", "--clients", "2", "--seconds", "1",
                 "--warmup", "0"],
        "bench-transports": ["bench-transports", "--server", address, "--http", s["http"], "--task", "sentiment",
                             dev, "--sequential", "3", "--clients", "2", "--seconds", "1", "--out",
                             str(root / "transports")],
        "export": ["export", "--task", "sentiment", str(root / "sentiment.raee.gz")],
        "task delete": ["task", "delete", "sentiment", "--yes"],
        "import": ["import", str(root / "sentiment.raee.gz")],  # back, as exported
    }


def test_every_reporting_command_takes_json() -> None:
    missing = [name for name, command in COMMANDS.items()
               if name not in NOT_REPORTING and not any(p.name == "as_json" for p in command.params)]
    assert not missing, f"commands without --json: {missing}"


def test_each_reporting_command_prints_one_json_document_and_nothing_else(setup: dict[str, Any]) -> None:
    runs = invocations(setup)
    assert set(runs) == set(COMMANDS) - set(NOT_REPORTING), "a reporting command is not exercised here"
    runner = CliRunner()
    for name, args in runs.items():
        remote = name in ("health", "loadtest", "loadtest-open", "soak", "bench-transports") \
            or name.startswith("operation")
        global_flags = [] if remote else setup["base"]
        if name == "bench-keys":  # its subject is a sentence-transformers key: the packaged MiniLM
            global_flags = [*global_flags[:-1], "minilm"]
        result = runner.invoke(cli, [*global_flags, *args, "--json"], catch_exceptions=False)
        assert result.exit_code == 0, f"{name}: exit {result.exit_code}: {result.output[-2000:]}"
        try:
            document = json.loads(result.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"{name} --json printed more than one JSON document: {result.stdout[:500]!r}") \
                from exc
        assert document not in (None, "", [], {}) or name == "ingest-batches", f"{name}: empty report"
    # `--json` before the command works too (one global flag).
    listed = json.loads(runner.invoke(cli, [*setup["base"], "--json", "task", "list"]).stdout)
    assert {"sentiment", "sst2"} <= {t["name"] for t in listed}


def test_exit_codes_tell_usage_refusal_rejection_and_unavailability_apart(setup: dict[str, Any]) -> None:
    runner = CliRunner()
    base = setup["base"]

    def code(*args: str) -> tuple[int, str]:
        result = runner.invoke(cli, [*base, *args], catch_exceptions=False)
        assert "Traceback" not in result.output
        return result.exit_code, result.output

    assert code("classify", "--nonsense")[0] == EXIT_USAGE
    assert code("classify", "--task", "no-such-task", "hello")[0] == EXIT_REFUSED
    bad = write_tsv(setup["root"] / "bad.tsv", [("fine", "positive"), ("", "negative")])
    code("task", "create", "--file", str(setup["root"] / "s.toml"))
    status, output = code("ingest", "--task", "sentiment", str(bad), "--json")
    assert status == EXIT_REJECTED and json.loads(output.splitlines()[-1])["rejected"][0]["line"] == 3
    status, output = code("--server", f"127.0.0.1:{free_port()}", "task", "list")
    assert status == EXIT_UNAVAILABLE and "UNAVAILABLE" in output
    status, output = code("health", "--server", f"127.0.0.1:{free_port()}", "--timeout", "1", "--json")
    assert status == EXIT_REJECTED and json.loads(output.splitlines()[-1])["status"] == "UNAVAILABLE"
    status, output = code("soak", "--server", "10.1.2.3:50051", "--task", "t", "--seconds", "1")
    assert status == EXIT_REFUSED and "not a loopback address" in output
    code("task", "delete", "sentiment", "--yes")


def test_client_certificate_options_need_each_other(setup: dict[str, Any], tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("not a certificate")
    result = CliRunner().invoke(cli, ["--tls-cert", str(pem), "health", "--server", setup["address"]])
    assert result.exit_code == EXIT_USAGE and "--tls-ca" in result.output


def test_every_server_setting_is_described_with_its_default_in_help() -> None:
    import subprocess
    import sys

    from raee_server.settings import Settings

    shown = subprocess.run([sys.executable, "-c", "from raee_server.cli.server import main; main()", "--help"],
                           capture_output=True, text=True, check=True).stdout
    blocks = {}  # option -> its whole (wrapped) help text
    for block in re.split(r"\n(?=  --)", shown):
        words = block.split()
        blocks[words[0]] = " ".join(words)
    for name, field in Settings.model_fields.items():
        flag = f"--{name.replace('_', '-')}"
        assert flag in blocks, f"{flag} missing from raee-server --help"
        text = blocks[flag]
        assert field.description and "(default: " in text and f"[RAEE_{name.upper()}]" in text, text
        assert "PydanticUndefined" not in text, text
