"""The paper's aggregation, step by step, on hand-built neighbours."""

from __future__ import annotations

import numpy as np
import pytest

from raee_server.core.policies import (
    ConfidencePolicy,
    FullPolicy,
    KnnAgreePolicy,
    KnnVotePolicy,
    PaperPolicy,
    StaticPolicy,
    TolerancePolicy,
    label_vote,
    neighbour_weights,
    paper_layer_scores,
    parse_policy,
    resolve_exit,
)
from raee_server.errors import InvalidInput
from raee_server.types import Neighbour

LABELS = ["x", "y"]


def nb(similarity: float, *exits: tuple[int, float], label: str = "x") -> Neighbour:
    return Neighbour(id=f"n{similarity}", similarity=similarity, label=label, exits=tuple(exits))


def test_weights_are_min_distance_over_distance() -> None:
    w = neighbour_weights([nb(0.9), nb(0.8), nb(0.6)])  # distances 0.1, 0.2, 0.4
    np.testing.assert_allclose(w, [1.0, 0.5, 0.25])


def test_pairs_at_or_above_threshold_are_kept_and_weighted() -> None:
    scores = paper_layer_scores([nb(0.9, (2, 0.95), (3, 0.5)), nb(0.8, (3, 0.92))], depth=4)
    # neighbour 1 keeps only (2, .95) with w=1; neighbour 2 keeps (3, .92) with w=.5
    np.testing.assert_allclose(scores, [0, 0, 0.95, 0.46, 0])


def test_without_a_confident_pair_the_three_most_probable_are_kept() -> None:
    scores = paper_layer_scores([nb(0.9, (0, 0.6), (1, 0.8), (2, 0.7), (3, 0.5))], depth=4)
    np.testing.assert_allclose(scores, [0.6, 0.8, 0.7, 0, 0])


def test_exit_is_the_argmax_layer() -> None:
    neighbours = [nb(0.95, (1, 0.91)), nb(0.9, (3, 0.99)), nb(0.9, (3, 0.99))]
    # layer 1: .91 * 1; layer 3: 2 * .99 * .5 = .99
    assert PaperPolicy().decide(neighbours, 4, LABELS).max_layer == 3


def test_no_information_at_all_means_the_last_layer() -> None:
    assert PaperPolicy().decide([], 18, LABELS).max_layer == 18
    assert PaperPolicy().decide([nb(0.9), nb(0.5)], 18, LABELS).max_layer == 18  # nobody right anywhere


def test_an_exact_duplicate_dominates_without_dividing_by_zero() -> None:
    scores = paper_layer_scores([nb(1.0, (5, 0.99)), nb(0.9, (2, 0.99))], depth=6)
    assert np.isfinite(scores).all()
    assert scores.argmax() == 5


def test_parse_policy_names_and_errors() -> None:
    assert isinstance(parse_policy("paper"), PaperPolicy)
    assert isinstance(parse_policy("full"), FullPolicy)
    # `auto` (and no name) is per task: the engine resolves it, a bare parse cannot
    for per_task in (None, "", "auto"):
        with pytest.raises(InvalidInput, match="unknown exit policy"):
            parse_policy(per_task)
    assert parse_policy("static:7") == StaticPolicy(7)
    assert parse_policy("static:7").decide([], 18, LABELS).max_layer == 7
    with pytest.raises(InvalidInput, match="unknown exit policy 'fastest'"):
        parse_policy("fastest")
    with pytest.raises(InvalidInput, match="needs a layer number"):
        parse_policy("static")
    with pytest.raises(InvalidInput, match="beyond the backbone's depth"):
        parse_policy("static:30").decide([], 18, LABELS)


def probs_by_layer(*rows: tuple[float, float]) -> np.ndarray:
    return np.array(rows, dtype=np.float64)


def test_tolerance_takes_the_earliest_layer_near_the_best() -> None:
    neighbours = [nb(0.9, (2, 0.95)), nb(0.9, (6, 0.99))]  # scores: L2 .95, L6 .99
    assert PaperPolicy().decide(neighbours, 8, LABELS).max_layer == 6
    assert TolerancePolicy(0.05).decide(neighbours, 8, LABELS).max_layer == 2
    assert TolerancePolicy(0.01).decide(neighbours, 8, LABELS).max_layer == 6


