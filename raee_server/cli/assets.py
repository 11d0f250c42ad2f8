"""What the admin CLI ships inside the package: the task specs and the demo sample. Package data, read
through importlib.resources, so an installed wheel finds them where the checkout does (tests/test_wheel.py)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from raee_server.types import TaskSpec


def _assets() -> Path:
    return Path(str(resources.files("raee_server.cli")))


def task_spec_names() -> list[str]:
    return sorted(path.stem for path in (_assets() / "tasks").glob("*.toml"))


def task_spec(name: str) -> TaskSpec | None:
    """The shipped spec of a task (sst2, agnews, trec, their pair tasks, GLUE's rte and qnli), or None
    where none ships by that name."""
    path = _assets() / "tasks" / f"{name}.toml"
    return TaskSpec.from_toml(path) if name in task_spec_names() else None


def demo_sample() -> Path:
    return _assets() / "demo" / "sst2_sample.tsv"
