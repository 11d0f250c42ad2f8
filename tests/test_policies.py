"""The paper's aggregation, step by step, on hand-built neighbours."""

from __future__ import annotations

import numpy as np
import pytest

from raee_server.errors import InvalidInput
from raee_server.policies import (
    FullPolicy,
    Neighbour,
    PaperPolicy,
    StaticPolicy,
    neighbour_weights,
    paper_layer_scores,
    parse_policy,
)


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
    assert PaperPolicy().exit_layer(neighbours, depth=4) == 3


def test_no_information_at_all_means_the_last_layer() -> None:
    assert PaperPolicy().exit_layer([], depth=18) == 18
    assert PaperPolicy().exit_layer([nb(0.9), nb(0.5)], depth=18) == 18  # nobody right anywhere


def test_an_exact_duplicate_dominates_without_dividing_by_zero() -> None:
    scores = paper_layer_scores([nb(1.0, (5, 0.99)), nb(0.9, (2, 0.99))], depth=6)
    assert np.isfinite(scores).all()
    assert scores.argmax() == 5


def test_parse_policy_names_and_errors() -> None:
    assert isinstance(parse_policy(None), PaperPolicy)
    assert isinstance(parse_policy("full"), FullPolicy)
    assert parse_policy("static:7") == StaticPolicy(7)
    assert parse_policy("static:7").exit_layer([], 18) == 7
    with pytest.raises(InvalidInput, match="unknown exit policy 'fastest'"):
        parse_policy("fastest")
    with pytest.raises(InvalidInput, match="needs a layer number"):
        parse_policy("static")
    with pytest.raises(InvalidInput, match="beyond the backbone's depth"):
        parse_policy("static:30").exit_layer([], 18)
