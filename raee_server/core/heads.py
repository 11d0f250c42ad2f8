"""Exit heads: a linear classifier per task and exit, fit on the records' exit features.

On Gemma 3 270M the logit lens of most exits predicts one constant label, yet a linear head on
the same exit's hidden state beats the full model (docs/results.md). So each task gets, per exit,
a multinomial logistic regression on the standardised readout features:

- the records are split once, by near-duplicate group (raee_server.core.groups): a calibration
  split (`CALIBRATION_SHARE`, at most `CALIBRATION_ROWS` rows) that only the cascade's stopping rule
  reads, and a fit split that trains the heads that are served;
- on the fit split, the L2 strength is chosen per exit by grouped k-fold cross-validation over a wide
  grid (out-of-fold balanced accuracy, then log-loss), with class weights that balance the labels;
  the best exit is judged class-weighted too, so a database with more of one label does not make the
  heads favour it (the records' label mix is not the traffic's);
- every record is judged by heads that never saw it: fit-split records out of fold, calibration
  records by the served heads; policies that aggregate the neighbours' correct exits (`paper-heads`)
  and `auto`'s validation read these judgments;
- the cascade's thresholds are certified on the calibration split by Learn-then-Test (Angelopoulos et
  al., 2021; as CALM, Schuster et al., 2022): see `ExitHeads.cascade_thresholds`;
- all exits are fit at once, as one batched problem ([E, N, H] @ [E, H, C]) with L-BFGS, each C warm-
  started from the previous one's solution;
- a key head (the same regression on the retrieval key, the same split and folds) is the cascade's
  stage 0: a key-first cascade answers from the key alone when it is sure, before any backbone layer
  (`ExitHeads.key`, issue 32), and only where the records cover the input (`Coverage`).

Fitting runs off the request path (`raee-admin fit-heads`, after a local ingest, and in the
server's background); a fit makes a new version that replaces the served one atomically.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC
from functools import cached_property
from typing import Any

import numpy as np
import torch

from raee_server.core.groups import group_folds
from raee_server.errors import InvalidInput
from raee_server.stores.codec import FeatureCodec, FeatureMatrix
from raee_server.stores.metadata import StoredHeads
from raee_server.types import Neighbour

# Inverse L2 strength, as scikit-learn's C (per record, class-weighted). Wide on purpose: on 5,000-record
# databases every task's best head sat at the lower edge of {0.01, 0.1, 1} (issue 24).
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
FOLDS = 5
MIN_RECORDS = 20
CALIBRATION_SHARE = 0.3  # of the records (whole near-duplicate groups), held out for the cascade
CALIBRATION_ROWS = 5000  # at most: beyond that the bound is tight and the heads want the records
CALIBRATION_MIN_RECORDS = 100  # below this, no calibration split: cascades never stop early
RISK_LEVEL = 0.1  # delta: the cascade's promise fails with probability at most this
# The cascade's candidate stopping rules, most cautious first: per-exit thresholds proposed on the fit
# split's out-of-fold probabilities at each of these proposal margins; Learn-then-Test keeps the last
# one in this order whose risk it certifies.
CV_ROWS = 20000  # C is chosen by cross-validation on at most this many fit records (whole groups)
CHUNK_ROWS = 4096  # rows a fit step turns from codes into float32 at a time: memory follows this
GROW_ITERATIONS = 40  # L-BFGS steps of a warm refit (from the served version's weights)
REFIT_GROWTH = 2.0  # a warm refit keeps C and standardisation until the records double since the full fit
# Coverage: an input is outside what the records cover when its nearest record is less similar than all
# but this share of the records' own nearest records (outside their near-duplicate group), or it is longer
# than all but this share of the records. In coverage by construction, about 2 x this share of traffic like
# the records is still flagged (and walks to the best head: costs depth, not accuracy).
COVERAGE_QUANTILE = 0.02
COVERAGE_SAMPLE = 2000  # records whose nearest neighbours set the similarity floor
# Dense, and from below zero (a rule that must gain on the bound's head where it stops early): the
# certified rule is the last candidate before the first that fails, so gaps between candidates are
# depth given away.
PROPOSALS = tuple(float(p) for p in np.round(np.arange(-0.05, 0.3001, 0.0025), 4))


@dataclass(frozen=True)
class FitSpace:
    """The heads as fit, on the features the fit read (a codec's coordinates, or raw features): what a
    warm refit starts from. `full_fit_records`: the records of the last full fit (C chosen there)."""

    mean: np.ndarray  # [E, d]
    scale: np.ndarray  # [E, d]
    weight: np.ndarray  # [E, d, C]
    bias: np.ndarray  # [E, C]
    full_fit_records: int


@dataclass(frozen=True)
class Coverage:
    """What a task's records cover, learned from them at each fit: the least similarity to the nearest
    record, and the most words, that `COVERAGE_QUANTILE` of the records themselves fall outside of."""

    similarity: float  # floor on the nearest record's cosine similarity
    words: int  # ceiling on the input's length in words

    def covers(self, words: int, similarity: float | None) -> bool:
        """An input of `words` words whose nearest record has `similarity` (None: none retrieved) lies
        where the records vouch for the cascade's calibration."""
        return similarity is not None and similarity >= self.similarity and words <= self.words

    @classmethod
    def learn(cls, keys: np.ndarray, groups: np.ndarray, lengths: np.ndarray,
              quantile: float = COVERAGE_QUANTILE, sample: int = COVERAGE_SAMPLE, seed: int = 0) -> Coverage:
        """From the records' keys [N, d], near-duplicate groups [N] and lengths in words [N]: for a seeded
        sample of records, the similarity of the nearest record outside its own group (a new input has no
        near-copy among the records; its own group would make the floor too high)."""
        unit = keys / np.maximum(np.linalg.norm(keys, axis=1, keepdims=True), 1e-12)
        picked = np.random.default_rng(seed).permutation(len(keys))[:sample]
        nearest = np.full(len(picked), -1.0)
        for at in range(0, len(keys), 20000):  # memory follows the chunk: [sample, 20000] similarities
            sims = unit[picked] @ unit[at : at + 20000].T
            sims[groups[picked][:, None] == groups[None, at : at + 20000]] = -1.0
            nearest = np.maximum(nearest, sims.max(1))
        return cls(float(np.quantile(nearest, quantile)), int(np.ceil(np.quantile(lengths, 1 - quantile))))


@dataclass
class ExitHeads:
    """Fitted heads of one task: probabilities at any exit from its features, and the records'
    judgments by heads that never saw them."""

    labels: list[str]
    mean: np.ndarray  # [E, H] feature means
    scale: np.ndarray  # [E, H] feature standard deviations (1 where constant)
    weight: np.ndarray  # [E, H, C]
    bias: np.ndarray  # [E, C]
    c: np.ndarray  # [E] chosen C
    accuracy: np.ndarray  # [E] out-of-fold accuracy on the fit split
    record_ids: list[str]
    oof: np.ndarray  # [N, E, C] float16: fit split out of fold, calibration split by the served heads
    gold: np.ndarray | None = None  # [N] each record's label index (None in heads stored before it was kept)
    calibration: np.ndarray | None = None  # [N] bool: the record is in the calibration split (None: older heads)
    version: int = 0
    fitted_at: str = ""
    seconds: float = 0.0
    space: FitSpace | None = None  # None: heads stored before warm refits
    edits: int = 0  # the task's record edits (deletes, relabels) when it was fit
    key: ExitHeads | None = None  # the key head: one "exit", the retrieval key; same records and split
    coverage: Coverage | None = None  # where the records vouch for the cascade (None: no key head)
    _index: dict[str, int] = field(default_factory=dict, repr=False)
    _cascades: dict[tuple[float, int, bool], np.ndarray] = field(default_factory=dict, repr=False)
    _proposals: dict[tuple[int, bool], list[tuple[np.ndarray, float]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {rid: i for i, rid in enumerate(self.record_ids)}

    @property
    def exits(self) -> int:
        return int(self.weight.shape[0])

    @property
    def fit_rows(self) -> np.ndarray:
        """[N] bool: the records that trained the heads (all but the calibration split)."""
        return np.ones(len(self.record_ids), dtype=bool) if self.calibration is None else ~self.calibration

    @cached_property
    def balanced_accuracy(self) -> np.ndarray:
        """[E] out-of-fold balanced accuracy (mean recall over the labels) on the fit split; plain
        accuracy for heads stored before the records' labels were kept. The calibration split plays
        no part: the best exit (the cascade's bound) is fixed before the cascade looks at it."""
        if self.gold is None:
            return self.accuracy
        rows = self.fit_rows
        correct = self.oof[rows].argmax(-1) == self.gold[rows, None]  # [N, E]
        weights = row_weights(self.gold[rows])
        return np.asarray((weights[:, None] * correct).sum(0) / weights.sum())

    @property
    def best_exit(self) -> int:
        """The exit whose head scored best out of fold, class-weighted (the earliest among equals)."""
        return int(np.argmax(np.round(self.balanced_accuracy, 6)))

    def probs(self, layer: int, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Label probabilities of the head at `layer` for features [B, H] (or [H]): [B, C] (or [C])."""
        x = features.detach().float().cpu().numpy() if isinstance(features, torch.Tensor) else features
        x = (np.asarray(x, dtype=np.float64) - self.mean[layer]) / self.scale[layer]
        return _softmax(x @ self.weight[layer] + self.bias[layer])

    def all_probs(self, features: np.ndarray) -> np.ndarray:
        """[N, E, H] features -> [N, E, C] probabilities at every exit."""
        x = (features.astype(np.float64) - self.mean) / self.scale
        return _softmax(np.einsum("neh,ehc->nec", x, self.weight) + self.bias)

    def judged(self, record_id: str) -> np.ndarray | None:
        """A record's probabilities at every exit [E, C] by heads that never saw it; None for records
        newer than the fit."""
        i = self._index.get(record_id)
        return None if i is None else self.oof[i].astype(np.float64)

    def key_probs(self, keys: np.ndarray) -> np.ndarray | None:
        """The key head's label probabilities for keys [B, d]: [B, C] (None: these heads have no key head)."""
        return None if self.key is None else self.key.probs(0, keys)

    def covers(self, text: str, neighbours: Sequence[Neighbour]) -> bool:
        """The records cover this input (`Coverage`; always, for heads fit without a key head)."""
        return self.coverage is None or \
            self.coverage.covers(len(text.split()), neighbours[0].similarity if neighbours else None)

    def stages(self) -> np.ndarray:
        """[N, 1 + E, C] float16: each record's judgment by the key head, then at every exit (the stages of
        a key-first cascade), by heads that never saw it."""
        assert self.key is not None
        return np.concatenate([self.key.oof, self.oof], axis=1)

    def cascade_thresholds(self, margin: float, bound: int | None = None, key_first: bool = False) -> np.ndarray:
        """Per-exit confidence thresholds [E] of the cascade that stops each row at the first exit
        whose head is at least that sure, and otherwise answers with the head at `bound` (default:
        the best exit); inf: never stop there. `key_first`: [1 + E], the key head's threshold first
        (a stage before any layer), certified together with the exits' by the same procedure.

        The promise: with probability at least 1 - RISK_LEVEL over the calibration records, the
        cascade's balanced accuracy on new rows is at most `margin` below the bound head's. Assumption:
        within each label, the new rows and the calibration records are exchangeable (the same
        distribution; the label mix may differ, since balanced accuracy counts each label alone).

        How: candidate rules are proposed on the fit split (the heuristic `propose_thresholds` at each of
        PROPOSALS, most cautious first); each is then tested on the calibration split, which neither
        fit the heads nor proposed the rules, with an upper confidence bound on its risk (`risk_bound`),
        in that fixed order, stopping at the first it cannot certify (fixed-sequence testing: no
        correction for the number of candidates is needed). The last certified rule is served; none
        certified: never stop early, answer at the bound.
        """
        bound = self.best_exit if bound is None else bound
        if key_first and self.key is None:
            raise InvalidInput("policy: a key-first cascade needs a key head; fit the task's heads again")
        cached = (round(margin, 6), bound, key_first)
        if cached not in self._cascades:
            self._cascades[cached] = self._certified(margin, bound, key_first)
        return self._cascades[cached]

    def _certified(self, margin: float, bound: int, key_first: bool) -> np.ndarray:
        # the key head is stage 0: every exit moves one stage on
        stage_bound, stages = (bound + 1, self.exits + 1) if key_first else (bound, self.exits)
        never = np.full(stages, np.inf)
        if self.gold is None or self.calibration is None or not self.calibration.any() or stage_bound == 0:
            return never  # heads stored before calibration splits, too few records, or nothing before the bound
        probs = (self.stages() if key_first else self.oof).astype(np.float64)
        fit, cal = self.fit_rows, self.calibration
        # the same candidates, and their bounds, for every margin: each is proposed and bounded once, when
        # a margin first walks that far along the sequence
        candidates = self._proposals.setdefault((bound, key_first), [])
        rules = candidate_rules(probs[fit], self.gold[fit], stage_bound, key_first)
        chosen, least = never, np.inf
        for i, thresholds in enumerate(rules):
            if i == len(candidates):
                candidates.append((thresholds, risk_bound(probs[cal], self.gold[cal], thresholds, stage_bound,
                                                          len(self.labels))))
            thresholds, risk = candidates[i]
            if risk > margin:
                break
            # every rule before the first failure is certified (fixed-sequence testing controls the error
            # over all of them at once): serve the one with the least mean depth on the fit split
            stopped = cascade_exits(probs[fit], thresholds, stage_bound)
            depth = float(np.maximum(stopped - int(key_first), 0).mean())  # the key: depth 0
            if depth < least:
                chosen, least = thresholds, depth
        return chosen

    def summary(self) -> dict[str, Any]:
        coverage = {"similarity": round(self.coverage.similarity, 4), "words": self.coverage.words} \
            if self.coverage else None
        key = {"c": float(self.key.c[0]), "accuracy": round(float(self.key.accuracy[0]), 4)} if self.key else None
        return {"version": self.version, "fitted_at": self.fitted_at, "seconds": round(self.seconds, 2),
                "records": len(self.record_ids), "fit_records": int(self.fit_rows.sum()),
                "calibration_records": int(self.calibration.sum()) if self.calibration is not None else 0,
                "c": [float(c) for c in self.c], "c_at_grid_edge": int(np.isin(self.c, (C_GRID[0], C_GRID[-1])).sum()),
                "full_fit_records": self.space.full_fit_records if self.space else len(self.record_ids),
                "accuracy": [round(float(a), 4) for a in self.accuracy], "best_exit": self.best_exit,
                "key_head": key, "coverage": coverage}

    @classmethod
    def from_stored(cls, stored: StoredHeads) -> ExitHeads:
        fitted = stored.fitted_at  # SQLite hands back naive datetimes; they were written in UTC
        fitted = fitted if fitted.tzinfo else fitted.replace(tzinfo=UTC)
        return cls.from_bytes(stored.data, stored.version, fitted.isoformat(timespec="seconds"),
                              float(stored.summary.get("seconds", 0.0)))

    def in_raw_space(self, codec: FeatureCodec) -> ExitHeads:
        """These heads, fit on a codec's coordinates, as heads on the raw features they encode: the
        codec's projection is linear, so it folds into the weights and serving needs no codec."""
        inv = self.weight / self.scale[..., None]  # [E, d, C]
        weight = np.einsum("ehd,edc->ehc", codec.basis.astype(np.float64), inv)
        bias = self.bias - np.einsum("ed,edc->ec", self.mean, inv)
        return replace(self, mean=codec.mean.astype(np.float64), scale=np.ones_like(codec.mean, dtype=np.float64),
                       weight=weight, bias=bias, space=self.space)

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        arrays: dict[str, np.ndarray] = {
            "labels": np.array(self.labels), "mean": self.mean.astype(np.float32),
            "scale": self.scale.astype(np.float32), "weight": self.weight.astype(np.float32),
            "bias": self.bias.astype(np.float32), "c": self.c, "accuracy": self.accuracy,
            "record_ids": np.array(self.record_ids), "oof": self.oof.astype(np.float16)}
        if self.gold is not None:
            arrays["gold"] = self.gold.astype(np.int32)
        if self.calibration is not None:
            arrays["calibration"] = self.calibration.astype(bool)
        if self.space is not None:
            space = self.space
            arrays |= {"space_mean": space.mean.astype(np.float32), "space_scale": space.scale.astype(np.float32),
                       "space_weight": space.weight.astype(np.float32), "space_bias": space.bias.astype(np.float32),
                       "full_fit_records": np.array(space.full_fit_records)}
        arrays["edits"] = np.array(self.edits)
        if self.key is not None:  # one file: the key head's own, as bytes
            arrays["key_heads"] = np.frombuffer(self.key.to_bytes(), dtype=np.uint8)
        if self.coverage is not None:
            arrays["coverage"] = np.array([self.coverage.similarity, self.coverage.words])
        np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, version: int, fitted_at: str, seconds: float) -> ExitHeads:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        return cls([str(x) for x in z["labels"]], z["mean"].astype(np.float64), z["scale"].astype(np.float64),
                   z["weight"].astype(np.float64), z["bias"].astype(np.float64), z["c"], z["accuracy"],
                   [str(x) for x in z["record_ids"]], z["oof"], z["gold"] if "gold" in z.files else None,
                   z["calibration"] if "calibration" in z.files else None, version, fitted_at, seconds,
                   FitSpace(z["space_mean"].astype(np.float64), z["space_scale"].astype(np.float64),
                            z["space_weight"].astype(np.float64), z["space_bias"].astype(np.float64),
                            int(z["full_fit_records"])) if "space_mean" in z.files else None,
                   int(z["edits"]) if "edits" in z.files else 0,
                   cls.from_bytes(z["key_heads"].tobytes(), version, fitted_at, seconds)
                   if "key_heads" in z.files else None,
                   Coverage(float(z["coverage"][0]), int(z["coverage"][1])) if "coverage" in z.files else None)


def row_weights(gold: np.ndarray) -> np.ndarray:
    """Per record, the inverse of its label's share of the records, scaled to mean 1: weighted by
    these, accuracy is balanced accuracy (and all weights are 1 on a balanced database)."""
    counts = np.bincount(gold)
    present = np.count_nonzero(counts)
    return np.asarray(len(gold) / (present * counts[gold]), dtype=np.float64)


def cascade_exits(probs: np.ndarray, thresholds: np.ndarray, bound: int) -> np.ndarray:
    """[N] where the cascade answers each row of [N, E, C] probabilities: the first exit below the bound
    whose top probability reaches its threshold, else the bound."""
    if bound == 0:  # nothing before the bound to stop at
        return np.zeros(len(probs), dtype=np.int64)
    sure = probs[:, :bound].max(-1) >= thresholds[None, :bound]  # [N, bound]
    return np.where(sure.any(1), sure.argmax(1), bound)


def risk_bound(probs: np.ndarray, gold: np.ndarray, thresholds: np.ndarray, bound: int, n_labels: int,
                delta: float = RISK_LEVEL) -> float:
    """An upper confidence bound, at level 1 - delta, on the balanced accuracy the cascade loses against
    the bound head: per label, on each of its rows d = (bound head right) - (cascade right), in {-1, 0, 1},
    the mean of d bounded above at delta / labels (`betting_upper`, Bonferroni over the labels), averaged
    over the labels. A label without calibration rows bounds at 1: nothing is known.

    Gains offset losses, as in the balanced accuracy itself. One bound on the paired difference, not
    two Clopper-Pearson bounds (lost above, gained below, each at delta / (2 x labels), as before): the
    betting bound adapts to how rarely the two disagree. On SST-2's 5,000 records it certified
    `cascade:0.02` at mean exit 5.68 on the calibration split where the two-sided Clopper-Pearson
    bound certified no early stop at all (docs/results.md, "Key-first cascade")."""
    exits = cascade_exits(probs, thresholds, bound)
    cascade = probs[np.arange(len(gold)), exits].argmax(-1) == gold
    d = (probs[:, bound].argmax(-1) == gold).astype(np.float64) - cascade
    upper = []
    for label in range(n_labels):
        rows = gold == label
        upper.append(2 * betting_upper((d[rows] + 1) / 2, delta / n_labels) - 1 if rows.any() else 1.0)
    return float(np.mean(upper))


def betting_upper(x: np.ndarray, delta: float, cap: float = 0.99, seed: int = 0) -> float:
    """An upper confidence bound at level 1 - delta on the mean of exchangeable x in [0, 1], by betting
    (Waudby-Smith and Ramdas, JRSS B 2024; the bound Learn-then-Test recommends): the capital of a bettor
    against "the mean is at least m", prod_t (1 - lambda_t (x_t - m)), with predictable bets lambda_t
    from the rows before t (their mean and variance, capped at `cap` / (1 - m)), reaches 1 / delta with
    probability at most delta when the mean is m or more (Ville's inequality). The bound is the least
    m where it does, found by bisection (the capital grows with m). The rows are taken in a seeded
    order; tight where x varies little (a cascade that rarely disagrees with the bound's head)."""
    n = len(x)
    if n == 0:
        return 1.0
    x = np.random.default_rng(seed).permutation(np.asarray(x, dtype=np.float64))
    t = np.arange(1, n + 1)
    mean = (0.5 + np.cumsum(x)) / (t + 1)
    var = (0.25 + np.cumsum((x - mean) ** 2)) / (t + 1)
    before = np.concatenate([[0.25], var[:-1]])  # each bet sees only the rows before it
    bets = np.sqrt(2 * np.log(1 / delta) / (n * before))
    target = np.log(1 / delta)

    def rejected(m: float) -> bool:
        # capped at cap / (1 - m): the capital stays positive at x = 1, and the bettor may stake up to
        # twice as much near m = 1/2, where a cascade's ties (x = 1/2) sit
        stakes = np.minimum(bets, cap / max(1 - m, 1e-12))
        return bool(np.cumsum(np.log1p(-stakes * (x - m))).max() >= target)

    low, high = 0.0, 1.0
    if not rejected(high):
        return 1.0
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (low, mid) if rejected(mid) else (mid, high)
    return high


SHARES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # steps up to the first proposal that stops early


def candidate_rules(probs: np.ndarray, gold: np.ndarray, bound: int, key_first: bool = False
                    ) -> Iterator[np.ndarray]:
    """The cascade's candidate rules from the fit split alone, most cautious first: the proposal at each of
    PROPOSALS; before the first that stops any row early, the same rule stopping only the most confident
    SHARES of its early stops at each stage (`shrink`): one proposal margin to the next can jump from no
    early stop to a third of the depth (AG News), and a step the calibration split cannot certify ends
    the sequence. Only there: steps between later proposals gave a failing step more chances to end the
    sequence early (on AG News, key-cascade:0.03's calibration mean exit went from 1.6 to 3.7).

    `key_first` (stage 0 is the key head): first the rules that stop only at the key (each proposal's key
    threshold, no early exit after it), then the full proposals. The key is what saves depth, and in
    the full proposals' order a rule adding early exits before the key's threshold appears can fail
    the test and end the sequence (AG News at m = 0.02: the key-only rule stopping 71 % of the
    calibration rows was certified, but the full sequence failed before reaching it)."""
    proposals = [propose_thresholds(probs, gold, p, bound) for p in PROPOSALS]
    if key_first:
        key_only = [np.where(np.arange(len(t)) == 0, t, np.inf) for t in proposals]
        yield from _stepped(probs, bound, key_only)
    yield from _stepped(probs, bound, proposals)


def _stepped(probs: np.ndarray, bound: int, rules: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
    """The rules, without repeats, with SHARES steps before the first that stops any row early."""
    before: np.ndarray | None = None
    for thresholds in rules:
        if before is not None and np.array_equal(thresholds, before):
            continue
        if before is not None and not np.isfinite(before).any() and np.isfinite(thresholds).any():
            for share in SHARES:
                yield shrink(probs, thresholds, bound, share)
        yield thresholds
        before = thresholds


def shrink(probs: np.ndarray, thresholds: np.ndarray, bound: int, share: float) -> np.ndarray:
    """The rule stopping, at each stage, the most confident `share` of the rows `thresholds` stop there
    (of those still running under the shrunk rule): thresholds raised, stage by stage."""
    out = np.full_like(thresholds, np.inf)
    confidence = probs.max(-1)
    running = np.ones(len(probs), dtype=bool)
    for stage in range(min(bound, len(thresholds))):
        if not np.isfinite(thresholds[stage]):
            continue
        stopping = np.sort(confidence[running & (confidence[:, stage] >= thresholds[stage]), stage])[::-1]
        if stopping.size == 0:
            continue
        out[stage] = stopping[max(int(np.ceil(share * stopping.size)) - 1, 0)]
        running &= ~(confidence[:, stage] >= out[stage])
    return out


def propose_thresholds(oof: np.ndarray, gold: np.ndarray, margin: float, bound: int, min_rows: int = 10) -> np.ndarray:
    """Candidate thresholds from the fit split's out-of-fold probabilities, exit by exit: at each exit,
    the lowest threshold at which the rows still running that would stop there lose at most `margin`
    balanced accuracy (plus one standard error) against the bound's head on those same rows. At least
    `min_rows` records must stop at an exit for it to get a threshold. A proposal only: it promises
    nothing until the calibration split certifies it (`ExitHeads.cascade_thresholds`)."""
    correct = oof.argmax(-1) == gold[:, None]  # [N, E]
    confidence = oof.max(-1)
    weight = row_weights(gold)
    thresholds = np.full(oof.shape[1], np.inf)
    running = np.ones(len(gold), dtype=bool)
    for exit_ in range(min(bound, oof.shape[1] - 1)):
        rows = np.flatnonzero(running)
        order = rows[np.argsort(-confidence[rows, exit_], kind="stable")]
        ranked = confidence[order, exit_]
        # +w: stopping here loses a row the bound's head gets right, weighted by its label's rarity
        change = weight[order] * (correct[order, bound].astype(np.int64) - correct[order, exit_])
        lost, count, mass = np.cumsum(change), np.arange(1, len(order) + 1), np.cumsum(weight[order])
        spread = np.sqrt(np.maximum(np.cumsum(change**2) - lost**2 / count, 0.0))  # sqrt(n) x sd of the loss
        ok = np.flatnonzero(lost + spread <= margin * mass)
        # a threshold stops every row at least that sure: cut only between different confidences
        boundary = np.append(ranked[1:] < ranked[:-1], True)  # the next row is less sure
        ok = ok[(ok + 1 >= min_rows) & boundary[ok]]
        if ok.size == 0:
            continue
        thresholds[exit_] = confidence[order[ok.max()], exit_]
        running &= ~(confidence[:, exit_] >= thresholds[exit_])
    return thresholds


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


class FitCancelled(Exception):
    """A fit stopped on request (the server is shutting down)."""


Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


def _fit(batches: Batches, total: float, exits: int, dim: int, c: torch.Tensor, n_labels: int,
         max_iter: int = 100, cancelled: Callable[[], bool] = lambda: False,
         start: tuple[torch.Tensor, torch.Tensor] | None = None,
         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-weighted multinomial logistic regression per exit, all exits at once.

    `batches()` yields the rows in chunks, (x [E, n, H] standardised, y [n], w [n] class weights);
    `total` is the sum of all w. Minimises, per exit, sum_i w_i CE_i + ||W||^2 / (2 C) (scikit-learn's
    objective), divided by `total`, the gradient summed chunk by chunk: memory follows the chunk, not
    the records. `start`: the weights [E, H, C] and biases [E, C] to start from (a neighbouring C's
    solution, or the served version's), else zeros.
    """
    if start is None:
        weight = torch.zeros(exits, dim, n_labels, dtype=dtype, requires_grad=True)
        bias = torch.zeros(exits, 1, n_labels, dtype=dtype, requires_grad=True)
    else:
        weight = start[0].clone().to(dtype).requires_grad_(True)
        bias = start[1].clone().to(dtype).unsqueeze(1).requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = 0.0
        for x, y, w in batches():
            if cancelled():
                raise FitCancelled("exit-head fit cancelled")
            logits = torch.bmm(x, weight) + bias  # [E, n, C]
            ce = torch.nn.functional.cross_entropy(logits.reshape(-1, n_labels), y.expand(exits, -1).reshape(-1),
                                                   reduction="none")
            part = ((ce.view(exits, -1) * w).sum(1) / total).sum()
            part.backward()
            loss += float(part.detach())
        penalty = ((weight**2).sum((1, 2)) / (2 * c * total)).sum()
        penalty.backward()
        return torch.tensor(loss + float(penalty.detach()))

    optimizer.step(closure)
    return weight.detach(), bias.detach().squeeze(1)


def _predict(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.softmax(torch.bmm(x, weight.float()) + bias.float().unsqueeze(1), -1)  # [E, N, C]


def take_groups(groups: np.ndarray, want: int, seed: int) -> np.ndarray:
    """[N] bool: whole near-duplicate groups, in a seeded random order, until about `want` rows."""
    sizes = np.bincount(groups)
    taken: list[int] = []
    count = 0
    for g in np.random.default_rng(seed).permutation(len(sizes)):
        if count >= want:
            break
        if count + sizes[g] <= want + max(1, want // 20):  # a huge group would overshoot: skip it
            taken.append(int(g))
            count += int(sizes[g])
    return np.isin(groups, taken)


def calibration_split(groups: np.ndarray, share: float = CALIBRATION_SHARE, cap: int = CALIBRATION_ROWS,
                      seed: int = 0) -> np.ndarray:
    """[N] bool: whole near-duplicate groups, in a seeded random order, until `share` of the rows (at most
    `cap`) are taken; none below CALIBRATION_MIN_RECORDS records."""
    n = len(groups)
    if n < CALIBRATION_MIN_RECORDS:
        return np.zeros(n, dtype=bool)
    return take_groups(groups, min(int(share * n), cap), seed + 1)


def grown_calibration_split(groups: np.ndarray, known: np.ndarray, was: np.ndarray, cap: int = CALIBRATION_ROWS,
                            share: float = CALIBRATION_SHARE, seed: int = 0) -> np.ndarray:
    """The calibration split after growth: records the served version knew keep their side (`known`
    [N] bool, `was` [N] bool: in its calibration split); a new record joins its group's known side, and
    a new group goes to calibration with probability `share` while the split is under `cap`."""
    split = np.where(known, was, False)
    side: dict[int, bool] = {int(g): bool(c) for g, c in zip(groups[known], was[known])}
    rng = np.random.default_rng(seed + 3 + int(known.sum()))
    count = int(split.sum())
    for i in np.flatnonzero(~known):
        g = int(groups[i])
        if g not in side:
            side[g] = count < cap and rng.random() < share
        split[i] = side[g]
        count += int(split[i])
    return split


class Standardised:
    """The fit's view of its features: rows turned, a chunk at a time, into standardised float32
    [E, rows, d] tensors, from the int8 codes (or float features) kept in memory."""

    def __init__(self, features: FeatureMatrix, mean: np.ndarray, scale: np.ndarray) -> None:
        self.features, self.mean, self.scale = features, mean.astype(np.float32), scale.astype(np.float32)

    @classmethod
    def fit(cls, features: FeatureMatrix, rows: np.ndarray) -> Standardised:
        """Mean and standard deviation per exit and coordinate over `rows`, from sums taken chunk by chunk."""
        _, e, d = features.shape
        total, squares = np.zeros((e, d)), np.zeros((e, d))
        for chunk in _chunks(rows):
            x = features.exit_major(chunk).astype(np.float64)
            total += x.sum(1)
            squares += (x * x).sum(1)
        mean = total / max(len(rows), 1)
        scale = np.sqrt(np.maximum(squares / max(len(rows), 1) - mean**2, 0.0))
        scale[scale < 1e-6] = 1.0
        return cls(features, mean, scale)

    def __call__(self, rows: np.ndarray) -> torch.Tensor:
        """[E, len(rows), d] float32, standardised in place (the chunk's only float copy)."""
        x = self.features.exit_major(rows)
        x -= self.mean[:, None, :]
        x /= self.scale[:, None, :]
        return torch.from_numpy(x)

    def batches(self, rows: np.ndarray, y: np.ndarray, w: np.ndarray) -> Batches:
        def each() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
            for at in _chunks(np.arange(len(rows))):
                yield self(rows[at]), torch.from_numpy(y[at]), torch.from_numpy(w[at])
        return each

    def predict(self, rows: np.ndarray, weight: torch.Tensor, bias: torch.Tensor) -> np.ndarray:
        """[len(rows), E, C] probabilities, a chunk at a time."""
        out = [_predict(self(rows[at]), weight, bias).permute(1, 0, 2).numpy() for at in _chunks(np.arange(len(rows)))]
        return np.concatenate(out) if out else np.zeros((0, weight.shape[0], weight.shape[2]), dtype=np.float32)


def _chunks(rows: np.ndarray, size: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]


def fit_heads(features: FeatureMatrix | np.ndarray, labels: Sequence[int] | np.ndarray, n_labels: int,
              record_ids: Sequence[str], label_names: Sequence[str], groups: np.ndarray | None = None,
              c_grid: Sequence[float] = C_GRID, folds: int = FOLDS, seed: int = 0, calibrate: bool = True,
              progress: Callable[[str], None] | None = None,
              cancelled: Callable[[], bool] = lambda: False, previous: ExitHeads | None = None,
              split: np.ndarray | None = None) -> ExitHeads:
    """Fit one head per exit on [N, E, d] features; `groups` ([N]; None: every record its own group)
    are near-duplicate groups that no split divides. With a compatible `previous` version
    (`can_grow_from`), a warm refit (`_grow`); else a full one:

    - a calibration split held out for the cascade (unless `calibrate` is False);
    - C per exit by `folds`-fold cross-validation on at most CV_ROWS fit records (whole groups);
    - the heads that are served fit on every fit record, warm-started from the subsample's solution,
      the gradient summed in chunks;
    - judgments: cross-validated records out of fold; other fit records by a fold model (which saw
      none of them); calibration records by the served heads.

    `split` ([N] bool): the calibration split to use (the key head takes the exit heads').
    """
    start = time.perf_counter()
    n = len(labels)
    if n < MIN_RECORDS:
        raise InvalidInput(f"exit heads need at least {MIN_RECORDS} records with exit features, got {n}")
    fm = features if isinstance(features, FeatureMatrix) else FeatureMatrix(np.asarray(features))
    groups = np.arange(n) if groups is None else np.asarray(groups)
    gold = np.asarray(labels, dtype=np.int64)
    if previous is not None and can_grow_from(previous, fm, label_names, n):
        return _grow(previous, fm, gold, record_ids, groups, calibrate, progress, cancelled, start, split)
    calibration = split if split is not None else \
        calibration_split(groups, seed=seed) if calibrate else np.zeros(n, dtype=bool)
    fit_idx = np.flatnonzero(~calibration)
    weights = class_weights(gold[fit_idx], n_labels)
    std = Standardised.fit(fm, fit_idx)
    _, exits, dim = fm.shape
    cv_idx = fit_idx if len(fit_idx) <= CV_ROWS else fit_idx[take_groups(groups[fit_idx], CV_ROWS, seed + 2)]
    fold_of = group_folds(groups[cv_idx], folds, seed)
    order = np.argsort(fold_of, kind="stable")  # the sample in fold order: a fold's rest is two slices, no copy
    cv_idx, fold_of = cv_idx[order], fold_of[order]
    bounds = np.searchsorted(fold_of, np.arange(folds + 1))
    x, y = std(cv_idx), gold[cv_idx]
    w = weights[np.searchsorted(fit_idx, cv_idx)]
    grid = sorted(c_grid)
    oof = np.zeros((len(grid), len(cv_idx), exits, n_labels))
    solutions: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    for f in range(folds):
        start_f, end_f = int(bounds[f]), int(bounds[f + 1])
        parts = [(x[:, a:b], torch.from_numpy(y[a:b]), torch.from_numpy(w[a:b]))
                 for a, b in ((0, start_f), (end_f, len(y))) if b > a]
        trained = float(w.sum() - w[start_f:end_f].sum())
        solution, per_c = None, []
        for ci, c_value in enumerate(grid):  # strongest penalty first; each warm-starts the next
            solution = _fit(_given(parts), trained, exits, dim, torch.full((exits,), float(c_value)),
                            n_labels, cancelled=cancelled, start=solution)
            per_c.append(solution)
            oof[ci, start_f:end_f] = _predict(x[:, start_f:end_f], *solution).permute(1, 0, 2).numpy()
        solutions.append(per_c)
        if progress:
            progress(f"fold {f + 1}/{folds}: {len(grid)} C values fitted on {len(y) - (end_f - start_f)} records")
    correct = oof.argmax(-1) == y[None, :, None]  # [G, N, E]
    rw = row_weights(y)[None, :, None]
    balanced = (rw * correct).sum(1) / rw.sum()  # [G, E]
    loss = (-rw * np.log(np.take_along_axis(oof, y[None, :, None, None], -1)[..., 0].clip(1e-12))).mean(1)
    chosen = np.lexsort((loss, -np.round(balanced, 6)), axis=0)[0]  # per exit: best balanced accuracy, then loss
    c_chosen = torch.tensor([grid[g] for g in chosen], dtype=torch.float32)
    exit_index = np.arange(exits)
    weight, bias = _fit(_one_batch(x, y, w), float(w.sum()), exits, dim, c_chosen, n_labels, cancelled=cancelled)
    del x  # the sample's float copy: not needed past here
    judged = np.zeros((n, exits, n_labels), dtype=np.float16)  # as stored
    judged[cv_idx] = oof[chosen, :, exit_index].transpose(1, 0, 2)
    rest = np.setdiff1d(fit_idx, cv_idx)
    if rest.size:  # every fit record trains the served heads, warm-started from the subsample's
        if progress:
            progress(f"all {len(fit_idx)} fit records, from the {len(cv_idx)}-record solution")
        weight, bias = _fit(std.batches(fit_idx, gold[fit_idx], weights), float(weights.sum()), exits, dim,
                            c_chosen, n_labels, cancelled=cancelled, start=(weight, bias))
        for f in range(folds):  # judged by a fold model: trained on the subsample, it never saw them
            mine = rest[np.arange(len(rest)) % folds == f]
            fold_weight = torch.stack([solutions[f][chosen[e]][0][e] for e in exit_index])
            fold_bias = torch.stack([solutions[f][chosen[e]][1][e] for e in exit_index])
            judged[mine] = std.predict(mine, fold_weight, fold_bias)
    cal_idx = np.flatnonzero(calibration)
    judged[cal_idx] = std.predict(cal_idx, weight, bias)  # by the heads that are served, which never saw them
    space = FitSpace(std.mean.astype(np.float64), std.scale.astype(np.float64), weight.double().numpy(),
                     bias.double().numpy(), full_fit_records=n)
    return _heads(label_names, space, np.array([grid[g] for g in chosen]), record_ids, judged, gold, calibration,
                  time.perf_counter() - start)


def _given(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Batches:
    return lambda: parts


def _one_batch(x: torch.Tensor, y: np.ndarray, w: np.ndarray) -> Batches:
    return _given([(x, torch.from_numpy(y), torch.from_numpy(w))])


def class_weights(gold: np.ndarray, n_labels: int) -> np.ndarray:
    """[N] float32 per record: balanced, as scikit-learn's "balanced" (labels absent count as one)."""
    counts = np.maximum(np.bincount(gold, minlength=n_labels), 1)
    return (len(gold) / (n_labels * counts)).astype(np.float32)[gold]


def _heads(label_names: Sequence[str], space: FitSpace, c: np.ndarray, record_ids: Sequence[str], judged: np.ndarray,
           gold: np.ndarray, calibration: np.ndarray, seconds: float) -> ExitHeads:
    fit = ~calibration
    accuracy = (judged[fit].argmax(-1) == gold[fit, None]).mean(0) if fit.any() else np.zeros(judged.shape[1])
    return ExitHeads(list(label_names), space.mean, space.scale, space.weight, space.bias, c, accuracy,
                     list(record_ids), judged.astype(np.float16, copy=False), gold.astype(np.int32), calibration,
                     seconds=seconds, space=space)


def can_grow_from(previous: ExitHeads, features: FeatureMatrix, label_names: Sequence[str], n: int) -> bool:
    """A warm refit keeps the previous version's C and standardisation: only while its records are at
    least 1 / REFIT_GROWTH of today's, over the same labels and feature space, with a calibration split."""
    space = previous.space
    return (space is not None and previous.labels == list(label_names) and previous.calibration is not None
            and previous.gold is not None and space.mean.shape == features.shape[1:]
            and n <= space.full_fit_records * REFIT_GROWTH)


def _grow(previous: ExitHeads, fm: FeatureMatrix, gold: np.ndarray, record_ids: Sequence[str], groups: np.ndarray,
          calibrate: bool, progress: Callable[[str], None] | None, cancelled: Callable[[], bool],
          start: float, split: np.ndarray | None = None) -> ExitHeads:
    """A refit after growth, from the served version: its C, standardisation and weights to start from;
    records it knew keep their split and their judgments (made by heads that never saw them); new fit
    records are judged by the served version (which never saw them either), before they train the new
    heads; the calibration split is judged again by the new heads, which never train on it. The costly
    part of a full fit, the cross-validation, is not repeated: cost follows the records added (the
    warm-started fit over all records converges in a few passes)."""
    space = previous.space
    assert space is not None and previous.calibration is not None and previous.gold is not None
    n, (_, exits, dim), n_labels = len(gold), fm.shape, len(previous.labels)
    at = np.array([previous._index.get(rid, -1) for rid in record_ids])
    known = at >= 0
    was = np.where(known, previous.calibration[np.maximum(at, 0)], False)
    calibration = split if split is not None else \
        grown_calibration_split(groups, known, was) if calibrate else np.zeros(n, dtype=bool)
    fit_idx = np.flatnonzero(~calibration)
    std = Standardised(fm, space.mean, space.scale)
    judged = np.zeros((n, exits, n_labels), dtype=np.float16)  # as stored
    judged[known] = previous.oof[at[known]]
    new_fit = np.flatnonzero(~known & ~calibration)
    served = torch.from_numpy(space.weight).float(), torch.from_numpy(space.bias).float()
    judged[new_fit] = std.predict(new_fit, *served)
    weights = class_weights(gold[fit_idx], n_labels)
    if progress:
        progress(f"warm refit of {len(fit_idx)} fit records ({len(new_fit)} new) from version {previous.version}")
    weight, bias = _fit(std.batches(fit_idx, gold[fit_idx], weights), float(weights.sum()), exits, dim,
                        torch.from_numpy(previous.c.astype(np.float32)), n_labels, max_iter=GROW_ITERATIONS,
                        cancelled=cancelled, start=served)
    cal_idx = np.flatnonzero(calibration)
    judged[cal_idx] = std.predict(cal_idx, weight, bias)
    grown = FitSpace(space.mean, space.scale, weight.double().numpy(), bias.double().numpy(), space.full_fit_records)
    return _heads(previous.labels, grown, previous.c, record_ids, judged, gold, calibration,
                  time.perf_counter() - start)


def fit_with_key(features: FeatureMatrix | np.ndarray, keys: np.ndarray, labels: Sequence[int] | np.ndarray,
                 n_labels: int, record_ids: Sequence[str], label_names: Sequence[str], groups: np.ndarray,
                 lengths: np.ndarray, progress: Callable[[str], None] | None = None,
                 cancelled: Callable[[], bool] = lambda: False, previous: ExitHeads | None = None) -> ExitHeads:
    """`fit_heads`, then the key head on the records' keys [N, d] with the same calibration split and
    folds (so a key-first cascade is certified on records that neither stage trained on), and the
    records' coverage (`Coverage.learn`, from their keys and lengths in words)."""
    heads = fit_heads(features, labels, n_labels, record_ids, label_names, groups=groups, progress=progress,
                      cancelled=cancelled, previous=previous)
    if progress:
        progress("key head")
    heads.key = fit_heads(np.asarray(keys, dtype=np.float32)[:, None, :], labels, n_labels, record_ids, label_names,
                          groups=groups, cancelled=cancelled, split=heads.calibration,
                          previous=previous.key if previous is not None else None)
    heads.coverage = Coverage.learn(np.asarray(keys, dtype=np.float32), groups, lengths)
    return heads
