"""Exit policies: from a query's retrieved neighbours to where (and how) its forward stops.

One pluggable piece. A policy's `decide()` returns a Decision before the forward:
the deepest layer the row may run, optionally a rule that stops it earlier
from the label probabilities the logit lens reads after each layer, or an
answer that needs no backbone at all. Register a factory in `POLICIES` to make
a policy selectable by name; the engine and the evaluation never look inside.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

from raee_server.errors import InvalidInput, clip
from raee_server.types import Neighbour

if TYPE_CHECKING:
    from raee_server.core.heads import ExitHeads

# A request that names no policy gets `auto`: the task's stored choice (raee_server.core.auto).
DEFAULT_POLICY = "auto"
_MIN_DISTANCE = 1e-6  # an exact duplicate (distance 0) would divide by zero

StopRule = Callable[[int, np.ndarray], bool]  # (layer, label probabilities there) -> stop here?


@dataclass(frozen=True)
class Decision:
    max_layer: int  # the row never runs deeper than this
    stop: StopRule | None = None  # stop at the first layer <= max_layer where this holds
    answer: np.ndarray | None = None  # a label distribution decided without the backbone
    reader: str = "lens"  # what reads an exit: "lens" (label-word logits) or "heads" (the task's exit heads);
    # for an `answer`, what gave it: "key" (the key head), else retrieval
    prior: np.ndarray | None = None  # multiplies the exit's label probabilities (then renormalised)
    key_threshold: float | None = None  # answer from the key head, before any layer, when it is this sure
    gated: bool = False  # stop early (key or exit) only where the task's records cover the input

    @property
    def answered_by(self) -> str:
        """What answers: "key" (the key head), "retrieval" (the neighbours' vote) or "backbone"."""
        if self.answer is None:
            return "backbone"
        return "key" if self.reader == "key" else "retrieval"


def settle(decision: Decision, key_probs: np.ndarray | None, covered: bool) -> Decision:
    """A decision made concrete once the input's key is known, before any layer runs: a gated decision
    for an input outside the records' coverage walks to its bound with no early stop (the cascade's
    calibration does not vouch for it); else, where the key head is sure enough, the key answers.
    One place for both, so evaluation and serving decide alike."""
    if decision.gated and not covered:
        return Decision(decision.max_layer, reader=decision.reader, prior=decision.prior)
    if decision.key_threshold is not None and key_probs is not None and key_probs.max() >= decision.key_threshold:
        return Decision(0, answer=key_probs, reader="key")
    return decision


def mix(probs: np.ndarray, prior: np.ndarray | None) -> np.ndarray:
    """An exit's label probabilities times a prior (e.g. the neighbours' vote), renormalised."""
    if prior is None:
        return probs
    z = probs * prior
    total = z.sum(-1, keepdims=True)
    return np.where(total > 0, z / np.where(total > 0, total, 1), probs)


class ExitPolicy(Protocol):
    """`uses_head_exits`: the neighbours handed to `decide` carry the exits the task's exit heads
    judged correct (out of fold) instead of the lens' (the engine swaps them)."""

    # read-only: the policies are frozen dataclasses, and `name` is a property on some of them
    @property
    def name(self) -> str: ...

    @property
    def uses_neighbours(self) -> bool: ...

    def decide(self, neighbours: Sequence[Neighbour], depth: int, labels: Sequence[str]) -> Decision: ...


# -- the paper's aggregation ---------------------------------------------------


def neighbour_weights(neighbours: Sequence[Neighbour]) -> np.ndarray:
    """w_j = min_i d_i / d_j with d = 1 - cosine similarity (the paper's distance weighting)."""
    d = np.maximum(1.0 - np.array([n.similarity for n in neighbours], dtype=np.float64), _MIN_DISTANCE)
    return d.min() / d


def paper_layer_scores(
    neighbours: Sequence[Neighbour], depth: int, threshold: float = 0.9, fallback_top: int = 3
) -> np.ndarray:
    """score(l) = sum over kept (l, p) pairs of p * w_j, as the RAEE reference code aggregates
    (times each neighbour's prior-correction weight, 1 unless the engine set it).

    A neighbour keeps its pairs with p >= threshold; if none pass, its `fallback_top`
    most probable correct layers. A neighbour no layer gets right contributes nothing.
    threshold = 0 keeps every correct layer.
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
                scores[layer] += p * w * n.weight
    return scores


def label_vote(neighbours: Sequence[Neighbour], labels: Sequence[str]) -> np.ndarray:
    """The neighbours' distance-weighted label distribution (uniform when there are none), each
    neighbour also weighed by its prior-correction weight."""
    votes = np.zeros(len(labels), dtype=np.float64)
    index = {name: i for i, name in enumerate(labels)}
    if neighbours:
        for n, w in zip(neighbours, neighbour_weights(neighbours)):
            if n.label in index:
                votes[index[n.label]] += w * n.weight
    return votes / votes.sum() if votes.sum() > 0 else np.full(len(labels), 1.0 / len(labels))


@dataclass(frozen=True)
class PaperPolicy:
    """RAEE as published: argmax of the aggregated scores; no evidence at all -> last layer."""

    threshold: float = 0.9
    fallback_top: int = 3
    uses_neighbours: bool = True

    @property
    def name(self) -> str:
        return "paper" if self.threshold == 0.9 else "paper-all" if self.threshold == 0 else f"paper@{self.threshold}"

    def decide(self, neighbours: Sequence[Neighbour], depth: int, labels: Sequence[str]) -> Decision:
        scores = paper_layer_scores(neighbours, depth, self.threshold, self.fallback_top)
        return Decision(int(scores.argmax()) if scores.max() > 0 else depth)


@dataclass(frozen=True)
class TolerancePolicy:
    """Same evidence as `paper`, less depth: the earliest layer scoring within `tolerance` of the best."""

    tolerance: float = 0.1
    uses_neighbours: bool = True

    @property
    def name(self) -> str:
        return f"paper-tol:{self.tolerance:g}"

    def decide(self, neighbours: Sequence[Neighbour], depth: int, labels: Sequence[str]) -> Decision:
        scores = paper_layer_scores(neighbours, depth)
        if scores.max() <= 0:
            return Decision(depth)
        return Decision(int(np.argmax(scores >= (1 - self.tolerance) * scores.max())))


# -- baselines and policies beyond the paper -----------------------------------------


@dataclass(frozen=True)
class FullPolicy:
    name: str = "full"
    uses_neighbours: bool = False

    def decide(self, neighbours: Sequence[Neighbour], depth: int, labels: Sequence[str]) -> Decision:
        return Decision(depth)


@dataclass(frozen=True)
class StaticPolicy:
    layer: int
    uses_neighbours: bool = False

    @property
    def name(self) -> str:
        return f"static:{self.layer}"

    def decide(self, neighbours: Sequence[Neighbour], depth: int, labels: Sequence[str]) -> Decision:
        if self.layer > depth:
            raise InvalidInput(f"policy {self.name}: layer {self.layer} beyond the backbone's depth {depth}")
        return Decision(self.layer)


@dataclass(frozen=True)
class ConfidencePolicy:
    """Training-free early exit: the first layer whose top label-word probability reaches `threshold`."""

    threshold: float = 0.9
    uses_neighbours: bool = False

    @property
    def name(self) -> str:
        return f"confidence:{self.threshold:g}"

    def decide(self, neighbours: Sequence[Neighbour], depth: int, labels: Sequence[str]) -> Decision:
        t = self.threshold
        return Decision(depth, stop=lambda _layer, probs: float(probs.max()) >= t)


@dataclass(frozen=True)
class KnnVotePolicy:
    """Retrieval only: the neighbours' weighted majority label; no backbone layer runs."""

    name: str = "knn-vote"
    uses_neighbours: bool = True

    def decide(self, neighbours: Sequence[Neighbour], depth: int, labels: Sequence[str]) -> Decision:
        return Decision(0, answer=label_vote(neighbours, labels))


@dataclass(frozen=True)
class KnnAgreePolicy:
    """Labels and exits together: run layer by layer and stop at the first layer whose prediction
    agrees with the neighbours' weighted label, never deeper than `bound` (the paper's exit when
    `bound` is None). Without neighbours it runs the full model."""

    bound: int | None = None
    uses_neighbours: bool = True

    @property
    def name(self) -> str:
        return "knn-agree" if self.bound is None else f"knn-agree:{self.bound}"

    def decide(self, neighbours: Sequence[Neighbour], depth: int, labels: Sequence[str]) -> Decision:
        if not neighbours:
            return Decision(depth)
        target = int(label_vote(neighbours, labels).argmax())
        if self.bound is None:
            limit = PaperPolicy().decide(neighbours, depth, labels).max_layer
        else:
            limit = min(self.bound, depth)
        return Decision(limit, stop=lambda _layer, probs: int(probs.argmax()) == target)


# -- exit heads ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadsPolicy:
    """The task's exit head at one fixed exit (`heads:<layer>`); `heads` alone: the exit whose head
    scored best out of fold (the engine resolves it when the task's heads are loaded)."""

    layer: int
    uses_neighbours: bool = False
    uses_head_exits: bool = False

    @property
    def name(self) -> str:
        return f"heads:{self.layer}"

    def decide(self, neighbours: Sequence[Neighbour], depth: int, labels: Sequence[str]) -> Decision:
        return Decision(min(self.layer, depth), reader="heads")


@dataclass(frozen=True)
class PaperHeadsPolicy:
    """The paper's aggregation over the neighbours' head-judged exits; the head at that exit answers."""

    name: str = "paper-heads"
    uses_neighbours: bool = True
    uses_head_exits: bool = True

    def decide(self, neighbours: Sequence[Neighbour], depth: int, labels: Sequence[str]) -> Decision:
        return replace(PaperPolicy().decide(neighbours, depth, labels), reader="heads")


@dataclass(frozen=True)
class KnnHeadsPolicy:
    """Run layer by layer; at each exit multiply the head's label probabilities by the neighbours'
    vote (smoothed) and stop at the first exit whose top combined probability reaches `threshold`,
    never past `bound` (default: the full depth). The answer is the combined distribution there."""

    threshold: float = 0.9
    bound: int | None = None
    uses_neighbours: bool = True
    uses_head_exits: bool = False

    @property
    def name(self) -> str:
        base = f"knn-heads:{self.threshold:g}"
        return base if self.bound is None else f"{base}:{self.bound}"

    def decide(self, neighbours: Sequence[Neighbour], depth: int, labels: Sequence[str]) -> Decision:
        limit = depth if self.bound is None else min(self.bound, depth)
        # Laplace-smoothed vote: one neighbour never vetoes a label the head is sure of.
        prior = (label_vote(neighbours, labels) * len(neighbours) + 1) / (len(neighbours) + len(labels))
        return Decision(limit, stop=lambda _layer, probs: float(probs.max()) >= self.threshold,
                        reader="heads", prior=prior)


@dataclass(frozen=True)
class CascadePolicy:
    """Per input, the earliest exit whose head is sure enough; else the best head's exit.

    `cascade:<margin>`: run layer by layer and stop at the first exit whose head's top probability
    reaches that exit's threshold, never past the best head's exit (or `bound`). The thresholds
    are certified on the task's calibration records so that, with probability at least 1 - delta
    (cascade.RISK_LEVEL), stopping early costs at most `margin` balanced accuracy against the bound's
    head on new rows like the records (`ExitHeads.cascade_thresholds`); where nothing can be
    certified, every row answers at the bound. `bind` fills them in from the task's heads. No
    retrieval: the heads alone decide where a row stops.
    """

    margin: float = 0.01
    bound: int | None = None  # as named; None: the best head's exit
    thresholds: tuple[float, ...] = ()  # per exit, from `bind`
    last: int = -1  # the exit rows that never stop answer at, from `bind`
    uses_neighbours: bool = False
    uses_head_exits: bool = False

    @property
    def name(self) -> str:
        base = f"cascade:{self.margin:g}"
        return base if self.bound is None else f"{base}:{self.bound}"

    def decide(self, neighbours: Sequence[Neighbour], depth: int, labels: Sequence[str]) -> Decision:
        if not self.thresholds or self.last < 0:
            raise InvalidInput(f"policy: {self.name} needs the task's exit heads to calibrate its thresholds")
        limit, thresholds = min(self.last, depth), self.thresholds
        return Decision(limit, stop=lambda layer, probs: float(probs.max()) >= thresholds[layer], reader="heads")


@dataclass(frozen=True)
class KeyCascadePolicy(CascadePolicy):
    """The cascade with a stage before the backbone: the task's key head answers from the retrieval key
    alone when it is sure, else the heads' cascade runs (`cascade:<margin>`). Both stages' thresholds are
    certified together (`ExitHeads.cascade_thresholds(key_first=True)`), with the same promise;
    `thresholds` holds the key head's first, then each exit's. Gated (`key-cascade`): an input the
    records do not cover (`Coverage`: its nearest record too far, or longer than the records) never
    stops early and answers with the bound's head; `key-cascade-ungated` stops wherever the thresholds
    say (for comparison)."""

    gated: bool = True
    uses_neighbours: bool = True  # the nearest record's similarity is the coverage gate's evidence

    @property
    def name(self) -> str:
        return f"key-{'cascade' if self.gated else 'cascade-ungated'}{super().name[len('cascade'):]}"

    def decide(self, neighbours: Sequence[Neighbour], depth: int, labels: Sequence[str]) -> Decision:
        exits = replace(self, thresholds=self.thresholds[1:])  # the heads' cascade after the key
        key = self.thresholds[0] if self.thresholds else np.inf
        return replace(CascadePolicy.decide(exits, neighbours, depth, labels),
                       key_threshold=key if np.isfinite(key) else None, gated=self.gated)


class Resolved(NamedTuple):
    """A request's policy made concrete for its task: the policy, its k, and how answers name it
    (`cascade:0.01`, or `auto=cascade:0.01` when it came from the task's `auto` choice)."""

    policy: ExitPolicy
    k: int
    served: str


def untuned_fallback(records: int, has_heads: bool) -> str:
    """What `auto` answers with before the task has a stored choice. With exit heads: the best head
    (on 5,000-record databases its dev accuracy was 7 to 38 points above `paper`'s on SST-2, TREC and
    AG News, docs/results.md). Without: `knn-vote`, which tied or beat `paper` on all three at zero
    backbone layers (README's results table). Without records, retrieval has nothing to say: `full`."""
    if has_heads:
        return "heads"
    return "knn-vote" if records else "full"


def bind(policy: ExitPolicy, heads: ExitHeads) -> ExitPolicy:
    """A heads policy made concrete for one task's heads: `heads` alone becomes the best exit, a
    cascade gets its bound and calibrated thresholds."""
    if isinstance(policy, HeadsPolicy) and policy.layer < 0:
        return HeadsPolicy(heads.best_exit)
    if isinstance(policy, CascadePolicy) and not policy.thresholds:
        bound = heads.best_exit if policy.bound is None else min(policy.bound, heads.exits - 1)
        thresholds = heads.cascade_thresholds(policy.margin, bound, key_first=isinstance(policy, KeyCascadePolicy))
        return replace(policy, last=bound, thresholds=tuple(float(t) for t in thresholds))
    return policy


# -- names -------------------------------------------------------------------------


# Numbers in policy arguments are ASCII: str.isdigit() and float() also accept "²", "٣" or "１",
# which a client should hear about rather than have silently read as a layer.
_ASCII_INT = re.compile(r"[0-9]{1,6}")
_ASCII_DECIMAL = re.compile(r"[0-9]{0,6}(\.[0-9]{0,24})?")


def _float(arg: str | None, name: str, default: float, lo: float, hi: float) -> float:
    if arg is None:
        return default
    if not _ASCII_DECIMAL.fullmatch(arg) or arg in ("", "."):
        raise InvalidInput(f"policy: {name} needs a decimal number in ASCII digits, e.g. {name}:0.5 (got {clip(arg)})")
    value = float(arg)
    if not lo <= value <= hi:
        raise InvalidInput(f"policy: {name}:{arg} out of range {lo:g}..{hi:g}")
    return value


def _int(arg: str | None, name: str) -> int:
    if arg is None or not _ASCII_INT.fullmatch(arg):
        raise InvalidInput(
            f"policy: {name} needs a layer number in ASCII digits, e.g. {name}:6 (got {clip(arg or '')})")
    return int(arg)


def _no_arg(factory: Callable[[], ExitPolicy], name: str) -> Callable[[str | None], ExitPolicy]:
    def make(arg: str | None) -> ExitPolicy:
        if arg is not None:
            raise InvalidInput(f"policy: {name!r} takes no argument (got {clip(f'{name}:{arg}')})")
        return factory()

    return make


POLICIES: dict[str, Callable[[str | None], ExitPolicy]] = {
    "paper": _no_arg(PaperPolicy, "paper"),
    "paper-all": _no_arg(lambda: PaperPolicy(threshold=0.0), "paper-all"),
    "paper-tol": lambda a: TolerancePolicy(_float(a, "paper-tol", 0.1, 0.0, 1.0)),
    "full": _no_arg(FullPolicy, "full"),
    "static": lambda a: StaticPolicy(_int(a, "static")),
    "confidence": lambda a: ConfidencePolicy(_float(a, "confidence", 0.9, 0.0, 1.0)),
    "knn-vote": _no_arg(KnnVotePolicy, "knn-vote"),
    "knn-agree": lambda a: KnnAgreePolicy(None if a is None else _int(a, "knn-agree")),
    "heads": lambda a: HeadsPolicy(-1 if a is None else _int(a, "heads")),  # -1: the best exit, resolved per task
    "paper-heads": _no_arg(PaperHeadsPolicy, "paper-heads"),
    "knn-heads": lambda a: _knn_heads(a),
    "cascade": lambda a: _cascade(a),
    "key-cascade": lambda a: _key_cascade(a, gated=True),
    "key-cascade-ungated": lambda a: _key_cascade(a, gated=False),
}


def policy_names() -> list[str]:
    """Every policy a request may name: the registered ones and `auto` (the engine resolves it per task)."""
    return sorted([*POLICIES, "auto"])


def _knn_heads(arg: str | None) -> KnnHeadsPolicy:
    threshold, _, bound = (arg or "").partition(":")
    return KnnHeadsPolicy(_float(threshold or None, "knn-heads", 0.9, 0.0, 1.0),
                          None if not bound else _int(bound, "knn-heads:<threshold>"))


def _cascade(arg: str | None, name: str = "cascade") -> CascadePolicy:
    margin, _, bound = (arg or "").partition(":")
    return CascadePolicy(_float(margin or None, name, 0.01, 0.0, 1.0),
                         None if not bound else _int(bound, f"{name}:<margin>"))


def _key_cascade(arg: str | None, gated: bool) -> KeyCascadePolicy:
    plain = _cascade(arg, "key-cascade" if gated else "key-cascade-ungated")
    return KeyCascadePolicy(plain.margin, plain.bound, gated=gated)


def parse_policy(spec: str | None) -> ExitPolicy:
    """A policy by name, e.g. `paper`, `static:6`, `confidence:0.8`; unknown names name the field.
    (`auto`, also what no name means, is per task and resolved by the engine, which knows the task's
    tuned choice.)"""
    name, sep, arg = (spec or "").strip().partition(":")
    factory = POLICIES.get(name)
    if factory is None:
        known = ", ".join(policy_names())
        raise InvalidInput(f"policy: unknown exit policy {clip(spec or '')} (known: {known})")
    return factory(arg if sep else None)


def reads_heads(policy: ExitPolicy) -> bool:
    """The policy's exits are read by the task's exit heads, not the lens."""
    return isinstance(policy, HeadsPolicy | PaperHeadsPolicy | KnnHeadsPolicy | CascadePolicy)


def uses_head_exits(policy: ExitPolicy) -> bool:
    """The policy aggregates the neighbours' head-judged exits (the engine swaps them in)."""
    return bool(getattr(policy, "uses_head_exits", False))


def resolve_exit(decision: Decision, layer_probs: np.ndarray) -> int:
    """Where a decision exits, given its reader's label probabilities at every exit [L + 1, C]
    (for evaluation; the stop rule sees them mixed with the decision's prior, as served)."""
    if decision.answer is not None:
        return 0
    if decision.stop is not None:
        for layer in range(decision.max_layer + 1):
            if decision.stop(layer, mix(layer_probs[layer], decision.prior)):
                return layer
    return decision.max_layer
