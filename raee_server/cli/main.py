"""`raee-admin`: manage tasks, ingest labelled data, classify, evaluate, and run the demo.

The group and its shared helpers are in app.py; the verbs, by role, in admin.py, data.py, model.py and
benches.py (importing them registers them on the group). Exit codes and --json: app.py.
"""

from __future__ import annotations

from raee_server.cli import admin, benches, data, model  # noqa: F401  (each registers its verbs)
from raee_server.cli.app import (
    EXIT_REFUSED,
    EXIT_REJECTED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    SERVER_TLS,
    cli,
    exit_code_of,
)
from raee_server.cli.config import run_one_line

__all__ = ["EXIT_REFUSED", "EXIT_REJECTED", "EXIT_UNAVAILABLE", "EXIT_USAGE", "SERVER_TLS", "cli", "exit_code_of",
           "main"]


def main(args: list[str] | None = None) -> None:
    run_one_line(cli, "raee-admin", args)


if __name__ == "__main__":
    main()
