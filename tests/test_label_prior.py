"""When the records' label mix is not the traffic's: the mix is shown, `auto` tunes for balanced
accuracy, and the neighbours' votes are weighed toward the expected shares."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from raee_server.core import auto
from raee_server.core.datafile import read_rows
from raee_server.core.engine import Engine
from raee_server.core.policies import label_vote
from raee_server.errors import InvalidInput
from raee_server.types import Label, Neighbour, TaskSpec

from .conftest import SENTIMENT, task_data, write_tsv
from .tiny_models import save_tiny_backbone

POSITIVE = ["a great movie", "a wonderful film", "i loved the story", "the best acting", "very funny",
            "a joy to watch", "warm and witty", "brilliant work"]
NEGATIVE = ["a boring mess", "the worst plot"]
SKEWED = [(t, "positive") for t in POSITIVE] + [(t, "negative") for t in NEGATIVE]


def test_the_vote_weighs_each_neighbour_by_its_labels_correction() -> None:
    same = [Neighbour(str(i), 0.5, "positive", ()) for i in range(4)] + [Neighbour("n", 0.5, "negative", ())]
    assert label_vote(same, ["negative", "positive"]).tolist() == pytest.approx([0.2, 0.8])
    # 4 to 1 in numbers; with the records 80 % positive, each negative counts 4x as much as a positive
    weighed = [Neighbour(n.id, n.similarity, n.label, n.exits, 0.625 if n.label == "positive" else 2.5)
               for n in same]
    assert label_vote(weighed, ["negative", "positive"]).tolist() == pytest.approx([0.5, 0.5])


def test_engine_weights_follow_the_records_mix_and_the_declared_shares(engine: Engine, tmp_path: Path) -> None:
    engine.settings = engine.settings.model_copy(update={"retune_check_seconds": 0.0})
    engine.create_task(SENTIMENT)
    engine.ingest(SENTIMENT.name, read_rows(write_tsv(tmp_path / "s.tsv", SKEWED)))
    info = engine.task_info(SENTIMENT.name)
    assert info.label_records == {"positive": 8, "negative": 2} and info.imbalanced
    # equal expected shares: 0.5 / 0.8 and 0.5 / 0.2
    assert engine.label_weights(SENTIMENT.name) == pytest.approx({"positive": 0.625, "negative": 2.5})
    found, _ = engine.neighbours(SENTIMENT.name, ["a boring film"], 10)
    assert {n.label: n.weight for n in found[0]} == pytest.approx({"positive": 0.625, "negative": 2.5})

    declared = TaskSpec("declared", SENTIMENT.template, (Label("negative", " negative", 0.2),
                                                         Label("positive", " positive", 0.8)))
    engine.create_task(declared)
    engine.ingest("declared", read_rows(write_tsv(tmp_path / "s.tsv", SKEWED)))
    assert not engine.task_info("declared").imbalanced  # the records match the declared traffic
    assert engine.label_weights("declared") == pytest.approx({"positive": 1.0, "negative": 1.0})

    off = TaskSpec("off", SENTIMENT.template, SENTIMENT.labels, prior_correction=False, objective="accuracy")
    engine.create_task(off)
    engine.ingest("off", read_rows(write_tsv(tmp_path / "s.tsv", SKEWED)))
    assert engine.label_weights("off") == {}
    found, _ = engine.neighbours("off", ["a boring film"], 10)
    assert {n.weight for n in found[0]} == {1.0}
    stored = engine.task_info("off").spec
    assert (stored.objective, stored.prior_correction) == ("accuracy", False)


def test_auto_scores_candidates_by_the_tasks_objective(engine: Engine, tmp_path: Path) -> None:
    engine.create_task(SENTIMENT)
    engine.ingest(SENTIMENT.name, read_rows(write_tsv(tmp_path / "s.tsv", SKEWED)))
    rows = auto.validation_rows(engine, SENTIMENT.name, 10, 8)
    labels = SENTIMENT.label_names
    by_accuracy = {r[0]: r[2] for r in auto.choose(rows, engine.depth, labels, ks=(8,), objective="accuracy")}
    balanced = {r[0]: r[2] for r in auto.choose(rows, engine.depth, labels, ks=(8,))}
    # the same policy, scored two ways; a constant answer scores 0.5 balanced whatever the mix
    assert by_accuracy.keys() == balanced.keys() and by_accuracy != balanced
    choice = auto.tune(engine, SENTIMENT.name, validation=10)
    assert choice.objective == "balanced_accuracy"


@pytest.mark.parametrize(("labels", "error"), [
    ([{"name": "a", "share": 0.5}, {"name": "b"}], "every label a share, or none"),
    ([{"name": "a", "share": 0.7}, {"name": "b", "share": 0.7}], "sum to 1.400"),
    ([{"name": "a", "share": "half"}, {"name": "b", "share": 0.5}], r"labels\[0\].share must be a number"),
    ([{"name": "a", "share": 0.0}, {"name": "b", "share": 1.0}], r"a number in \(0, 1\]"),
])
def test_bad_shares_are_refused_naming_the_field(labels: list[dict[str, object]], error: str) -> None:
    with pytest.raises(InvalidInput, match=error):
        TaskSpec.from_dict({"name": "t", "template": "{text}", "labels": labels})


def test_bad_objective_and_switch_are_refused() -> None:
    base = {"name": "t", "template": "{text}", "labels": [{"name": "a"}, {"name": "b"}]}
    with pytest.raises(InvalidInput, match="objective 'f1' is not one of"):
        TaskSpec.from_dict({**base, "objective": "f1"})
    with pytest.raises(InvalidInput, match="prior_correction must be true or false"):
        TaskSpec.from_dict({**base, "prior_correction": "yes"})


def test_task_show_reports_the_mix_as_json_and_warns_on_stderr(tmp_path: Path) -> None:
    from raee_server.cli.main import cli

    model_dir = save_tiny_backbone(tmp_path / "model")
    base = ["--data-dir", str(tmp_path / "data"), "--backbone", str(model_dir), "--encoder", "hashing:32"]
    runner = CliRunner()
    spec = tmp_path / "t.toml"
    spec.write_text('name = "sentiment"\ntemplate = "review : {text} . sentiment :"\n'
                    'labels = [{name = "negative", word = " negative"}, {name = "positive", word = " positive"}]\n')
    assert runner.invoke(cli, [*base, "task", "create", "--file", str(spec)]).exit_code == 0
    data = write_tsv(tmp_path / "s.tsv", SKEWED)
    assert runner.invoke(cli, [*base, "ingest", "--task", "sentiment", str(data)]).exit_code == 0
    shown = runner.invoke(cli, [*base, "task", "show", "sentiment"])
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.stdout)
    assert report["label_records"] == {"positive": 8, "negative": 2} and report["imbalanced"] is True
    assert report["objective"] == "balanced_accuracy" and report["prior_correction"] is True
    assert "warning: the records' label mix (" in shown.stderr and "corrected toward it" in shown.stderr


def test_skewed_mixes_follow_the_issue_and_draws_hit_them() -> None:
    from raee_server.bench.shift import draw, skewed_shares

    assert skewed_shares({"negative": 45, "positive": 55}) == {"positive": 0.8, "negative": 0.2}
    even = skewed_shares({"a": 100, "b": 95, "c": 105, "d": 100})
    assert even["c"] == 0.55 and even["a"] == even["b"] == even["d"] == pytest.approx(0.15)
    uneven = skewed_shares({"a": 400, "b": 200, "c": 100})
    assert uneven["a"] / uneven["b"] == pytest.approx(4.0)  # (400 / 200) squared
    examples = [(f"{label}{i}", f"text {label} {i}", label) for label in "ab" for i in range(30)] + \
               [(f"c{i}", f"text c {i}", "c") for i in range(5)]
    drawn = draw(examples, {"a": 0.5, "b": 0.3, "c": 0.2}, 50)
    mix = {label: sum(1 for e in drawn if e[2] == label) for label in "abc"}
    assert len(drawn) == 50 == len({e[0] for e in drawn}) and mix["c"] == 5  # c gives all it has; a, b fill
    assert mix["a"] > mix["b"] > mix["c"]


def test_bench_shift_draws_both_databases_and_reports_every_policy_both_ways(tmp_path: Path) -> None:
    from raee_server.cli.main import cli

    model = save_tiny_backbone(tmp_path / "model")
    task_data(tmp_path / "data", 200, train=160)  # one third negative
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [
        "--backbone", str(model), "--encoder", "hashing:32", "bench-shift", "sst2", "--data", str(tmp_path / "data"),
        "--train-rows", "160", "--records", "60", "--dev-rows", "40", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "shift.json").read_text())["tasks"][0]
    assert report["databases"]["skewed"]["label_records"] == {"positive": 48, "negative": 12}
    assert report["databases"]["balanced"]["label_records"] == {"positive": 30, "negative": 30}
    for db in report["databases"].values():
        for variant in ("corrected", "uncorrected"):
            results = db["variants"][variant]
            assert {"full", "paper", "knn-vote", "cascade:0.01", "auto"} <= set(results)
            assert all(0 <= r["balanced_accuracy"] <= 1 for r in results.values())
            # full ignores the neighbours: the correction cannot change it
            assert results["full"] == db["variants"]["uncorrected"]["full"]
            # on traffic with the database's own mix: per-label recalls weighted by its shares
            assert all(0 <= r["records_mix_accuracy"] <= 1 for r in results.values())
        balanced_db = db["variants"]["corrected"]
        assert balanced_db["full"]["records_mix_accuracy"] == pytest.approx(
            balanced_db["full"]["balanced_accuracy"]) or db is report["databases"]["skewed"]
        # each cascade against the best head of the same database, with its interval
        assert [c["policy"] for c in db["cascades"]] == ["cascade:0.01", "cascade:0.02", "cascade:0.03"]
        assert all(c["low"] <= c["balanced_lost"] <= c["high"] for c in db["cascades"])
    assert (out / "shift.png").stat().st_size > 5000 and "| knn-vote |" in (out / "shift.md").read_text()
    assert 0 <= report["adaptation"]["estimate_after"] <= 1 and (out / "adaptation.png").stat().st_size > 5000
    assert 0 <= report["adaptation"]["second_half_majority_label"] <= 1  # the trivial baseline, same stream
    # the issue's measure, with its interval: auto on the skewed database minus auto on the balanced one
    for variant in ("corrected", "uncorrected"):
        gap = report["auto_gap"][variant]
        dbs = report["databases"]
        assert gap["gap"] == pytest.approx(dbs["skewed"]["variants"][variant]["auto"]["balanced_accuracy"]
                                           - dbs["balanced"]["variants"][variant]["auto"]["balanced_accuracy"])
        assert gap["low"] <= gap["gap"] <= gap["high"]
    assert "paired bootstrap" in (out / "shift.md").read_text()
    for db in report["databases"].values():  # on all its validation rows, auto picks what it served
        served, on_all = db["variants"]["corrected"]["auto"], db["validation_sizes"][-1]
        assert on_all["chose"] == served["chose"] and on_all["balanced_accuracy"] == served["balanced_accuracy"]


def test_the_paired_gap_of_balanced_accuracy_and_its_interval() -> None:
    from raee_server.core.evaluation import PolicyResult

    gold = [0] * 90 + [1] * 10
    a = PolicyResult("a", 2, gold, [0] * 90 + [1] * 10)  # right everywhere
    b = PolicyResult("b", 2, gold, [0] * 90 + [1] * 5 + [0] * 5)  # half the rare label missed
    gap, low, high = a.balanced_gap(b, 2)
    assert gap == pytest.approx(0.25) and low <= gap <= high
    assert low > 0 and high <= 0.5  # a miss of 5 rare rows in 10 is a real gap, bounded by the label's weight
    assert a.balanced_gap(a, 2) == (0.0, 0.0, 0.0)
    with pytest.raises(InvalidInput, match="same rows"):
        a.balanced_gap(PolicyResult("c", 2, gold[::-1], gold[::-1]), 2)


def test_paired_bootstrap_intervals_match_a_row_by_row_resampling() -> None:
    """The vectorised bootstrap draws the same rows as a plain loop over draws would, and scores them alike."""
    from raee_server.core.evaluation import PolicyResult, _balanced

    rng = np.random.default_rng(5)
    gold = rng.integers(0, 3, 300)
    a = PolicyResult("a", 2, gold.tolist(), np.where(rng.random(300) < 0.8, gold, (gold + 1) % 3).tolist())
    b = PolicyResult("b", 2, gold.tolist(), np.where(rng.random(300) < 0.7, gold, (gold + 2) % 3).tolist())
    draws = np.random.default_rng(0).integers(0, 300, (500, 300))
    pa, pb = np.array(a.predicted), np.array(b.predicted)
    for balanced in (False, True):
        expected = [(_balanced(gold[i], pa[i], 3) - _balanced(gold[i], pb[i], 3)) if balanced else
                    float(np.mean(pa[i] == gold[i]) - np.mean(pb[i] == gold[i])) for i in draws]
        gap, low, high = a.balanced_gap(b, 3, draws=500) if balanced else a.accuracy_gap(b, draws=500)
        assert (low, high) == pytest.approx(tuple(np.percentile(expected, [2.5, 97.5])), abs=1e-12)
        plain = a.balanced_accuracy(3) - b.balanced_accuracy(3) if balanced else a.accuracy - b.accuracy
        assert gap == pytest.approx(plain) and low < gap < high


def calibrated_answers(labels: np.ndarray, rng: np.random.Generator, strength: float = 1.2) -> np.ndarray:
    """Posteriors of a classifier calibrated under equal label shares: p(y|x) = softmax(scores),
    where the score of the row's own label is raised by a noisy margin."""
    scores = rng.normal(size=(len(labels), 2))
    scores[np.arange(len(labels)), labels] += strength
    e = np.exp(scores)
    return e / e.sum(1, keepdims=True)


