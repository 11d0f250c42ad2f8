"""`raee-admin` end to end on a tiny model saved as a local checkpoint directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import admin_cli, write_tsv
from .test_engine import ROWS
from .tiny_models import save_tiny_backbone

SPEC = """
name = "sentiment"
template = "What is the sentiment of the sentence '{text}' ? The answer is"
labels = [{ name = "negative", word = " negative" }, { name = "positive", word = " positive" }]
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_backbone(tmp_path_factory.mktemp("tiny-gemma"))


@pytest.fixture
def run(tmp_path: Path, model_dir: Path):  # type: ignore[no-untyped-def]
    return admin_cli(tmp_path / "data", model_dir)


def test_task_create_from_toml_and_flags_then_list(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "s.toml").write_text(SPEC)
    assert "created task sentiment" in run("task", "create", "--file", str(tmp_path / "s.toml"))
    run("task", "create", "topic", "--template", "{text} topic :", "--label", "sports= sports",
        "--label", "business")
    listing = run("task", "list")
    assert "sentiment" in listing and "topic" in listing and "sports, business" in listing
    bad = run("task", "create", "x", "--template", "no slot", "--label", "a", "--label", "b", code=3)
    assert "error: template of task 'x' has no {text} slot" in bad
    assert "Traceback" not in bad


def test_ingest_classify_eval_round_trip(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "s.toml").write_text(SPEC)
    run("task", "create", "--file", str(tmp_path / "s.toml"))
    data = write_tsv(tmp_path / "train.tsv", ROWS[:6] + [("so so", "neutral"), ("", "positive")] + ROWS[6:])
    first = run("ingest", "--task", "sentiment", str(data), code=1)
    assert "added 10, already present 0, rejected 2" in first
    assert f"{data}:8: rejected: unknown label 'neutral'" in first
    assert f"{data}:9: rejected: empty text" in first
    assert "2 row(s) rejected" in first
    assert "indexing the new records" in first
    assert "10 points, indexes up to date" in run("index")
    second = run("ingest", "--task", "sentiment", "--limit", "6", str(data))
    assert "added 0, already present 6, rejected 0" in second

    out = run("classify", "--task", "sentiment", "--json", "a great film", "awful")
    answers = next(json.loads(line) for line in out.splitlines() if line.startswith("["))  # one JSON document
    assert [a["text"] for a in answers] == ["a great film", "awful"]
    assert all(a["label"] in ("negative", "positive") and 0 <= a["exit_layer"] <= a["depth"] == 4 for a in answers)

    dev = write_tsv(tmp_path / "dev.tsv", ROWS[:4])
    report = run("eval", "--task", "sentiment", str(dev), "--policy", "paper", "--policy", "static:1",
                 "--json-out", str(tmp_path / "r.json"))
    assert "paper" in report and "full" in report and "knn-vote" in report and "exit-layer histogram" in report
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [p["policy"] for p in saved["policies"]] == ["paper", "static:1", "full", "knn-vote"]
    assert saved["policies"][1]["exit_histogram"] == [0, 4, 0, 0, 0]
    assert saved["policies"][2]["mean_exit_layer"] == 4 and saved["policies"][2]["layers_saved"] == 0

    # The local ingest tuned `auto` (10 records); eval uses that stored choice and says what it is.
    assert "auto for sentiment:" in first
    shown = json.loads(run("task", "show", "sentiment"))  # one JSON document, nothing else
    chosen = shown["auto"]
    assert sum(shown["label_records"].values()) == shown["records"] and set(shown["exit_accuracy"]) == set("01234")
    run("eval", "--task", "sentiment", str(dev), "--policy", "auto", "--json-out", str(tmp_path / "a.json"))
    policies = [p["policy"] for p in json.loads((tmp_path / "a.json").read_text())["policies"]]
    assert policies[0] == f"auto={chosen['policy']}"


def test_user_mistakes_get_one_line_not_a_traceback(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    missing = run("classify", "--task", "nope", "hello", code=3)
    assert "error: task 'nope' does not exist" in missing
    (tmp_path / "s.toml").write_text(SPEC)
    run("task", "create", "--file", str(tmp_path / "s.toml"))
    assert "error: text: empty text" in run("classify", "--task", "sentiment", " ", code=3)
    bad_header = tmp_path / "bad.tsv"
    bad_header.write_text("sentence\tlabel\nhi\tpositive\n")
    out = run("ingest", "--task", "sentiment", str(bad_header), code=3)
    assert "no column 'text'" in out and "--text-column" in out
    assert "unknown exit policy" in run("classify", "--task", "sentiment", "--policy", "fast", "hi", code=3)
