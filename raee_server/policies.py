"""Exit policies: from a query's retrieved neighbours to the layer where its forward stops.

One pluggable piece: a policy is any object with `name`, `uses_neighbours` and
`exit_layer(neighbours, depth)`; register a factory in `POLICIES` to make it
selectable by name (`paper`, `full`, `static:<layer>`). The engine never
looks inside a policy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .errors import InvalidInput

DEFAULT_POLICY = "paper"
_MIN_DISTANCE = 1e-6  # an exact duplicate (distance 0) would divide by zero


@dataclass(frozen=True)
class Neighbour:
    """A retrieved exit record: similarity to the query and the layers that predict its label correctly."""

    id: str
    similarity: float  # cosine similarity (Qdrant's score); distance = 1 - similarity
    label: str
    exits: tuple[tuple[int, float], ...]  # (layer, probability of the gold label) for correct layers


class ExitPolicy(Protocol):
    name: str
    uses_neighbours: bool

    def exit_layer(self, neighbours: Sequence[Neighbour], depth: int) -> int: ...


def neighbour_weights(neighbours: Sequence[Neighbour]) -> np.ndarray:
    """w_j = min_i d_i / d_j with d = 1 - cosine similarity (the paper's distance weighting)."""
    d = np.maximum(1.0 - np.array([n.similarity for n in neighbours], dtype=np.float64), _MIN_DISTANCE)
    return d.min() / d


def paper_layer_scores(
    neighbours: Sequence[Neighbour], depth: int, threshold: float = 0.9, fallback_top: int = 3
) -> np.ndarray:
    """score(l) = sum over kept (l, p) pairs of p * w_j, as the RAEE reference code aggregates.

    A neighbour keeps its pairs with p >= threshold; if none pass, its `fallback_top`
    most probable correct layers. A neighbour no layer gets right contributes nothing.
    """
    scores = np.zeros(depth + 1, dtype=np.float64)
    if not neighbours:
        return scores
    for n, w in zip(neighbours, neighbour_weights(neighbours)):
        kept = [(l, p) for l, p in n.exits if p >= threshold]
        if not kept:
            kept = sorted(n.exits, key=lambda lp: -lp[1])[:fallback_top]
        for layer, p in kept:
            if 0 <= layer <= depth:
                scores[layer] += p * w
    return scores


@dataclass(frozen=True)
class PaperPolicy:
    """RAEE as published: argmax of the aggregated scores; no evidence at all -> last layer."""

    threshold: float = 0.9
    fallback_top: int = 3
    name: str = "paper"
    uses_neighbours: bool = True

    def exit_layer(self, neighbours: Sequence[Neighbour], depth: int) -> int:
        scores = paper_layer_scores(neighbours, depth, self.threshold, self.fallback_top)
        return int(scores.argmax()) if scores.max() > 0 else depth


@dataclass(frozen=True)
class FullPolicy:
    name: str = "full"
    uses_neighbours: bool = False

    def exit_layer(self, neighbours: Sequence[Neighbour], depth: int) -> int:
        return depth


@dataclass(frozen=True)
class StaticPolicy:
    layer: int
    uses_neighbours: bool = False

    @property
    def name(self) -> str:
        return f"static:{self.layer}"

    def exit_layer(self, neighbours: Sequence[Neighbour], depth: int) -> int:
        if self.layer > depth:
            raise InvalidInput(f"policy {self.name}: layer {self.layer} beyond the backbone's depth {depth}")
        return self.layer


def _static(arg: str | None) -> ExitPolicy:
    if arg is None or not arg.isdigit():
        raise InvalidInput(f"policy 'static' needs a layer number, e.g. static:6 (got {arg!r})")
    return StaticPolicy(int(arg))


def _no_arg(factory: Callable[[], ExitPolicy], name: str) -> Callable[[str | None], ExitPolicy]:
    def make(arg: str | None) -> ExitPolicy:
        if arg is not None:
            raise InvalidInput(f"policy {name!r} takes no argument (got {name}:{arg})")
        return factory()

    return make


POLICIES: dict[str, Callable[[str | None], ExitPolicy]] = {
    "paper": _no_arg(PaperPolicy, "paper"),
    "full": _no_arg(FullPolicy, "full"),
    "static": _static,
}


def parse_policy(spec: str | None) -> ExitPolicy:
    """`paper`, `full` or `static:<layer>`; an unknown name is an InvalidInput naming the field."""
    name, sep, arg = (spec or DEFAULT_POLICY).strip().partition(":")
    factory = POLICIES.get(name)
    if factory is None:
        raise InvalidInput(f"policy: unknown exit policy {spec!r} (known: {', '.join(sorted(POLICIES))})")
    return factory(arg if sep else None)
