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

This module holds the fitted heads and what serving reads from them; raee_server.core.fitting fits
them and raee_server.core.cascade holds the stopping rule's arithmetic. Fitting runs off the request
path (`raee-admin fit-heads`, after a local ingest, and in the server's background); a fit makes a
new version that replaces the served one atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC
from functools import cached_property
from typing import Any

import numpy as np
import torch

from raee_server.core.cascade import candidate_rules, cascade_exits, risk_bound, row_weights
from raee_server.errors import InvalidInput
from raee_server.stores.codec import FeatureCodec
from raee_server.stores.metadata import StoredHeads
from raee_server.types import Neighbour

# Inverse L2 strength, as scikit-learn's C (per record, class-weighted), the grid a full fit chooses from
# (raee_server.core.fitting). Wide on purpose: on 5,000-record databases every task's best head sat at
# the lower edge of {0.01, 0.1, 1} (issue 24).
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
# Coverage: an input is outside what the records cover when its nearest record is less similar than all
# but this share of the records' own nearest records (outside their near-duplicate group), or it is longer
# than all but this share of the records. In coverage by construction, about 2 x this share of traffic like
# the records is still flagged (and walks to the best head: costs depth, not accuracy).
COVERAGE_QUANTILE = 0.02
COVERAGE_SAMPLE = 2000  # records whose nearest neighbours set the similarity floor


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



def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True))
