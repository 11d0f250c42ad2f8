"""Typed configuration (cli/config.py): every setting a typed flag of both CLIs, a TOML file beneath the
variables and flags, one line and exit 2 for a bad value from any of them, --version on both."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from raee_server.cli import config
from raee_server.cli.main import SERVER_TLS, cli
from raee_server.cli.main import main as admin_main
from raee_server.cli.server import main as server_main
from raee_server.cli.server import run
from raee_server.settings import Settings


def one_line_exit_2(capsys: pytest.CaptureFixture[str], call: object, *args: object) -> str:
    """Run a CLI main; it must exit 2 with exactly one line on stderr and nothing on stdout."""
    with pytest.raises(SystemExit) as stopped:
        call(*args)  # type: ignore[operator]
    out, err = capsys.readouterr()
    assert stopped.value.code == 2, err
    lines = err.splitlines()
    assert out == "" and len(lines) == 1, err
    return lines[0]


def help_blocks(command: click.Command) -> dict[str, str]:
    shown = command.get_help(click.Context(command, info_name=command.name))
    return {block.split()[0]: " ".join(block.split()) for block in re.split(r"\n(?=  --)", shown) if block.strip()}


@pytest.mark.parametrize("command, skipped", [(run, ()), (cli, SERVER_TLS)])
def test_every_setting_is_a_typed_flag_with_its_metavar(command: click.Command, skipped: tuple[str, ...]) -> None:
    blocks = help_blocks(command)
    for name, field in Settings.model_fields.items():
        if name in skipped:
            continue
        flag = config.flag_name(name)
        kind = config.click_type(field)
        if kind is None:  # a boolean: a switch with its negation, no value
            assert f"{flag} / --no-{flag[2:]}" in blocks[flag], blocks[flag]
            continue
        text = blocks[flag]
        metavar = {click.INT: "INTEGER", click.FLOAT: "FLOAT", click.STRING: "TEXT"}.get(kind)
        if isinstance(kind, click.Choice):
            metavar = "[" + "|".join(str(c) for c in kind.choices) + "]"
        elif isinstance(kind, click.Path):
            metavar = "PATH"
        assert text.startswith(f"{flag} {metavar} "), text
    assert "--max-k INTEGER" in blocks["--max-k"] and "--log-format [text|json]" in blocks["--log-format"]


def test_a_boolean_is_a_switch_and_an_absent_flag_leaves_the_default() -> None:
    given_flags = run.make_context("raee-server", ["--allow-unauthenticated", "--no-index-on-start"]).params
    assert given_flags["allow_unauthenticated"] is True and given_flags["index_on_start"] is False
    absent = run.make_context("raee-server", []).params
    assert absent["allow_unauthenticated"] is None and absent["max_k"] is None


def test_precedence_is_flag_then_variable_then_file_then_default(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "raee.toml"
    file.write_text('max-k = 7\ndefault_k = 5\nlog_format = "json"\nindex_on_start = false\n'
                    f'data_dir = "{tmp_path / "data"}"\n', encoding="utf-8")
    for name in ("MAX_K", "DEFAULT_K", "LOG_FORMAT", "INDEX_ON_START", "DATA_DIR", "QUEUE_SIZE"):
        monkeypatch.delenv(f"RAEE_{name}", raising=False)
    monkeypatch.setenv("RAEE_DEFAULT_K", "6")
    loaded = config.load_settings({"log_format": "text", "max_k": None}, file)
    assert loaded.max_k == 7  # the file (no flag, no variable)
    assert loaded.default_k == 6  # the variable beats the file
    assert loaded.log_format == "text"  # the flag beats the file
    assert loaded.index_on_start is False and loaded.data_dir == tmp_path / "data"
    assert loaded.queue_size == Settings.model_fields["queue_size"].default  # nothing gave it


def test_the_server_reads_its_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A value from --config reaches the Settings the server would start with (here one it refuses)."""
    monkeypatch.delenv("RAEE_MAX_K", raising=False)
    file = tmp_path / "raee.toml"
    file.write_text('max_k = "many"\n', encoding="utf-8")
    line = one_line_exit_2(capsys, server_main, ["--config", str(file)])
    assert line.startswith("raee-server: error: invalid setting max_k (--config ") and "'many'" in line


@pytest.mark.parametrize("text, named", [
    ("nope = 1\n", "unknown setting 'nope'"),
    ("max_k = [\n", "not TOML"),
    ("max_k = 'x'\n", "max_k (--config"),
    ("log_format = 'yaml'\n", "log_format (--config"),
])
def test_a_bad_config_file_is_one_line_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch, text: str, named: str) -> None:
    monkeypatch.delenv("RAEE_MAX_K", raising=False)
    monkeypatch.delenv("RAEE_LOG_FORMAT", raising=False)
    file = tmp_path / "bad.toml"
    file.write_text(text, encoding="utf-8")
    for call in (server_main, admin_main):
        args = ["--config", str(file)] + (["task", "list"] if call is admin_main else [])
        line = one_line_exit_2(capsys, call, args)
        assert named in line and str(file) in line, line


def test_a_missing_config_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = one_line_exit_2(capsys, server_main, ["--config", str(tmp_path / "none.toml")])
    assert "none.toml" in line


@pytest.mark.parametrize("args", [["--max-k", "abc"], ["--log-format", "yaml"], ["--allow-unauthenticated", "x"],
                                  ["--no-such-flag"], ["--retune-growth", "1,5"]])
def test_a_bad_flag_is_one_line_exit_2(capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    line = one_line_exit_2(capsys, server_main, args)
    assert line.startswith("raee-server: error: ")


def test_a_bad_variable_is_one_line_naming_it_on_both_clis(capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAEE_MAX_K", "abc")
    for call, args, prog in ((admin_main, ["task", "list"], "raee-admin"), (server_main, [], "raee-server")):
        line = one_line_exit_2(capsys, call, args)
        assert line.startswith(f"{prog}: error: invalid setting max_k (RAEE_MAX_K)") and "'abc'" in line, line


def test_version_on_both_clis(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    for call, prog in ((server_main, "raee-server"), (admin_main, "raee-admin")):
        with pytest.raises(SystemExit) as stopped:
            call(["--version"])
        assert stopped.value.code == 0
        assert capsys.readouterr().out.strip() == f"{prog}, version {version('raee-serve')}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.text(max_size=40))
def test_any_unicode_value_is_taken_or_refused_in_one_line(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Every field that does not take any string (numbers, choices, switches): a value from all of
    Unicode is either a valid setting or one line naming the setting, never a traceback."""
    typed = [n for n, f in Settings.model_fields.items() if config.click_type(f) not in (click.STRING, None)
             and not isinstance(config.click_type(f), click.Path)]
    for name in typed:
        try:
            Settings(**{name: value})
        except ValidationError:
            pass
        else:
            continue  # a valid value: nothing to refuse
        with pytest.raises(config.SettingsError) as refused:
            config.load_settings({name: value})
        message = refused.value.format_message()
        assert "\n" not in message and message.startswith(f"invalid setting {name} ("), message
    assume(value not in ("text", "json"))
    line = one_line_exit_2(capsys, server_main, [f"--log-format={value}"])
    assert "--log-format" in line
