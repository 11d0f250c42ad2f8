"""Exit heads: a linear classifier per task and exit, fit on the records' exit features.

On Gemma 3 270M the logit lens of most exits predicts one constant label, yet a linear head on
the same exit's hidden state beats the full model (docs/results.md). So each task gets, per exit,
a multinomial logistic regression on the standardised readout features:

- the L2 strength is chosen per exit by k-fold cross-validation on the records (out-of-fold
  balanced accuracy, then log-loss), with class weights that balance the labels; the best exit
  and the cascades' thresholds are judged class-weighted too, so a database with more of one
  label does not make the heads favour it (the records' label mix is not the traffic's);
- every record is also judged by heads that never saw it (its out-of-fold probabilities), so
  policies that aggregate the neighbours' correct exits (`paper-heads`) and `auto`'s validation
  read honest judgments;
- all exits are fit at once, as one batched problem ([E, N, H] @ [E, H, C]) with L-BFGS.

Fitting runs off the request path (`raee-admin fit-heads`, after a local ingest, and in the
server's background); a fit makes a new version that replaces the served one atomically.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from raee_server.errors import InvalidInput

C_GRID = (0.01, 0.1, 1.0)  # inverse L2 strength, as scikit-learn's C (per record, class-weighted)
FOLDS = 5
MIN_RECORDS = 20


@dataclass
class ExitHeads:
    """Fitted heads of one task: probabilities at any exit from its features, and the records'
    out-of-fold judgments."""

    labels: list[str]
    mean: np.ndarray  # [E, H] feature means
    scale: np.ndarray  # [E, H] feature standard deviations (1 where constant)
    weight: np.ndarray  # [E, H, C]
    bias: np.ndarray  # [E, C]
    c: np.ndarray  # [E] chosen C
    accuracy: np.ndarray  # [E] out-of-fold accuracy on the records
    record_ids: list[str]
    oof: np.ndarray  # [N, E, C] float16 out-of-fold probabilities of each record
    gold: np.ndarray | None = None  # [N] each record's label index (None in heads stored before it was kept)
    version: int = 0
    fitted_at: str = ""
    seconds: float = 0.0
    _index: dict[str, int] = field(default_factory=dict, repr=False)
    _cascades: dict[tuple[float, int], np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {rid: i for i, rid in enumerate(self.record_ids)}

    @property
    def exits(self) -> int:
        return int(self.weight.shape[0])

    @cached_property
    def balanced_accuracy(self) -> np.ndarray:
        """[E] out-of-fold balanced accuracy (mean recall over the labels) on the records; plain
        accuracy for heads stored before the records' labels were kept. Computed once: policies
        bound to these heads read the best exit."""
        if self.gold is None:
            return self.accuracy
        correct = self.oof.argmax(-1) == self.gold[:, None]  # [N, E]
        weights = row_weights(self.gold)
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
        """A record's out-of-fold probabilities at every exit [E, C]; None for records newer than the fit."""
        i = self._index.get(record_id)
        return None if i is None else self.oof[i].astype(np.float64)

    def cascade_thresholds(self, margin: float, bound: int | None = None) -> np.ndarray:
        """Per-exit confidence thresholds [E] of the cascade that stops each row at the first exit
        whose head is at least that sure, and otherwise answers with the head at `bound` (default:
        the best exit). Calibrated on the records' out-of-fold probabilities, exit by exit: at each
        exit, the lowest threshold at which the rows still running that would stop there lose at
        most `margin` balanced accuracy (plus one standard error) against what the bound's head gets
        on those same rows. So the cascade's out-of-fold balanced accuracy is at most `margin` below
        the bound head's; inf: never stop. Balanced: each record counts in inverse proportion to its
        label's records, so errors on a rare label are not cheap."""
        bound = self.best_exit if bound is None else bound
        key = (round(margin, 6), bound)
        if key not in self._cascades:
            if self.gold is None:
                raise InvalidInput("these exit heads predate cascade calibration: refit them (`raee-admin fit-heads`)")
            self._cascades[key] = _cascade(self.oof.astype(np.float64), self.gold, margin, bound)
        return self._cascades[key]

    def summary(self) -> dict[str, Any]:
        return {"version": self.version, "fitted_at": self.fitted_at, "seconds": round(self.seconds, 2),
                "records": len(self.record_ids), "c": [float(c) for c in self.c],
                "accuracy": [round(float(a), 4) for a in self.accuracy], "best_exit": self.best_exit}

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        arrays: dict[str, np.ndarray] = {
            "labels": np.array(self.labels), "mean": self.mean.astype(np.float32),
            "scale": self.scale.astype(np.float32), "weight": self.weight.astype(np.float32),
            "bias": self.bias.astype(np.float32), "c": self.c, "accuracy": self.accuracy,
            "record_ids": np.array(self.record_ids), "oof": self.oof.astype(np.float16)}
        if self.gold is not None:
            arrays["gold"] = self.gold.astype(np.int32)
        np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, version: int, fitted_at: str, seconds: float) -> ExitHeads:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        return cls([str(x) for x in z["labels"]], z["mean"].astype(np.float64), z["scale"].astype(np.float64),
                   z["weight"].astype(np.float64), z["bias"].astype(np.float64), z["c"], z["accuracy"],
                   [str(x) for x in z["record_ids"]], z["oof"], z["gold"] if "gold" in z.files else None,
                   version, fitted_at, seconds)


