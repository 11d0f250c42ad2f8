"""The `auto` policy: chosen on the task's own records, stored with the task, re-tuned as it grows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raee_server.core.auto import choose, needs_tuning, probs_from_sql, tune, validation_rows
from raee_server.core.datafile import read_rows
from raee_server.core.engine import Engine
from raee_server.core.evaluation import Measured
from raee_server.core.groups import group_folds, near_duplicate_groups
from raee_server.core.policies import parse_policy
from raee_server.stores.records import record_id
from raee_server.types import Neighbour

from .conftest import SENTIMENT, write_tsv
from .test_concurrent_writers import corpus
from .test_engine import ROWS


def test_sql_probabilities_keep_what_exit_rules_read() -> None:
    probs = probs_from_sql([("b", 0.7, 0.1), ("a", 0.5, 0.5), ("c", 0.9, 0.05)], ["a", "b", "c"])
    assert probs.argmax(-1).tolist() == [1, 0, 2]
    np.testing.assert_allclose(probs.max(-1), [0.7, 0.5, 0.9])
    np.testing.assert_allclose(probs.sum(-1), 1.0)


def test_best_accuracy_wins_and_ties_go_to_less_depth() -> None:
    labels = ["x", "y"]
    wrong = [Neighbour("n", 0.9, "y", ())]  # the vote is always wrong; no exit evidence
    # Layer 0 wrong, layers 1-3 right; layer 1 right but unconfident.
    probs = np.array([[0.2, 0.8], [0.55, 0.45], [0.9, 0.1], [0.95, 0.05]])
    rows = [Measured(0, probs, wrong) for _ in range(5)]
    ranked = choose(rows, 3, labels, ks=(4,))
    assert ranked[0][:4] == ("static:1", 4, 1.0, 1.0)
    assert [r for r in ranked if r[0] == "full"][0][2] == 1.0  # as accurate, deeper: ranked lower
    assert [r for r in ranked if r[0] == "knn-vote"][0][2] == 0.0


def test_validation_retrieves_leave_one_out(engine: Engine, tmp_path: Path) -> None:
    engine.create_task(SENTIMENT)
    engine.ingest(SENTIMENT.name, read_rows(write_tsv(tmp_path / "d.tsv", ROWS)))
    rows = validation_rows(engine, SENTIMENT.name, 10, 32)
    assert len(rows) == 10 and all(len(r.neighbours) == 9 for r in rows)  # everyone but itself
    ids = {record_id(SENTIMENT.name, t) for t, _ in ROWS}
    assert all({n.id for n in r.neighbours} < ids for r in rows)
    assert all(r.probs.shape == (engine.depth + 1, 2) for r in rows)


def test_near_duplicate_groups_join_contained_texts_and_shared_runs_without_chaining() -> None:
    texts = ["what a great movie , really", "A  great movie", "great movie", "what a great movie , really ok",
             "a great movies", "a completely different sentence about cats", "about cats", "", "great"]
    groups = near_duplicate_groups(texts)
    # contained (3+ words, case and spacing folded) or sharing six words in a row: one group
    assert groups[0] == groups[1] == groups[3]
    # two words are too few to join on ("great movie" sits in many texts), a plural is another word
    assert len({groups[0], groups[2], groups[4], groups[5], groups[6], groups[7], groups[8]}) == 7
    folds = group_folds(np.array([0, 0, 0, 1, 2, 3, 4, 5, 5]), 3)
    assert len(set(folds[:3])) == 1 and folds[7] == folds[8]  # a group never spans two folds
    assert sorted(np.bincount(folds)) == [3, 3, 3]  # and the folds are as even as the groups allow


def test_validation_drops_neighbours_that_are_near_duplicates_of_the_record(engine: Engine, tmp_path: Path) -> None:
    phrases = [("the plot is thin and the acting is worse", "negative"), ("the acting is worse", "negative"),
               ("the plot is thin", "negative"), ("a warm and funny film", "positive"),
               ("warm and funny", "positive"), ("a joy from start to end", "positive"),
               *[(f"review number {i} of a film", "positive" if i % 2 else "negative") for i in range(6)]]
    engine.create_task(SENTIMENT)
    engine.ingest(SENTIMENT.name, read_rows(write_tsv(tmp_path / "q.tsv", phrases)))
    texts = {record_id(SENTIMENT.name, t): t for t, _ in phrases}
    # Each record's neighbours: every other record except those of its near-duplicate group.
    group = dict(zip((t for t, _ in phrases), near_duplicate_groups([t for t, _ in phrases])))
    expected = sorted(sorted(u for u, _ in phrases if group[u] != group[t]) for t, _ in phrases)
    rows = validation_rows(engine, SENTIMENT.name, len(phrases), 16)
    assert sorted(sorted(texts[n.id] for n in r.neighbours) for r in rows) == expected
    # the long sentence and its two phrases lose each other; the warm film and its phrase each other
    assert sorted(len(e) for e in expected)[:5] == [len(phrases) - 3] * 3 + [len(phrases) - 2] * 2


def test_a_request_never_tunes_and_auto_follows_the_stored_choice(engine: Engine, tmp_path: Path) -> None:
    engine.settings = engine.settings.model_copy(update={"retune_check_seconds": 0.0, "retune_growth": 0.5})
    engine.create_task(SENTIMENT)
    # No policy named is `auto`; with no records and no choice, retrieval has nothing to say: the full model.
    [empty] = engine.classify(SENTIMENT.name, ["a great movie"])
    assert empty.policy == "auto=full (no auto choice yet)" and empty.exit_layer == engine.depth
    rows = corpus(40)
    engine.ingest(SENTIMENT.name, read_rows(write_tsv(tmp_path / "a.tsv", rows[:20])))
    # Before any tuning (and without exit heads) `auto` is the kNN vote, and asking for it stores nothing.
    for named in (None, "", "auto", " auto "):
        assert engine.resolve_policy(SENTIMENT.name, named, None) == (
            parse_policy("knn-vote"), engine.settings.default_k, "auto=knn-vote (no auto choice yet)")
    [untuned] = engine.classify(SENTIMENT.name, ["a great movie"], policy="auto")
    assert untuned.label in SENTIMENT.label_names and untuned.exit_layer == 0
    assert untuned.policy == "auto=knn-vote (no auto choice yet)"
    assert engine.classify(SENTIMENT.name, ["a great movie"], policy="paper")[0].policy == "paper"
    assert engine.task_info(SENTIMENT.name).tuned is None
    assert needs_tuning(engine, SENTIMENT.name)
    choice = tune(engine, SENTIMENT.name)
    stored = engine.task_info(SENTIMENT.name).tuned
    assert stored == choice and choice.records == 20 and 0 <= choice.accuracy <= 1
    served = f"auto={parse_policy(choice.policy).name}"
    assert engine.resolve_policy(SENTIMENT.name, None, None) == (parse_policy(choice.policy), choice.k, served)
    assert engine.classify(SENTIMENT.name, ["a great movie"])[0].policy == served
    engine.ingest(SENTIMENT.name, read_rows(write_tsv(tmp_path / "b.tsv", rows[20:25])))  # +25 %: keep
    assert not needs_tuning(engine, SENTIMENT.name)
    engine.ingest(SENTIMENT.name, read_rows(write_tsv(tmp_path / "c.tsv", rows[25:])))  # +100 %: re-tune
    assert needs_tuning(engine, SENTIMENT.name)
    engine.classify(SENTIMENT.name, ["a great movie"], policy="auto")
    assert engine.task_info(SENTIMENT.name).tuned.records == 20  # the request did not tune
    assert tune(engine, SENTIMENT.name).records == 40 and not needs_tuning(engine, SENTIMENT.name)




def test_auto_takes_the_shallowest_candidate_within_half_a_standard_error() -> None:
    from raee_server.core.auto import pick

    ranked = [("heads:12", 32, 0.92, 12.0), ("cascade:0.01", 32, 0.915, 6.5), ("cascade:0.03", 32, 0.905, 3.0),
              ("heads:2", 32, 0.80, 2.0)]
    # 300 rows: one standard error of 92 % is 1.57 points, half of it 0.78: 91.5 % ties, 90.5 % does not.
    assert pick(ranked, 300)[0] == "cascade:0.01"
    assert pick(ranked, 300, band_se=1.0)[0] == "cascade:0.03"  # the wider band takes the shallower one
    # 30,000 rows: the band is 0.08 points; the more accurate one wins.
    assert pick(ranked, 30_000)[0] == "heads:12"
