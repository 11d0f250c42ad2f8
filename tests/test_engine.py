"""Ingest and classify through the engine on a tiny model, the Edge store and SQLite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from raee_server.core.datafile import read_rows
from raee_server.core.engine import Engine
from raee_server.core.policies import Decision, PaperPolicy
from raee_server.errors import InvalidInput, TaskExists, TaskNotFound
from raee_server.stores.records import record_id
from raee_server.types import Label, TaskSpec

from .conftest import SENTIMENT, write_tsv

ROWS = [
    ("a great movie", "positive"), ("a wonderful film", "positive"), ("i loved the story", "positive"),
    ("the best acting", "positive"), ("a boring mess", "negative"), ("the worst plot", "negative"),
    ("awful and dull", "negative"), ("i hated it", "negative"), ("very funny", "positive"), ("terrible", "negative"),
]


def ingest_rows(engine: Engine, tmp_path: Path, rows: list[tuple[str, str]], name: str = "d.tsv"):  # type: ignore[no-untyped-def]
    return engine.ingest(SENTIMENT.name, read_rows(write_tsv(tmp_path / name, rows)), source=name)


def test_task_spec_validation_names_the_problem(engine: Engine) -> None:
    labels = (Label("negative", " negative"), Label("positive", " positive"))
    with pytest.raises(InvalidInput, match="no {text} slot"):
        TaskSpec("t", "no slot here", labels)
    with pytest.raises(InvalidInput, match="at least two labels"):
        TaskSpec("t", "{text}", labels[:1])
    with pytest.raises(InvalidInput, match="duplicate label 'negative'"):
        TaskSpec("t", "{text}", (labels[0], labels[0]))
    with pytest.raises(InvalidInput, match="share their first sub-token"):
        engine.create_task(TaskSpec("t", "{text}", (Label("a", " good"), Label("b", " good !"))))
    engine.create_task(SENTIMENT)
    with pytest.raises(TaskExists):
        engine.create_task(SENTIMENT)


def test_ingest_stores_every_exit_in_both_stores(engine: Engine, tmp_path: Path) -> None:
    engine.create_task(SENTIMENT)
    report = ingest_rows(engine, tmp_path, ROWS)
    assert (report.added, report.present, report.rejected) == (len(ROWS), 0, [])
    assert engine.vectors.count(SENTIMENT.name) == len(ROWS) == engine.task_info(SENTIMENT.name).records
    # The payload's exits are exactly the layers the backbone gets right for that row.
    logits = engine.all_exits(SENTIMENT.name, [ROWS[0][0]])[0][0]
    gold = SENTIMENT.label_index(ROWS[0][1])
    expected = [l for l in range(engine.depth + 1) if logits[l].argmax() == gold]
    hits = engine.vectors.search(SENTIMENT.name, engine.encoder.encode([ROWS[0][0]]), 1)[0]
    assert hits[0].id == record_id(SENTIMENT.name, ROWS[0][0])
    assert [l for l, _ in hits[0].exits] == expected
    assert len(engine.metadata.layer_accuracy(SENTIMENT.name)) == engine.depth + 1


def test_ingesting_the_same_file_twice_adds_nothing(engine: Engine, tmp_path: Path) -> None:
    engine.create_task(SENTIMENT)
    ingest_rows(engine, tmp_path, ROWS)
    again = ingest_rows(engine, tmp_path, ROWS + ROWS[:2])  # and duplicates within the file
    assert (again.added, again.present) == (0, len(ROWS) + 2)
    assert engine.vectors.count() == len(ROWS)


def test_bad_rows_are_rejected_by_line_and_the_rest_ingested(engine: Engine, tmp_path: Path) -> None:
    engine.create_task(SENTIMENT)
    rows = ROWS[:3] + [("fine", "neutral"), ("   ", "positive")] + ROWS[3:5]
    report = ingest_rows(engine, tmp_path, rows)
    assert report.added == 5
    assert [(r.line, r.reason.split(" (")[0]) for r in report.rejected] == [
        (5, "unknown label 'neutral'"), (6, "empty text")]
    assert engine.vectors.count(SENTIMENT.name) == 5


def test_classify_exits_where_the_policy_says_and_runs_no_deeper(engine: Engine, tmp_path: Path) -> None:
    engine.create_task(SENTIMENT)
    ingest_rows(engine, tmp_path, ROWS)
    texts = ["a great film", "the worst mess", "i loved it"]
    found, _ = engine.neighbours(SENTIMENT.name, texts, 12)
    expected = [PaperPolicy().decide(n, engine.depth, SENTIMENT.label_names).max_layer for n in found]
    ran: list[int] = []
    for i, layer in enumerate(engine.backbone.layers):
        layer.register_forward_hook(lambda _m, _a, out, i=i: ran.append(i))
    predictions = engine.classify(SENTIMENT.name, texts, policy="paper")
    assert [p.exit_layer for p in predictions] == expected and {p.policy for p in predictions} == {"paper"}
    assert ran == list(range(max(expected)))  # one pass for the batch, no deeper than its last exit
    full = engine.all_exits(SENTIMENT.name, texts)[0]
    for p, lg, e in zip(predictions, full, expected):
        assert p.label == SENTIMENT.labels[int(lg[e].argmax())].name
        assert abs(sum(p.scores) - 1) < 1e-6 and p.depth == engine.depth


def test_fixed_exits_share_one_shrinking_pass(engine: Engine) -> None:
    """Rows with different fixed exits run the layers once for the batch, each row leaving at its
    exit, and get the answer they get alone."""
    engine.create_task(SENTIMENT)
    spec, head = engine._task(SENTIMENT.name)
    texts = ["a great film", "the worst mess of a plot", "i loved it", "bad", "a fine and funny movie"]
    decisions = [Decision(2), Decision(0), Decision(engine.depth), Decision(1), Decision(2)]
    engine.settings = engine.settings.model_copy(update={"forward_batch_size": len(texts)})
    ran: list[tuple[int, int]] = []
    for i, layer in enumerate(engine.backbone.layers):
        layer.register_forward_hook(
            lambda _m, _a, out, i=i: ran.append((i, (out[0] if isinstance(out, tuple) else out).shape[0])))
    probs, exits = engine.forward_at(spec, head, texts, decisions)
    assert exits == [d.max_layer for d in decisions]
    assert ran == [(i, sum(d.max_layer > i for d in decisions)) for i in range(engine.depth)]
    ran.clear()
    for text, d, p in zip(texts, decisions, probs):
        alone, _ = engine.forward_at(spec, head, [text], [d])
        assert np.allclose(alone[0], p, atol=1e-5)
        logits = engine.all_exits(SENTIMENT.name, [text])[0][0, d.max_layer]
        assert int(logits.argmax()) == int(p.argmax())


def test_static_and_full_policies(engine: Engine) -> None:
    engine.create_task(SENTIMENT)  # an empty database is fine for policies that ignore neighbours
    assert [p.exit_layer for p in engine.classify(SENTIMENT.name, ["good"], policy="static:2")] == [2]
    assert engine.classify(SENTIMENT.name, ["good"], policy="full")[0].exit_layer == engine.depth
    assert engine.classify(SENTIMENT.name, ["good"])[0].exit_layer == engine.depth  # no records: no evidence


def test_a_request_is_parsed_and_checked_once(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The examples are checked and put in their one text form once per request, not again when the
    policy is resolved (for a pair task that parses JSON)."""
    from raee_server.types import TaskSpec

    engine.create_task(SENTIMENT)
    calls: list[int] = []
    real = TaskSpec.texts_of
    monkeypatch.setattr(TaskSpec, "texts_of", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    engine.classify(SENTIMENT.name, ["good", "bad"], policy="full")
    assert calls == [1]


def test_classify_errors_name_the_problem(engine: Engine) -> None:
    with pytest.raises(TaskNotFound, match="task 'nope' does not exist"):
        engine.classify("nope", ["good"])
    engine.create_task(SENTIMENT)
    with pytest.raises(InvalidInput, match="text: empty text"):
        engine.classify(SENTIMENT.name, ["  "])
    with pytest.raises(InvalidInput, match=r"text\[1\]: empty"):
        engine.classify(SENTIMENT.name, ["good", ""])
    with pytest.raises(InvalidInput, match="k: 0 out of range|k: -1 out of range"):
        engine.classify(SENTIMENT.name, ["good"], k=-1)
    with pytest.raises(InvalidInput, match="over the limit"):
        engine.classify(SENTIMENT.name, ["x" * (engine.settings.max_text_chars + 1)])


def test_tasks_are_isolated_tenants(engine: Engine, tmp_path: Path) -> None:
    other = TaskSpec("other", SENTIMENT.template, SENTIMENT.labels)
    engine.create_task(SENTIMENT)
    engine.create_task(other)
    ingest_rows(engine, tmp_path, ROWS[:4])
    engine.ingest("other", read_rows(write_tsv(tmp_path / "o.tsv", ROWS[4:])))
    for task, rows in ((SENTIMENT.name, ROWS[:4]), ("other", ROWS[4:])):
        ids = {record_id(task, t) for t, _ in rows}
        for hits in engine.neighbours(task, [t for t, _ in ROWS], 12)[0]:
            assert {h.id for h in hits} == ids
    engine.delete_task("other")
    assert engine.vectors.count("other") == 0 and engine.vectors.count(SENTIMENT.name) == 4
    with pytest.raises(TaskNotFound):
        engine.task_info("other")


def test_online_and_backbone_free_policies(engine: Engine, tmp_path: Path) -> None:
    engine.create_task(SENTIMENT)
    ingest_rows(engine, tmp_path, ROWS)
    texts = ["a great film", "the worst mess"]
    lens = engine.all_exits(SENTIMENT.name, texts)[0]
    probs = np.exp(lens) / np.exp(lens).sum(-1, keepdims=True)
    ran: list[int] = []
    for i, layer in enumerate(engine.backbone.layers):
        layer.register_forward_hook(lambda _m, _a, _o, i=i: ran.append(i))
    threshold = float(np.median(probs.max(-1)))  # some rows stop early, some later
    predictions = engine.classify(SENTIMENT.name, texts, policy=f"confidence:{threshold}")
    for p, row in zip(predictions, probs):
        expected = next((l for l in range(engine.depth + 1) if row[l].max() >= threshold), engine.depth)
        assert p.exit_layer == expected
        np.testing.assert_allclose(p.scores, row[expected], atol=1e-5)
    assert len(ran) == sum(p.exit_layer for p in predictions)  # each row ran exactly to its exit
    ran.clear()
    voted = engine.classify(SENTIMENT.name, texts, policy="knn-vote")
    assert ran == [] and all(p.exit_layer == 0 for p in voted)  # no layer ran


def test_rows_batched_by_length_get_the_exits_they_would_get_alone(engine: Engine) -> None:
    """Ingest batches rows by token count (less padding): each row's exit logits and features are the
    ones it gets computed alone, in the order the rows came."""
    engine.create_task(SENTIMENT)
    texts = ["good", "the plot of this film is very boring and the acting is awful and sad", "a fine movie",
             "bad", "the story is great fun and the acting is wonderful", "it was not good", "love it"]
    logits, features = engine.all_exits("sentiment", texts)  # forward_batch_size 3, sorted by length
    assert engine.settings.ingest_sort_by_length
    alone = [engine.all_exits("sentiment", [t]) for t in texts]
    assert np.allclose(logits, np.concatenate([a[0] for a in alone]), atol=1e-4)
    assert np.allclose(features.astype(np.float32), np.concatenate([a[1] for a in alone]).astype(np.float32),
                       atol=2e-3)  # float16 storage: one step at these magnitudes
    engine.settings = engine.settings.model_copy(update={"ingest_sort_by_length": False})
    unsorted_logits, _ = engine.all_exits("sentiment", texts)
    assert np.allclose(logits, unsorted_logits, atol=1e-4)
