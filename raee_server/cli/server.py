"""`raee-server`: serve RAEE classification over gRPC and HTTP/JSON (with the web console).

Every setting is a typed flag, a `RAEE_*` variable or a key of `--config FILE.toml` (cli/config.py).
A bad setting is one line naming it, exit 2; a server that cannot start says why, exit 1."""

from __future__ import annotations

import asyncio
from importlib.metadata import version
from pathlib import Path
from typing import Any

import click

from raee_server.cli.config import load_settings, run_one_line, settings_options
from raee_server.errors import RaeeError
from raee_server.settings import Settings


@click.command(name="raee-server")
@settings_options()
@click.version_option(version("raee-serve"), prog_name="raee-server")
def run(config_file: Path | None, **flags: Any) -> None:
    """Serve RAEE classification over gRPC and HTTP/JSON (with the web console)."""
    serve_until_stopped(load_settings(flags, config_file), "raee-server")


def serve_until_stopped(settings: Settings, prog: str) -> None:
    """Configure logging and serve until SIGTERM/SIGINT (raee-server and `raee-admin serve` alike)."""
    from raee_server.serving import logs
    from raee_server.serving.server import serve

    logs.configure(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except RaeeError as exc:  # a refused setting: one line, no traceback
        raise SystemExit(f"{prog}: cannot start: {exc}") from None


def main(args: list[str] | None = None) -> None:
    run_one_line(run, "raee-server", args)