def test_confidence_stops_at_the_first_confident_layer() -> None:
    probs = probs_by_layer((0.5, 0.5), (0.7, 0.3), (0.95, 0.05), (0.99, 0.01))
    assert resolve_exit(ConfidencePolicy(0.9).decide([], 3, LABELS), probs) == 2
    assert resolve_exit(ConfidencePolicy(0.999).decide([], 3, LABELS), probs) == 3  # never: the last layer


def test_knn_vote_answers_without_the_backbone() -> None:
    neighbours = [nb(0.9, label="y"), nb(0.8, label="x"), nb(0.8, label="x"), nb(0.7, label="z")]
    np.testing.assert_allclose(label_vote(neighbours, LABELS), [0.5, 0.5])  # 1 vs .5 + .5; unknown label ignored
    decision = KnnVotePolicy().decide(neighbours[:2], 18, LABELS)
    assert decision.answer is not None and decision.answer.argmax() == 1 and decision.max_layer == 0
    np.testing.assert_allclose(label_vote([], LABELS), [0.5, 0.5])


def test_knn_agree_stops_where_the_lens_agrees_with_the_neighbours() -> None:
    neighbours = [nb(0.9, (3, 0.95), label="y"), nb(0.9, (3, 0.95), label="y")]  # vote y; paper exit 3
    probs = probs_by_layer((0.9, 0.1), (0.4, 0.6), (0.2, 0.8), (0.1, 0.9), (0.1, 0.9))
    decision = KnnAgreePolicy().decide(neighbours, 4, LABELS)
    assert decision.max_layer == 3 and resolve_exit(decision, probs) == 1
    disagreeing = probs_by_layer(*[(0.9, 0.1)] * 5)
    assert resolve_exit(decision, disagreeing) == 3  # bounded by the paper's exit
    assert KnnAgreePolicy(2).decide(neighbours, 4, LABELS).max_layer == 2
    assert KnnAgreePolicy().decide([], 4, LABELS).max_layer == 4


def test_policy_arguments_are_checked() -> None:
    assert parse_policy("confidence:0.8") == ConfidencePolicy(0.8)
    assert parse_policy("paper-tol:0.2") == TolerancePolicy(0.2)
    assert parse_policy("knn-agree:5") == KnnAgreePolicy(5)
    assert parse_policy("paper-all").name == "paper-all"
    with pytest.raises(InvalidInput, match="confidence:2 out of range"):
        parse_policy("confidence:2")
    with pytest.raises(InvalidInput, match="needs a decimal number in ASCII digits"):
        parse_policy("paper-tol:abc")


def test_a_tie_goes_to_the_earlier_layer() -> None:
    neighbours = [nb(0.9, (7, 0.95)), nb(0.9, (3, 0.95))]  # equal weights, equal probabilities
    assert PaperPolicy().decide(neighbours, 12, LABELS).max_layer == 3
    assert TolerancePolicy(0.0).decide(neighbours, 12, LABELS).max_layer == 3


def test_neighbours_without_a_correct_layer_add_nothing() -> None:
    with_empty = [nb(0.99), nb(0.8, (5, 0.95))]  # the nearest one no layer gets right
    scores = paper_layer_scores(with_empty, 8)
    assert scores.nonzero()[0].tolist() == [5]
    assert PaperPolicy().decide(with_empty, 8, LABELS).max_layer == 5


def test_balanced_accuracy_does_not_reward_the_majority_label() -> None:
    from raee_server.core.evaluation import PolicyResult

    majority = PolicyResult("always-0", 4, gold=[0] * 8 + [1] * 2, predicted=[0] * 10, exits=[0] * 10)
    assert majority.accuracy == pytest.approx(0.8)
    assert majority.balanced_accuracy(2) == pytest.approx(0.5)  # recall 1 on label 0, 0 on label 1
    mixed = PolicyResult("m", 4, gold=[0, 0, 0, 1, 2, 2], predicted=[0, 1, 0, 1, 2, 0], exits=[0] * 6)
    assert mixed.balanced_accuracy(4) == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)  # label 3 absent: not averaged
    assert mixed.summary(4)["balanced_accuracy"] == pytest.approx(mixed.balanced_accuracy(4))
