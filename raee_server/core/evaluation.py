"""Offline evaluation of exit policies: every policy on the same rows, from one forward per row.

Each measured row gets one full forward that yields the label probabilities at
every exit, and one retrieval of its neighbours. A policy's answer is read at
the exit its decision resolves to: that equals a truncated forward to that
exit (layers below l never depend on later ones; tests pin this), so all
policies are compared on identical computations for the cost of one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raee_server.core.engine import Engine, softmax
from raee_server.core.policies import ExitPolicy, mix, reads_heads, resolve_exit, settle, uses_head_exits
from raee_server.errors import InvalidInput
from raee_server.types import Neighbour, Row


@dataclass
class Measured:
    """Everything a policy needs to be evaluated on one row, without running the backbone again."""

    gold: int
    probs: np.ndarray  # [L + 1, C] label probabilities at every exit (the lens)
    neighbours: list[Neighbour]  # the nearest records, most similar first
    head_probs: np.ndarray | None = None  # [L + 1, C] the task's exit heads (when it has them)
    head_neighbours: list[Neighbour] | None = None  # the neighbours with their head-judged exits
    key_probs: np.ndarray | None = None  # [C] the task's key head
    covered: bool = True  # the task's records cover the row (heads.Coverage)


def _balanced(gold: np.ndarray, pred: np.ndarray, n_labels: int) -> float:
    recalls = [float(np.mean(pred[gold == c] == c)) for c in range(n_labels) if np.any(gold == c)]
    return float(np.mean(recalls)) if recalls else 0.0


def paired_gap(a: PolicyResult, b: PolicyResult, n_labels: int, balanced: bool, draws: int = 2000, seed: int = 0
               ) -> tuple[float, float, float]:
    """a's score minus b's (accuracy, or balanced accuracy) on the same rows, and a 95 % paired bootstrap
    interval: rows drawn with replacement, both answers of a row kept together, so what the two share
    (the rows' difficulty) cancels and the interval is about their difference alone."""
    if a.gold != b.gold:
        raise InvalidInput("a paired gap needs both results on the same rows")
    gold = np.array(a.gold)
    diff = (np.array(a.predicted) == gold).astype(np.float64) - (np.array(b.predicted) == gold)
    draw = np.random.default_rng(seed).integers(0, len(gold), (draws, len(gold)))
    drawn_diff = diff[draw]  # [draws, rows]
    if not balanced:
        gaps = drawn_diff.mean(1)
        point = float(diff.mean())
    else:
        recalls, point_recalls = [], []
        drawn_gold = gold[draw]
        for c in np.unique(gold):
            drawn = drawn_gold == c
            # a draw without this label leaves its recall out, as _balanced does for an absent label
            recalls.append(np.where(drawn.any(1), (drawn_diff * drawn).sum(1) / np.maximum(drawn.sum(1), 1),
                                    np.nan))
            point_recalls.append(diff[gold == c].mean())
        gaps = np.nanmean(np.stack(recalls), 0)
        point = float(np.mean(point_recalls))
    low, high = np.percentile(gaps, [2.5, 97.5])
    return point, float(low), float(high)


@dataclass
class PolicyResult:
    name: str
    depth: int
    gold: list[int] = field(default_factory=list)
    predicted: list[int] = field(default_factory=list)
    exits: list[int] = field(default_factory=list)
    keyed: list[bool] = field(default_factory=list)  # answered by the key head (no backbone layer)

    @property
    def key_share(self) -> float:
        """The share of rows the key head answered."""
        return float(np.mean(self.keyed)) if self.keyed else 0.0

    @property
    def rows(self) -> int:
        return len(self.gold)

    @property
    def accuracy(self) -> float:
        return float(np.mean(np.array(self.gold) == np.array(self.predicted))) if self.gold else 0.0

    def balanced_accuracy(self, n_labels: int) -> float:
        """Mean recall over the labels present in the gold answers: what always answering the
        majority label cannot score well on."""
        return _balanced(np.array(self.gold), np.array(self.predicted), n_labels)

    def balanced_gap(self, other: PolicyResult, n_labels: int, draws: int = 2000, seed: int = 0
                     ) -> tuple[float, float, float]:
        """This result's balanced accuracy minus `other`'s on the same rows, with a 95 % paired
        bootstrap interval (`paired_gap`): a few rows of a rare label move balanced accuracy by
        points, and the interval says how far."""
        return paired_gap(self, other, n_labels, balanced=True, draws=draws, seed=seed)

    def accuracy_gap(self, other: PolicyResult, draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
        """This result's accuracy minus `other`'s on the same rows, with a 95 % paired bootstrap interval."""
        return paired_gap(self, other, 0, balanced=False, draws=draws, seed=seed)

    def macro_f1(self, n_labels: int) -> float:
        gold, pred = np.array(self.gold), np.array(self.predicted)
        scores = []
        for c in range(n_labels):
            tp = np.sum((pred == c) & (gold == c))
            fp, fn = np.sum((pred == c) & (gold != c)), np.sum((pred != c) & (gold == c))
            if tp + fp + fn:
                scores.append(2 * tp / (2 * tp + fp + fn))
        return float(np.mean(scores)) if scores else 0.0

    def subset(self, rows: Sequence[int]) -> PolicyResult:
        """The same answers on some of the rows (e.g. those no record leaks into)."""
        return PolicyResult(self.name, self.depth, [self.gold[i] for i in rows], [self.predicted[i] for i in rows],
                            [self.exits[i] for i in rows], [self.keyed[i] for i in rows] if self.keyed else [])

    @property
    def mean_exit(self) -> float:
        return float(np.mean(self.exits)) if self.exits else float("nan")

    @property
    def p95_exit(self) -> float:
        return float(np.percentile(self.exits, 95)) if self.exits else float("nan")

    @property
    def layers_saved(self) -> float:
        """Fraction of decoder-layer computations saved against running every row to the last layer."""
        return 1.0 - self.mean_exit / self.depth if self.depth else 0.0

    def histogram(self) -> list[int]:
        return np.bincount(np.asarray(self.exits, dtype=int), minlength=self.depth + 1).tolist()

    def summary(self, n_labels: int) -> dict[str, object]:
        return {"policy": self.name, "rows": self.rows, "accuracy": self.accuracy,
                "balanced_accuracy": self.balanced_accuracy(n_labels),
                "macro_f1": self.macro_f1(n_labels), "mean_exit_layer": self.mean_exit,
                "p95_exit_layer": self.p95_exit, "layers_saved": self.layers_saved, "key_share": self.key_share,
                "exit_histogram": self.histogram()}


def measure(engine: Engine, task: str, rows: Sequence[Row], k: int, chunk: int = 32,
            progress: Callable[[int], None] | None = None) -> list[Measured]:
    spec = engine.task_info(task).spec
    out: list[Measured] = []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        texts = [r.text for r in part]
        logits, features = engine.all_exits(task, texts)
        keys, found, _ = engine.retrieve(task, texts, k)
        heads = engine.heads(task)
        head_probs = heads.all_probs(features) if heads else [None] * len(part)
        judged = [engine.head_judged(n, heads, spec) for n in found] if heads else [None] * len(part)
        key_probs = heads.key_probs(keys) if heads else None
        out += [Measured(spec.label_index(r.label), softmax(lg.astype(np.float64)), n, hp, hn,
                         None if key_probs is None else key_probs[i], heads.covers(r.text, n) if heads else True)
                for i, (r, lg, n, hp, hn) in enumerate(zip(part, logits, found, head_probs, judged))]
        if progress:
            progress(len(part))
    return out


def answers(policy: ExitPolicy, rows: Sequence[Measured], depth: int, labels: Sequence[str],
            k: int | None = None) -> list[tuple[np.ndarray, int, bool]]:
    """Per measured row, the policy's label distribution, exit and whether the key head answered
    (with only the first k neighbours when k is given), as served (`policies.settle` included)."""
    out = []
    heads, head_exits = reads_heads(policy), uses_head_exits(policy)
    for row in rows:
        neighbours = row.head_neighbours if head_exits and row.head_neighbours is not None else row.neighbours
        decision = policy.decide(neighbours[:k] if k else neighbours, depth, labels)
        if heads:
            decision = settle(decision, row.key_probs, row.covered)
        probs = row.head_probs if heads else row.probs
        if probs is None:
            raise InvalidInput(f"policy: {policy.name} needs exit heads; the task has none yet")
        layer = resolve_exit(decision, probs)
        answer = decision.answer if decision.answer is not None else mix(probs[layer], decision.prior)
        out.append((answer, layer, decision.answered_by == "key"))
    return out


def run_policy(policy: ExitPolicy, rows: Sequence[Measured], depth: int, labels: Sequence[str],
               k: int | None = None) -> PolicyResult:
    """A policy's answers on measured rows (with only the first k neighbours when k is given)."""
    result = PolicyResult(policy.name, depth)
    for row, (answer, layer, keyed) in zip(rows, answers(policy, rows, depth, labels, k)):
        result.gold.append(row.gold)
        result.predicted.append(int(np.argmax(answer)))
        result.exits.append(layer)
        result.keyed.append(keyed)
    return result


def run_oracle(rows: Sequence[Measured], depth: int) -> PolicyResult:
    """The earliest layer that is right for the row (last layer when none is): a limit, not a policy."""
    result = PolicyResult("oracle", depth)
    for row in rows:
        right = np.flatnonzero(row.probs.argmax(-1) == row.gold)
        layer = int(right[0]) if right.size else depth
        result.gold.append(row.gold)
        result.predicted.append(int(row.probs[layer].argmax()))
        result.exits.append(layer)
    return result


def layer_accuracy(rows: Sequence[Measured]) -> list[float]:
    if not rows:
        return []
    correct = np.array([r.probs.argmax(-1) == r.gold for r in rows])
    return correct.mean(0).tolist()


@dataclass
class EvalReport:
    task: str
    depth: int
    k: int
    labels: list[str]
    results: list[PolicyResult]
    by_layer: list[float]

    def to_dict(self) -> dict[str, object]:
        return {"task": self.task, "depth": self.depth, "k": self.k,
                "policies": [r.summary(len(self.labels)) for r in self.results], "layer_accuracy": self.by_layer}


BASELINES = ("full", "knn-vote")


def evaluate(engine: Engine, task: str, rows: Sequence[Row], policies: Sequence[str], k: int | None = None,
             progress: Callable[[int], None] | None = None) -> EvalReport:
    """The named policies plus the baselines (full depth, retrieval-only vote) on the same rows."""
    chosen = plan(engine, task, policies, k)
    measured = measure(engine, task, rows, max(r.k for r in chosen), progress=progress)
    return report(engine, task, chosen, measured, k)


def plan(engine: Engine, task: str, policies: Sequence[str], k: int | None = None) -> list[Any]:
    """The policies an evaluation runs (the named ones and the baselines) as the task resolves them
    (`auto`: its stored choice and k). Checked before any row is measured."""
    names = list(dict.fromkeys([*policies, *BASELINES]))
    return [engine.resolve_policy(task, name, k) for name in names]


def report(engine: Engine, task: str, chosen: Sequence[Any], measured: Sequence[Measured],
           k: int | None = None) -> EvalReport:
    """Every planned policy's answers on the measured rows (`measure`, whole or in chunks)."""
    spec = engine.task_info(task).spec
    results = []
    for policy, policy_k, served in chosen:
        result = run_policy(policy, measured, engine.depth, spec.label_names, policy_k)
        result.name = served  # `auto` says what it chose
        results.append(result)
    return EvalReport(task, engine.depth, engine.check_k(k), spec.label_names, results, layer_accuracy(measured))


def format_report(report: dict[str, Any]) -> str:
    """An evaluation report (`EvalReport.to_dict()`, here or from a server's operation) as text."""
    results = report["policies"]
    n = results[0]["rows"] if results else 0
    lines = [f"task {report['task']}: {n} rows, backbone depth {report['depth']} layers, k = {report['k']}", "",
             f"{'policy':<18} {'accuracy':>9} {'balanced':>9} {'macro-F1':>9} {'mean exit':>10} {'p95 exit':>9} "
             f"{'saved':>7}"]
    for r in results:
        lines.append(f"{r['policy']:<18} {100 * r['accuracy']:>8.1f}% {100 * r['balanced_accuracy']:>8.1f}% "
                     f"{100 * r['macro_f1']:>8.1f}% {r['mean_exit_layer']:>10.2f} {r['p95_exit_layer']:>9.1f} "
                     f"{100 * r['layers_saved']:>6.1f}%")
    for r in results:
        hist = r["exit_histogram"]
        peak = max(hist) or 1
        lines += ["", f"exit-layer histogram, {r['policy']}:"]
        lines += [f"  L{layer:>2} {count:>6} {'#' * round(40 * count / peak)}" for layer, count in enumerate(hist)
                  if count]
    lines += ["", "accuracy of each single exit: " + " ".join(
        f"L{l}={100 * a:.0f}%" for l, a in enumerate(report["layer_accuracy"]))]
    return "\n".join(lines)
