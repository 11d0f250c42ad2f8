"""What a benchmark leaves behind: its figures as JSON (with the command that made them), a
markdown report headed by that command, and plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def save(out: Path, name: str, report: dict[str, Any], command: str, title: str,
         body: Sequence[str]) -> list[Path]:
    """<out>/<name>.json and <out>/<name>.md; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    figures, text = out / f"{name}.json", out / f"{name}.md"
    figures.write_text(json.dumps({**report, "command": command}, indent=2) + "\n")
    text.write_text("\n".join([f"# {title}", "", f"Command: `{command}`", "", *body]) + "\n")
    return [figures, text]


def pyplot() -> Any:
    """matplotlib's pyplot drawing to files only (no display on a server)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path
