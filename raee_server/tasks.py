"""Task specifications: a prompt template and an ordered set of labels with their label words."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidInput

TEXT_SLOT = "{text}"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Label:
    name: str
    word: str  # the verbaliser; its first sub-token's logit is the label's score


@dataclass(frozen=True)
class TaskSpec:
    name: str
    template: str
    labels: tuple[Label, ...]
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not _NAME_RE.match(self.name):
            raise InvalidInput(
                f"task name {self.name!r}: use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
            )
        if TEXT_SLOT not in self.template:
            raise InvalidInput(f"template of task {self.name!r} has no {TEXT_SLOT} slot: {self.template!r}")
        if len(self.labels) < 2:
            raise InvalidInput(f"task {self.name!r} needs at least two labels, got {len(self.labels)}")
        seen: set[str] = set()
        for label in self.labels:
            if not label.name.strip():
                raise InvalidInput(f"task {self.name!r}: a label has an empty name")
            if not label.word.strip():
                raise InvalidInput(f"task {self.name!r}: label {label.name!r} has an empty label word")
            if label.name in seen:
                raise InvalidInput(f"task {self.name!r}: duplicate label {label.name!r}")
            seen.add(label.name)

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]

    def label_index(self, name: str) -> int:
        """Index of a label by name; raises InvalidInput naming the known labels."""
        for i, label in enumerate(self.labels):
            if label.name == name:
                return i
        raise InvalidInput(f"unknown label {name!r} for task {self.name!r} (known: {', '.join(self.label_names)})")

    def prompt(self, text: str) -> str:
        # str.replace, not str.format: user texts and templates may hold braces.
        return self.template.replace(TEXT_SLOT, text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "template": self.template,
            "description": self.description,
            "labels": [{"name": lb.name, "word": lb.word} for lb in self.labels],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "task spec") -> TaskSpec:
        for key in ("name", "template", "labels"):
            if key not in data:
                raise InvalidInput(f"{source}: missing field {key!r}")
        raw_labels = data["labels"]
        labels: list[Label] = []
        if isinstance(raw_labels, dict):  # {name = word} shorthand
            raw_labels = [{"name": k, "word": v} for k, v in raw_labels.items()]
        if not isinstance(raw_labels, list):
            raise InvalidInput(f"{source}: field 'labels' must be a list of {{name, word}} tables")
        for i, item in enumerate(raw_labels):
            if not isinstance(item, dict) or "name" not in item:
                raise InvalidInput(f"{source}: labels[{i}] needs a 'name' (and a 'word')")
            name = str(item["name"])
            labels.append(Label(name=name, word=str(item.get("word", " " + name))))
        return cls(
            name=str(data["name"]),
            template=str(data["template"]),
            labels=tuple(labels),
            description=str(data.get("description", "")),
        )

    @classmethod
    def from_toml(cls, path: Path) -> TaskSpec:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInput(f"{path}: cannot read task spec: {exc}") from exc
        return cls.from_dict(data, source=str(path))


def parse_label_flag(value: str) -> Label:
    """Parse `name=word` (word with its leading space, e.g. `positive= positive`) or a bare `name`."""
    if "=" in value:
        name, word = value.split("=", 1)
    else:
        name, word = value, " " + value
    return Label(name=name.strip(), word=word)
