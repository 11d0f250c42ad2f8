"""Fitting exit heads (raee_server.core.heads): the full fit, with C chosen per exit by grouped
cross-validation, and the warm refit after growth; both stream the features a chunk at a time, so
memory follows CHUNK_ROWS and CV_ROWS, not the records."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from raee_server.core.cascade import row_weights
from raee_server.core.groups import group_folds
from raee_server.core.heads import C_GRID, Coverage, ExitHeads, FitSpace
from raee_server.errors import InvalidInput
from raee_server.stores.codec import FeatureMatrix

FOLDS = 5
MIN_RECORDS = 20
CALIBRATION_SHARE = 0.3  # of the records (whole near-duplicate groups), held out for the cascade
CALIBRATION_ROWS = 5000  # at most: beyond that the bound is tight and the heads want the records
CALIBRATION_MIN_RECORDS = 100  # below this, no calibration split: cascades never stop early
CV_ROWS = 20000  # C is chosen by cross-validation on at most this many fit records (whole groups)
CHUNK_ROWS = 4096  # rows a fit step turns from codes into float32 at a time: memory follows this
GROW_ITERATIONS = 40  # L-BFGS steps of a warm refit (from the served version's weights)
REFIT_GROWTH = 2.0  # a warm refit keeps C and standardisation until the records double since the full fit


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
