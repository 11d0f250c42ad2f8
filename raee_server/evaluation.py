"""Evaluation of exit policies on labelled rows, every policy on the same rows in one run.

Each row gets one full forward that yields the label-word logits at every exit;
a policy's answer is read at its chosen exit. That equals a truncated forward
to that exit (layers below l do not depend on later ones; tests pin this), so
all policies are compared on identical computations for the cost of one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .datafile import Row
from .engine import Engine
from .engine import softmax
from .policies import neighbour_weights, parse_policy, resolve_exit


@dataclass
class PolicyResult:
    name: str
    correct: int
    exits: list[int] = field(default_factory=list)

    def accuracy(self, n: int) -> float:
        return self.correct / n if n else 0.0

    @property
    def mean_exit(self) -> float:
        return float(np.mean(self.exits)) if self.exits else float("nan")


@dataclass
class EvalReport:
    task: str
    rows: int
    depth: int
    k: int
    policies: list[PolicyResult]
    knn_vote_correct: int  # retrieval-only baseline: the neighbours' weighted majority label
    layer_correct: list[int]  # rows each single exit gets right

    def histogram(self, result: PolicyResult) -> list[int]:
        return np.bincount(np.asarray(result.exits, dtype=int), minlength=self.depth + 1).tolist()

    def to_dict(self) -> dict[str, object]:
        return {
            "task": self.task, "rows": self.rows, "depth": self.depth, "k": self.k,
            "policies": [
                {"name": p.name, "accuracy": p.accuracy(self.rows), "mean_exit_layer": p.mean_exit,
                 "layers_saved": 1 - p.mean_exit / self.depth if self.depth else 0.0,
                 "exit_histogram": self.histogram(p)}
                for p in self.policies
            ],
            "knn_vote_accuracy": self.knn_vote_correct / self.rows if self.rows else 0.0,
            "layer_accuracy": [c / self.rows if self.rows else 0.0 for c in self.layer_correct],
        }


def knn_vote(neighbours: Sequence, labels: Sequence[str]) -> str | None:
    if not neighbours:
        return None
    votes: dict[str, float] = {}
    for n, w in zip(neighbours, neighbour_weights(neighbours)):
        votes[n.label] = votes.get(n.label, 0.0) + float(w)
    return max(votes, key=votes.__getitem__)


def evaluate(
    engine: Engine, task: str, rows: Sequence[Row], policies: Sequence[str], k: int | None = None,
    chunk: int = 32, progress: Callable[[int], None] | None = None,
) -> EvalReport:
    spec = engine.task_info(task).spec
    k = engine.check_k(k)
    chosen = [parse_policy(p) for p in policies]
    if not any(p.name == "full" for p in chosen):
        chosen.append(parse_policy("full"))
    results = [PolicyResult(p.name, 0) for p in chosen]
    depth = engine.depth
    layer_correct = np.zeros(depth + 1, dtype=int)
    knn_correct = 0
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        texts = [r.text for r in part]
        gold = np.array([spec.label_index(r.label) for r in part])
        logits = engine.all_exit_logits(task, texts)  # [n, L+1, C]
        predicted = logits.argmax(-1)  # [n, L+1]
        layer_correct += (predicted == gold[:, None]).sum(0)
        found, _ = engine.neighbours(task, texts, k)
        for i, neighbours in enumerate(found):
            knn_correct += knn_vote(neighbours, spec.label_names) == part[i].label
            probs = softmax(logits[i].astype(np.float64))
            for policy, result in zip(chosen, results):
                decision = policy.decide(neighbours, depth, spec.label_names)
                layer = resolve_exit(decision, probs)
                result.exits.append(layer)
                answer = decision.answer.argmax() if decision.answer is not None else predicted[i, layer]
                result.correct += int(answer == gold[i])
        if progress:
            progress(len(part))
    return EvalReport(task, len(rows), depth, k, results, knn_correct, layer_correct.tolist())


def format_report(report: EvalReport) -> str:
    n, depth = report.rows, report.depth
    lines = [f"task {report.task}: {n} rows, backbone depth {depth} layers, k = {report.k}", ""]
    lines.append(f"{'policy':<14} {'accuracy':>9} {'mean exit':>10} {'layers run':>11}")
    for p in report.policies:
        lines.append(f"{p.name:<14} {100 * p.accuracy(n):>8.1f}% {p.mean_exit:>10.2f} {100 * p.mean_exit / depth:>10.1f}%")
    lines.append(f"{'knn-vote':<14} {100 * report.knn_vote_correct / max(n, 1):>8.1f}% {'(no backbone)':>22}")
    for p in report.policies:
        hist = report.histogram(p)
        peak = max(hist) or 1
        lines += ["", f"exit-layer histogram, {p.name}:"]
        lines += [f"  L{layer:>2} {count:>6} {'#' * round(40 * count / peak)}" for layer, count in enumerate(hist) if count]
    lines += ["", "accuracy of each single exit: " + " ".join(
        f"L{l}={100 * c / max(n, 1):.0f}%" for l, c in enumerate(report.layer_correct))]
    return "\n".join(lines)
