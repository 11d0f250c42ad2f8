"""The settings as command-line flags and a TOML file, declared once by `Settings`.

Every `Settings` field becomes a typed click option (a switch for a boolean, a choice for a Literal, a
number, a path) whose help names its default and its `RAEE_*` variable. Precedence, highest first: a
flag, the variable, the `--config` file, the field's default. A bad value from any of them is one line
that names the setting, and exit 2, on both CLIs (`SettingsError`)."""

from __future__ import annotations

import os
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from raee_server.settings import Settings

EXIT_USAGE = 2


class SettingsError(click.UsageError):
    """A setting no source may give: shown as one line naming it, exit 2."""

    exit_code = EXIT_USAGE


def flag_name(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def env_name(name: str) -> str:
    return f"RAEE_{name.upper()}"


def _plain(annotation: Any) -> Any:
    """`X | None` -> X (None means "unset", which a flag expresses by being absent)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def click_type(field: FieldInfo) -> click.ParamType | None:
    """The click type of a field (None for a boolean, which is a switch instead)."""
    kind = _plain(field.annotation)
    if kind is bool:
        return None
    if typing.get_origin(kind) is typing.Literal:
        return click.Choice([str(v) for v in typing.get_args(kind)])
    if kind is Path:
        return click.Path(path_type=Path)
    numbers: dict[Any, click.ParamType] = {int: click.INT, float: click.FLOAT}
    return numbers.get(kind, click.STRING)


def settings_options(skip: Iterable[str] = ()) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: one typed option per Settings field (but `skip`), default None, so an absent flag
    leaves the variable, the config file or the field's default in force; and `--config`."""
    skipped = set(skip)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        for name, field in reversed(list(Settings.model_fields.items())):
            if name in skipped:
                continue
            value = field.get_default(call_default_factory=True)
            default = "unset" if value is None else value
            text = f"{field.description or ''} (default: {default}) [{env_name(name)}]"
            kind = click_type(field)
            if kind is None:
                flag = flag_name(name)
                func = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=text)(func)
            else:
                func = click.option(flag_name(name), name, type=kind, default=None, help=text)(func)
        return click.option("--config", "config_file", type=click.Path(path_type=Path, dir_okay=False),
                            envvar="RAEE_CONFIG", default=None,
                            help="TOML file of settings (field names as keys); flags and RAEE_* variables "
                            "override it [RAEE_CONFIG]")(func)

    return decorate


def read_config(path: Path) -> dict[str, Any]:
    """A TOML file of settings -> {field: value}; an unreadable file or an unknown key is a SettingsError."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsError(f"--config {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"--config {path}: not TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in Settings.model_fields:
            raise SettingsError(f"--config {path}: unknown setting {key!r}")
        values[name] = value
    return values


def load_settings(flags: Mapping[str, Any], config_file: Path | None = None) -> Settings:
    """Settings from flags (None: not given), the environment, the config file and the defaults."""
    values = read_config(config_file) if config_file is not None else {}
    source = {name: f"--config {config_file}" for name in values}
    values = {k: v for k, v in values.items() if env_name(k) not in os.environ}  # a variable beats the file
    given = {k: v for k, v in flags.items() if v is not None}
    values.update(given)
    source.update({name: flag_name(name) for name in given})
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise SettingsError(describe(exc, source)) from None


def describe(exc: ValidationError, source: Mapping[str, str] | None = None) -> str:
    """A ValidationError of Settings as one line: each bad setting, where it came from and why."""
    parts = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else "?"
        origin = (source or {}).get(name) or (env_name(name) if env_name(name) in os.environ else flag_name(name))
        parts.append(f"{name} ({origin}): {error['msg']}, got {error.get('input')!r}")
    return "invalid setting " + "; ".join(parts)


def run_one_line(command: click.Command, prog: str, args: list[str] | None = None) -> None:
    """Run a click command, every usage error shown as one line `prog: error: ...` with exit 2."""
    try:
        code = command.main(args=args, prog_name=prog, standalone_mode=False)
    except click.exceptions.Abort:
        raise SystemExit(1) from None
    except click.ClickException as exc:
        click.echo(f"{prog}: error: {exc.format_message()}", err=True)
        raise SystemExit(exc.exit_code) from None
    raise SystemExit(code if isinstance(code, int) else 0)