def test_the_prior_estimate_follows_a_shift_in_the_traffic_and_helps_after_it() -> None:
    from raee_server.core.prior import PriorTracker

    rng = np.random.default_rng(0)
    tracker = PriorTracker(["negative", "positive"], [0.5, 0.5])
    first = rng.random(500) < 0.5
    tracker.observe(calibrated_answers(first.astype(int), rng))
    assert abs(tracker.estimate[1] - 0.5) < 0.1
    second = (rng.random(500) < 0.9).astype(int)  # the traffic turns 90 % positive
    answers = calibrated_answers(second, rng)
    right_plain = right_adjusted = 0
    for i in range(0, 500, 10):  # the service answers as it learns, ten requests at a time
        batch = answers[i : i + 10]
        right_plain += int((batch.argmax(1) == second[i : i + 10]).sum())
        tracker.observe(batch)
        right_adjusted += int((tracker.adjust(batch).argmax(1) == second[i : i + 10]).sum())
    assert abs(tracker.estimate[1] - 0.9) < 0.1  # within 0.1 of the new mix within 500 requests
    assert right_adjusted > right_plain  # and better answers on the second half
    assert tracker.updated_at and tracker.seen == 1000


def test_the_prior_estimate_is_bounded_against_a_burst() -> None:
    from raee_server.core.prior import PriorTracker

    rng = np.random.default_rng(1)
    tracker = PriorTracker(["a", "b"], [0.5, 0.5], max_ratio=2.0)
    tracker.observe(calibrated_answers(rng.integers(0, 2, 60), rng))
    assert not tracker.active and tracker.ratio().tolist() == [1.0, 1.0]  # too few answers to act on
    tracker.observe(calibrated_answers(rng.integers(0, 2, 440), rng))
    tracker.observe(calibrated_answers(np.ones(50, dtype=int), rng, strength=4.0))  # a burst of one label
    assert tracker.estimate[1] < 0.65  # diluted by the window
    tracker.observe(calibrated_answers(np.ones(500, dtype=int), rng, strength=4.0))
    assert tracker.ratio()[0] == 0.5  # a label's weight never falls below 1 / max_ratio


def test_a_task_that_adapts_shows_its_estimate_and_answers_with_it(engine: Engine, tmp_path: Path) -> None:
    adapting = TaskSpec("adapting", SENTIMENT.template, SENTIMENT.labels, adapt_prior=True)
    engine.create_task(adapting)
    engine.ingest("adapting", read_rows(write_tsv(tmp_path / "s.tsv", SKEWED)))
    assert engine.prior_tracker("adapting") is not None and engine.task_info("adapting").spec.adapt_prior
    texts = [f"a great film, number {i}" for i in range(30)]
    for _ in range(4):
        answers = engine.classify("adapting", texts, policy="full")
        assert all(abs(sum(a.scores) - 1) < 1e-6 for a in answers)
    tracker = engine.prior_tracker("adapting")
    assert tracker is not None and tracker.seen == 120 and tracker.active
    assert abs(sum(tracker.estimate) - 1) < 1e-9
    engine.create_task(SENTIMENT)
    assert engine.prior_tracker(SENTIMENT.name) is None  # opt-in