def row_weights(gold: np.ndarray) -> np.ndarray:
    """Per record, the inverse of its label's share of the records, scaled to mean 1: weighted by
    these, accuracy is balanced accuracy (and all weights are 1 on a balanced database)."""
    counts = np.bincount(gold)
    present = np.count_nonzero(counts)
    return np.asarray(len(gold) / (present * counts[gold]), dtype=np.float64)


def _cascade(oof: np.ndarray, gold: np.ndarray, margin: float, bound: int, min_rows: int = 10) -> np.ndarray:
    """See `ExitHeads.cascade_thresholds`. At least `min_rows` records must stop at an exit for
    it to get a threshold: fewer say nothing about the head's accuracy at that confidence."""
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
        # the loss plus one standard error within the budget: a lucky run of rows sets no threshold
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


def _fit(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, c: torch.Tensor, n_labels: int,
         max_iter: int = 100, cancelled: Callable[[], bool] = lambda: False) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-weighted multinomial logistic regression per exit, all exits at once.

    x [E, N, H] standardised, y [N], weights [N] (class weights), c [E]. Minimises, per exit,
    sum_i w_i CE_i + ||W||^2 / (2 C) (scikit-learn's objective), divided by sum_i w_i.
    """
    exits, n, dim = x.shape
    weight = torch.zeros(exits, dim, n_labels, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(exits, 1, n_labels, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)
    total = weights.sum()
    targets = y.expand(exits, n)

    def closure() -> torch.Tensor:
        if cancelled():
            raise FitCancelled("exit-head fit cancelled")
        optimizer.zero_grad()
        logits = torch.bmm(x, weight) + bias  # [E, N, C]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, n_labels), targets.reshape(-1), reduction="none")
        data = (ce.view(exits, n) * weights).sum(1) / total
        penalty = (weight**2).sum((1, 2)) / (2 * c * total)
        loss = (data + penalty).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach().squeeze(1)


def _predict(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.softmax(torch.bmm(x, weight) + bias.unsqueeze(1), -1)  # [E, N, C]


def fit_heads(features: np.ndarray, labels: Sequence[int], n_labels: int, record_ids: Sequence[str],
              label_names: Sequence[str], c_grid: Sequence[float] = C_GRID, folds: int = FOLDS, seed: int = 0,
              progress: Callable[[str], None] | None = None,
              cancelled: Callable[[], bool] = lambda: False) -> ExitHeads:
    """Fit one head per exit on [N, E, H] features; C per exit by `folds`-fold cross-validation."""
    start = time.perf_counter()
    n = len(labels)
    if n < MIN_RECORDS:
        raise InvalidInput(f"exit heads need at least {MIN_RECORDS} records with exit features, got {n}")
    y = torch.tensor(np.asarray(labels), dtype=torch.long)
    counts = torch.bincount(y, minlength=n_labels).clamp(min=1).double()
    class_weight = (n / (n_labels * counts)).float()  # balanced, as scikit-learn's class_weight="balanced"
    mean = features.astype(np.float64).mean(0)  # [E, H]
    scale = features.astype(np.float64).std(0)
    scale[scale < 1e-6] = 1.0
    # float32: half the memory of float64 (5,000 records x 19 exits x 640 = 243 MB) at the same answers
    x = torch.from_numpy(((features.astype(np.float64) - mean) / scale).astype(np.float32).transpose(1, 0, 2).copy())
    exits = x.shape[0]
    order = np.random.default_rng(seed).permutation(n)
    fold_of = np.empty(n, dtype=np.int64)
    fold_of[order] = np.arange(n) % folds
    oof = np.zeros((len(c_grid), n, exits, n_labels))
    for ci, c_value in enumerate(c_grid):
        c = torch.full((exits,), float(c_value))
        for f in range(folds):
            train, held = np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f)
            w, b = _fit(x[:, train], y[train], class_weight[y[train]], c, n_labels, cancelled=cancelled)
            oof[ci, held] = _predict(x[:, held], w, b).permute(1, 0, 2).numpy()
        if progress:
            progress(f"C={c_value}: {folds} folds fitted")
    gold = y.numpy()
    correct = oof.argmax(-1) == gold[None, :, None]  # [G, N, E]
    accuracy = correct.mean(1)  # [G, E]
    rw = row_weights(gold)[None, :, None]
    balanced = (rw * correct).sum(1) / rw.sum()  # [G, E]
    loss = (-rw * np.log(np.take_along_axis(oof, gold[None, :, None, None], -1)[..., 0].clip(1e-12))).mean(1)
    chosen = np.lexsort((loss, -np.round(balanced, 6)), axis=0)[0]  # per exit: best balanced accuracy, then loss
    c_chosen = np.array([c_grid[g] for g in chosen])
    weight, bias = _fit(x, y, class_weight[y], torch.tensor(c_chosen, dtype=torch.float32), n_labels,
                        cancelled=cancelled)
    exit_index = np.arange(exits)
    return ExitHeads(list(label_names), mean, scale, weight.double().numpy(), bias.double().numpy(), c_chosen,
                     accuracy[chosen, exit_index], list(record_ids),
                     oof[chosen, :, exit_index].transpose(1, 0, 2).astype(np.float16), gold.astype(np.int32),
                     seconds=time.perf_counter() - start)
