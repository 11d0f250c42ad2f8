"""The data the service, its client and its tools share: task specs, labelled rows, answers.

Plain data classes; nothing here imports torch, numpy or a store, so `raee_server.client` can use
them in a process that has only grpcio and protobuf installed.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raee_server.errors import InvalidInput, clip

# Characters that show nothing: separators, controls and format characters (zero-width space,
# word joiner, BOM, bidi marks). A text made only of these is as empty as "".
_INVISIBLE = ("Z", "Cc", "Cf")


def is_blank(text: str) -> bool:
    """True when no character of `text` is visible (all whitespace, controls or format characters)."""
    return all(unicodedata.category(c).startswith(_INVISIBLE) for c in text)


METADATA_KEY = "x-api-key"  # the gRPC metadata entry that carries an API key
TEXT_INPUT = "text"  # the one input of a single-text task
TEXT_SLOT = "{text}"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_INPUT_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_INPUTS = 8
# How a task with several inputs (a sentence pair) makes its retrieval key: "template", the filled
# template, as the paper's code encodes it; "joined", the inputs joined by newlines in declared order;
# "mean", each input encoded alone and the unit keys averaged. Measured in docs/results.md
# ("Sentence pairs"); a single-text task's key is its text.
RETRIEVAL_KEYS = ("template", "joined", "mean")
DEFAULT_RETRIEVAL_KEY = "template"

# One example as a caller gives it: a text, or a task's inputs by name.
Example = str | Mapping[str, str]


def check_text(text: object, where: str, max_chars: int) -> None:
    """The rules every input text meets: visible, no NUL, at most `max_chars` characters."""
    if not isinstance(text, str) or is_blank(text):
        raise InvalidInput(f"{where}: empty text", where)
    if len(text) > max_chars:
        raise InvalidInput(f"{where}: {len(text)} characters, over the limit of {max_chars}", where)
    if "\x00" in text:
        raise InvalidInput(f"{where}: contains a NUL character", where)


def pack_inputs(values: Mapping[str, str]) -> str:
    """An example's inputs as the service's one text form: a lone `text` input is the text itself;
    several are a JSON object, names sorted (what a record stores and its id hashes: the same inputs
    give the same record, in whatever order they came)."""
    if list(values) == [TEXT_INPUT]:
        return values[TEXT_INPUT]
    return json.dumps({k: values[k] for k in sorted(values)}, ensure_ascii=False, separators=(",", ":"))


def unpack_inputs(text: str) -> dict[str, str] | None:
    """`pack_inputs` undone for several inputs: the names and texts of a JSON object of strings (None:
    `text` is not one)."""
    try:
        values = json.loads(text)
    except (ValueError, RecursionError):  # a hostile text may nest deeply
        return None
    if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
        return None
    return values


def truncate(example: Example, max_chars: int) -> Example:
    """The example cut to `max_chars` characters in all: each input keeps its share of the length."""
    if isinstance(example, str):
        return example[:max_chars]
    total = sum(len(v) for v in example.values() if isinstance(v, str))
    if total <= max_chars:
        return example
    return {k: v[: max_chars * len(v) // total] if isinstance(v, str) else v for k, v in example.items()}


def is_task_name(name: str) -> bool:
    """Could name a task (what `TaskSpec.validate` accepts): other strings name none, and a lookup need
    not ask a database (Postgres refuses a NUL in a text parameter)."""
    return bool(_NAME_RE.fullmatch(name))


@dataclass(frozen=True)
class Label:
    name: str
    word: str  # the verbaliser; its first sub-token's logit is the label's score
    share: float | None = None  # the label's expected share of the traffic, where the operator knows it


# What `auto` maximises on its validation rows. Balanced accuracy by default: the records' label
# mix is rarely the traffic's, and plain accuracy rewards answering the records' majority label.
OBJECTIVES = ("balanced_accuracy", "accuracy", "macro_f1")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    template: str
    labels: tuple[Label, ...]
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    objective: str = "balanced_accuracy"  # what `auto` maximises (OBJECTIVES)
    # Weigh the neighbours' votes by (traffic share / records share) of their labels: the declared
    # shares, or equal shares where none are declared. Off: the records' own mix is the prior.
    prior_correction: bool = True
    # Estimate the traffic's label mix from the service's own recent answers (EM, raee_server.core.prior)
    # and re-weight answers toward it. Opt-in: it acts on traffic, not on labelled data.
    adapt_prior: bool = False
    inputs: tuple[str, ...] = (TEXT_INPUT,)  # named inputs, one template slot each (a pair: two)
    retrieval_key: str = DEFAULT_RETRIEVAL_KEY  # how several inputs make one key (RETRIEVAL_KEYS)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not _NAME_RE.fullmatch(self.name):  # fullmatch: `$` would let a final newline through
            raise InvalidInput(
                f"task name {clip(self.name)}: use 1-64 letters, digits, '_', '-' or '.', "
                "starting with a letter or digit"
            )
        if not 1 <= len(self.inputs) <= MAX_INPUTS or len(set(self.inputs)) != len(self.inputs):
            raise InvalidInput(f"task {clip(self.name)}: inputs must be 1 to {MAX_INPUTS} distinct names")
        for name in self.inputs:
            if not isinstance(name, str) or not _INPUT_RE.fullmatch(name) or name == "mask":
                raise InvalidInput(f"task {clip(self.name)}: input name {clip(str(name))}: use 1-32 lowercase "
                                   "letters, digits or '_', starting with a letter ('mask' is the masked LM's slot)")
            if "{" + name + "}" not in self.template:
                raise InvalidInput(f"template of task {clip(self.name)} has no {{{name}}} slot: {clip(self.template)}")
        if self.retrieval_key not in RETRIEVAL_KEYS:
            raise InvalidInput(f"task {clip(self.name)}: retrieval_key {clip(self.retrieval_key)} is not one of "
                               f"{', '.join(RETRIEVAL_KEYS)}")
        if len(self.labels) < 2:
            raise InvalidInput(f"task {clip(self.name)} needs at least two labels, got {len(self.labels)}")
        seen: set[str] = set()
        for label in self.labels:
            if is_blank(label.name):
                raise InvalidInput(f"task {clip(self.name)}: a label has an empty name")
            if is_blank(label.word):
                raise InvalidInput(f"task {clip(self.name)}: label {clip(label.name)} has an empty label word")
            if label.name in seen:
                raise InvalidInput(f"task {clip(self.name)}: duplicate label {clip(label.name)}")
            seen.add(label.name)
        if self.objective not in OBJECTIVES:
            raise InvalidInput(f"task {clip(self.name)}: objective {clip(self.objective)} is not one of "
                               f"{', '.join(OBJECTIVES)}")
        shares = [label.share for label in self.labels]
        if any(s is not None for s in shares):
            if any(s is None for s in shares):
                raise InvalidInput(f"task {clip(self.name)}: give every label a share, or none")
            if not all(isinstance(s, float) and math.isfinite(s) and 0 < s <= 1 for s in shares):
                raise InvalidInput(f"task {clip(self.name)}: a label share must be a number in (0, 1]")
            if abs(sum(s for s in shares if s is not None) - 1) > 0.01:
                raise InvalidInput(f"task {clip(self.name)}: label shares sum to "
                                   f"{sum(s for s in shares if s is not None):.3f}, not 1")

    @property
    def shares(self) -> list[float]:
        """The labels' expected traffic shares: as declared, else equal."""
        if self.labels[0].share is None:
            return [1.0 / len(self.labels)] * len(self.labels)
        total = sum(label.share or 0.0 for label in self.labels)
        return [(label.share or 0.0) / total for label in self.labels]

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]

    def label_index(self, name: str) -> int:
        """Index of a label by name; raises InvalidInput naming the known labels."""
        for i, label in enumerate(self.labels):
            if label.name == name:
                return i
        raise InvalidInput(
            f"unknown label {clip(name)} for task {clip(self.name)} (known: {', '.join(self.label_names)})"
        )

    @property
    def several(self) -> bool:
        """The task takes more than one input (a sentence pair)."""
        return len(self.inputs) > 1

    def prompt(self, text: str) -> str:
        # Not str.format: user texts and templates may hold braces. One pass over the template, so an
        # input that holds another input's slot ("{hypothesis}") is never filled in again.
        if not self.several:
            return self.template.replace(TEXT_SLOT, text)
        values = self.values_of(text)
        slots = re.compile("|".join(re.escape("{" + name + "}") for name in self.inputs))
        return slots.sub(lambda m: values[m.group(0)[1:-1]], self.template)

    def values_of(self, text: str) -> dict[str, str]:
        """A stored text's inputs by name (`pack_inputs` undone)."""
        if not self.several:
            return {TEXT_INPUT: text}
        values = unpack_inputs(text)
        if values is None or sorted(values) != sorted(self.inputs):
            raise InvalidInput(f"task {clip(self.name)} takes the inputs {', '.join(self.inputs)}, by name")
        return values

    def text_of(self, example: Example, where: str, max_chars: int) -> str:
        """A caller's example, checked, as the one text form (`pack_inputs`). `where` names the field
        that holds it ("text", "inputs", "inputs[3].values"); an input's error names it below that. A
        text (not inputs by name) for a task with several inputs must be their packed form (a record's
        text, a neighbour's). `max_chars` bounds each input and all of them together."""
        if isinstance(example, str):
            if not self.several:
                check_text(example, where, max_chars)
                return example
            parsed = unpack_inputs(example)
            if parsed is None:
                raise InvalidInput(f"{where}: task {clip(self.name)} takes the inputs {', '.join(self.inputs)} "
                                   "by name (inputs)", where)
            values = parsed
        else:
            values = dict(example)
        at = (lambda name: f"{where}.{name}") if where else (lambda name: name)
        for name in sorted(values):  # sorted: a map's order is the transport's, the error must not be
            if name not in self.inputs:
                shown = at(name if len(name) <= 40 else name[:37] + "...")  # a path, not an echo of 10 KB
                raise InvalidInput(f"{shown}: task {clip(self.name)} has no input {clip(name)} "
                                   f"(its inputs: {', '.join(self.inputs)})", shown)
        for name in self.inputs:
            if name not in values:
                raise InvalidInput(f"{at(name)}: missing (task {clip(self.name)} takes "
                                   f"{', '.join(self.inputs)})", at(name))
            check_text(values[name], at(name), max_chars)
        total = sum(len(v) for v in values.values())
        if total > max_chars:
            raise InvalidInput(f"{where or 'inputs'}: {total} characters in all inputs, over the limit of "
                               f"{max_chars}", where or None)
        return pack_inputs({name: values[name] for name in self.inputs})

    def texts_of(self, examples: Sequence[Example], field_name: str, max_chars: int) -> list[str]:
        """A request's examples, each by `text_of`. Errors name the field: `text` or `inputs` for one
        example, `text[i]` or `inputs[i].values` for several."""
        if not examples:
            raise InvalidInput(f"{field_name}: no text given", field_name)
        one = len(examples) == 1

        def where(i: int, example: Example) -> str:
            if isinstance(example, str):
                return field_name if one else f"{field_name}[{i}]"
            return "inputs" if one else f"inputs[{i}].values"

        return [self.text_of(ex, where(i, ex), max_chars) for i, ex in enumerate(examples)]

    def key_text(self, text: str) -> str:
        """What one key encodes: the text itself for a single-text task; for several inputs, the filled
        template or the inputs joined (`retrieval_key`; "mean" keys each input: `values_of`)."""
        if not self.several:
            return text
        if self.retrieval_key == "template":
            return self.prompt(text)
        values = self.values_of(text)
        return "\n".join(values[name] for name in self.inputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "template": self.template,
            "description": self.description,
            "labels": [{"name": lb.name, "word": lb.word, **({} if lb.share is None else {"share": lb.share})}
                       for lb in self.labels],
            "objective": self.objective,
            "prior_correction": self.prior_correction,
            "adapt_prior": self.adapt_prior,
            **({"inputs": list(self.inputs), "retrieval_key": self.retrieval_key} if self.several else {}),
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
            share = item.get("share")
            if share is not None and (isinstance(share, bool) or not isinstance(share, int | float)):
                raise InvalidInput(f"{source}: labels[{i}].share must be a number, got {clip(repr(share))}")
            labels.append(Label(name=name, word=str(item.get("word", " " + name)),
                                share=None if share is None else float(share)))
        correction, adapt = data.get("prior_correction", True), data.get("adapt_prior", False)
        for key, value in (("prior_correction", correction), ("adapt_prior", adapt)):
            if not isinstance(value, bool):
                raise InvalidInput(f"{source}: {key} must be true or false, got {clip(repr(value))}")
        inputs = data.get("inputs", [TEXT_INPUT])
        if not isinstance(inputs, list | tuple) or not all(isinstance(name, str) for name in inputs):
            raise InvalidInput(f"{source}: inputs must be a list of names, got {clip(repr(inputs))}")
        return cls(
            name=str(data["name"]),
            template=str(data["template"]),
            labels=tuple(labels),
            description=str(data.get("description", "")),
            objective=str(data.get("objective", "balanced_accuracy")),
            prior_correction=correction,
            adapt_prior=adapt,
            inputs=tuple(inputs) or (TEXT_INPUT,),
            retrieval_key=str(data.get("retrieval_key") or DEFAULT_RETRIEVAL_KEY),
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


# -- labelled rows (from a file or an Ingest stream) --------------------------------


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line of the row's start in the file (the header is line 1)
    text: str
    label: str


@dataclass(frozen=True)
class Rejected:
    line: int
    reason: str


# -- answers -----------------------------------------------------------------------


@dataclass(frozen=True)
class Neighbour:
    """A retrieved exit record: similarity to the query and the layers that predict its label correctly."""

    id: str
    similarity: float  # cosine similarity (Qdrant's score); distance = 1 - similarity
    label: str
    exits: tuple[tuple[int, float], ...]  # (layer, probability of the gold label) for correct layers
    weight: float = 1.0  # prior correction: the label's traffic share over its share of the records


@dataclass
class Prediction:
    label: str
    scores: list[float]  # softmax over the task's label words at the exit layer, in label order
    exit_layer: int
    depth: int
    neighbours: list[Neighbour] = field(default_factory=list)
    timings_us: dict[str, int] = field(default_factory=dict)  # encode, retrieve, forward (shared by a batch)
    labels: list[str] = field(default_factory=list)  # the task's label names, in the order of `scores`
    policy: str = ""  # the policy that answered, e.g. "cascade:0.01" or "auto=cascade:0.01"
    answered_by: str = "backbone"  # "key" (the key head, no layer ran), "retrieval" or "backbone"
    covered: bool | None = None  # the task's records cover the input (None: not checked)


@dataclass
class IngestReport:
    added: int = 0
    present: int = 0
    rejected: list[Rejected] = field(default_factory=list)


@dataclass(frozen=True)
class Choice:
    """The `auto` policy of one task: the policy and k that scored best on the task's own records
    (leave-one-out), and what they scored. Stored with the task; chosen off the request path."""

    policy: str
    k: int
    accuracy: float  # on `validation_rows` records
    mean_exit: float
    validation_rows: int
    records: int  # database size when chosen: auto re-tunes once it has grown by RAEE_RETUNE_GROWTH
    chosen_at: str  # ISO 8601, UTC
    seconds: float  # time the choice took
    heads_version: int = 0  # the exit heads it chose among (0: none); a newer version calls for a new choice
    objective: str = "accuracy"  # what `accuracy` above measures (choices made before objectives: accuracy)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Choice:
        return cls(str(data["policy"]), int(data["k"]), float(data["accuracy"]), float(data["mean_exit"]),
                   int(data["validation_rows"]), int(data["records"]), str(data["chosen_at"]),
                   float(data.get("seconds", 0.0)), int(data.get("heads_version", 0)),
                   str(data.get("objective", "accuracy")))

    def stale(self, records: int, growth: float) -> bool:
        """True once the task has grown by `growth` (a fraction) since this choice was made."""
        return records > self.records * (1 + growth)
