"""The benchmark harness: every exit policy side by side on every task, sweeps, plots and reports.

All policies are scored on the same measured rows of the same run (one full
forward per row gives every exit; see evaluation.py), so their ratios are fair
on a noisy machine. Per-stage latency is measured separately on real served
requests (truncated forwards, one text per call).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from raee_server.core import auto as tuning
from raee_server.core.cascade import RISK_LEVEL
from raee_server.core.datafile import read_rows
from raee_server.core.engine import Engine
from raee_server.core.evaluation import Measured, PolicyResult, layer_accuracy, measure, run_oracle, run_policy
from raee_server.core.groups import near_duplicate_groups, words
from raee_server.core.heads import ExitHeads
from raee_server.core.policies import ExitPolicy, bind, parse_policy
from raee_server.stores.records import ExitRecord, LayerResult, record_id
from raee_server.types import RETRIEVAL_KEYS, Choice, Row, TaskSpec

K_SWEEP = (1, 2, 4, 8, 12, 16, 24, 32)
SIZE_SWEEP = (500, 1000, 2000, 5000, 10000, 20000, 60000)
SWEEP_POLICIES = ("paper", "paper-all", "knn-agree", "knn-vote")


CASCADE_SHOWN = ("cascade:0.01", "cascade:0.02", "cascade:0.03")  # the accuracy/depth trade, beside the tuned one
KEY_CASCADE_SHOWN = ("key-cascade:0.01", "key-cascade:0.02", "key-cascade:0.03")  # the same, key first (issue 32)
BASELINES = ("key-logreg", "knn-vote", "paper")  # with the full-depth head: what `auto` must beat
KEY_LOGREG_C = tuple(float(c) for c in np.logspace(-4, 3, 15))  # key-logreg's own cross-validated grid
LEAK_NGRAM = 4  # a measured row that shares this many words in a row with a record is a leaked row
KEY_POLICIES = ("knn-vote", "paper", "key-logreg")  # what a retrieval key alone decides: the key sweep's
KNN_HEADS_SHOWN = ("knn-heads:0.9", "knn-heads:0.95")  # not among auto's candidates (raee_server.core.auto); shown


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="row", file=sys.stderr, leave=False)


@dataclass
class TaskBench:
    task: str
    depth: int
    labels: list[str]
    train_rows: int
    dev_rows: int
    k: int
    tuned: Choice
    calibrated: dict[str, str]  # family -> chosen name, e.g. {"static": "static:14"}
    results: list[PolicyResult]
    layer_accuracy: list[float]
    latency: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # policy -> stage -> p50/p95
    k_sweep: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    size_sweep: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
    encoder_sweep: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    heads: dict[str, Any] = field(default_factory=dict)  # the exit heads' summary (version, fit time, accuracy)
    dev_skip: int = 0  # the measured rows are dev rows dev_skip + 1 .. dev_skip + dev_rows
    baseline_k: dict[str, int] = field(default_factory=dict)  # paper / knn-vote: the k their own validation chose
    key_logreg_c: float = 0.0
    leak_free: list[PolicyResult] = field(default_factory=list)  # the same policies on the rows that share
    # no LEAK_NGRAM-word phrase with a record
    key_sweep: dict[str, list[PolicyResult]] = field(default_factory=dict)  # retrieval key -> KEY_POLICIES

    @property
    def best_baseline(self) -> PolicyResult | None:
        """The best (by accuracy on these rows: the baselines' most favourable pick) of key-logreg,
        knn-vote, paper and the head at full depth."""
        pool = [r for r in self.results if r.name in (*BASELINES, f"heads:{self.depth}")]
        return max(pool, key=lambda r: r.accuracy) if pool else None

    def gaps(self, results: Sequence[PolicyResult] | None = None) -> dict[str, dict[str, float]]:
        """Each result against the best baseline on the same rows: accuracy and balanced-accuracy
        differences with 95 % paired bootstrap intervals."""
        results = self.results if results is None else results
        best_name = self.best_baseline.name if self.best_baseline else None
        reference = next((r for r in results if r.name == best_name), None)
        if reference is None:
            return {}
        out = {}
        for r in results:
            acc, acc_low, acc_high = r.accuracy_gap(reference)
            bal, bal_low, bal_high = r.balanced_gap(reference, len(self.labels))
            out[r.name] = {"vs_best_baseline": acc, "vs_best_baseline_low": acc_low,
                           "vs_best_baseline_high": acc_high, "balanced_vs_best_baseline": bal,
                           "balanced_vs_best_baseline_low": bal_low, "balanced_vs_best_baseline_high": bal_high}
        return out

    def cascade_promises(self) -> list[dict[str, Any]]:
        """Each cascade against the best fixed head on these rows: balanced accuracy lost (with its
        paired interval) against its margin, and its depth as a share of the head's."""
        head = next((r for r in self.results if r.name == f"heads:{self.heads.get('best_exit')}"), None)
        out: list[dict[str, Any]] = []
        if head is None:
            return out
        by_name = {r.name: r for r in self.results}
        for r in self.results:
            family, _, margin = r.name.partition(":")
            if family in ("cascade", "key-cascade", "key-cascade-ungated"):
                gap, low, high = head.balanced_gap(r, len(self.labels))
                row = {"policy": r.name, "margin": float(margin), "balanced_lost": gap, "low": low, "high": high,
                       "mean_exit": r.mean_exit, "head": head.name, "key_share": r.key_share,
                       "depth_share": r.mean_exit / max(head.mean_exit, 1e-9)}
                plain = by_name.get(f"cascade:{margin}")
                if family != "cascade" and plain is not None:  # against the heads-only cascade at its margin
                    acc, acc_low, acc_high = r.accuracy_gap(plain)
                    row |= {"vs_heads_only": acc, "vs_heads_only_low": acc_low, "vs_heads_only_high": acc_high,
                            "depth_vs_heads_only": r.mean_exit / max(plain.mean_exit, 1e-9)}
                out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        gaps, leak_free_gaps = self.gaps(), self.gaps(self.leak_free)  # once each: a bootstrap per policy
        return {
            "task": self.task, "depth": self.depth, "labels": self.labels, "train_rows": self.train_rows,
            "dev_rows": self.dev_rows, "dev_skip": self.dev_skip, "k": self.k, "auto": self.tuned.to_dict(),
            "calibrated_on_train": self.calibrated, "baseline_k": self.baseline_k,
            "key_logreg_c": self.key_logreg_c,
            "best_baseline": self.best_baseline.name if self.best_baseline else None,
            "policies": [{**r.summary(len(self.labels)), **gaps.get(r.name, {})} for r in self.results],
            "leak_free": [{**r.summary(len(self.labels)), **leak_free_gaps.get(r.name, {})} for r in self.leak_free],
            "cascades": self.cascade_promises(),
            "layer_accuracy": self.layer_accuracy, "latency_us": self.latency,
            "k_sweep": self.k_sweep, "size_sweep": self.size_sweep, "encoder_sweep": self.encoder_sweep,
            "heads": self.heads, "key_sweep": self.key_sweep_gaps(),
        }

    def key_sweep_gaps(self) -> dict[str, list[dict[str, Any]]]:
        """Each retrieval key's results, with the accuracy difference against the same policy under the
        task's own key (95 % paired bootstrap interval)."""
        if not self.key_sweep:
            return {}
        own = {r.name: r for r in self.results}
        out: dict[str, list[dict[str, Any]]] = {}
        for mode, results in self.key_sweep.items():
            out[mode] = []
            for r in results:
                gap, low, high = r.accuracy_gap(own[r.name])
                out[mode].append({**r.summary(len(self.labels)), "vs_own_key": gap, "vs_own_key_low": low,
                                  "vs_own_key_high": high})
        return out

    def against_baselines(self) -> list[str]:
        """`auto` against the best baseline, and each per-input heads policy against the best fixed head
        (points with 95 % paired intervals, depth as a share)."""
        by_name = {r.name: r for r in self.results}
        auto = next((r for r in self.results if r.name.startswith("auto=")), None)
        best = self.best_baseline
        lines = []
        if auto and best:
            gap = self.gaps()[auto.name]
            lines.append(f"- {auto.name}: {100 * auto.accuracy:.1f} % at mean exit {auto.mean_exit:.2f} "
                         f"({100 * auto.mean_exit / self.depth:.0f} % of the depth), "
                         f"{100 * gap['vs_best_baseline']:+.1f} points [{100 * gap['vs_best_baseline_low']:+.1f}, "
                         f"{100 * gap['vs_best_baseline_high']:+.1f}] against the best baseline "
                         f"({best.name}, {100 * best.accuracy:.1f} %)")
        for c in self.cascade_promises():
            lines.append(f"- {c['policy']}: loses {100 * c['balanced_lost']:+.1f} points of balanced accuracy "
                         f"[{100 * c['low']:+.1f}, {100 * c['high']:+.1f}] against {c['head']} (promise: at most "
                         f"{100 * c['margin']:.0f}, at 1 - delta = {1 - RISK_LEVEL:.2f}), at "
                         f"{100 * c['depth_share']:.0f} % of its depth"
                         + (f"; {100 * c['key_share']:.0f} % answered by the key; against cascade:{c['margin']:g}: "
                            f"{100 * c['vs_heads_only']:+.1f} points [{100 * c['vs_heads_only_low']:+.1f}, "
                            f"{100 * c['vs_heads_only_high']:+.1f}] at {100 * c['depth_vs_heads_only']:.0f} % of its "
                            "depth" if "vs_heads_only" in c else ""))
        head = next((r for r in self.results if r.name == f"heads:{self.heads.get('best_exit')}"), None)
        if head:
            for r in self.results:
                if r.name.split(":")[0] in ("knn-heads", "paper-heads") and r.name in by_name:
                    lines.append(f"- {r.name}: {100 * (r.accuracy - head.accuracy):+.1f} points against {head.name} "
                                 f"at {100 * r.mean_exit / max(head.mean_exit, 1e-9):.0f} % of its depth")
        return lines


def first_rows(path: Path, n: int, skip: int = 0, inputs: Sequence[str] = ()) -> list[Row]:
    """Rows skip + 1 .. skip + n of a labelled file (a column per input for a task with several)."""
    return [r for r in itertools.islice(read_rows(path, inputs=inputs), skip, skip + n) if isinstance(r, Row)]


def ensure_task(engine: Engine, spec: TaskSpec) -> None:
    from raee_server.errors import TaskNotFound

    try:
        engine.task_info(spec.name)
    except TaskNotFound:
        engine.create_task(spec)


def build(engine: Engine, task: str, train: Path, n: int) -> None:
    rows = list(itertools.islice(read_rows(train, inputs=engine.spec(task).inputs), n))
    with _bar(len(rows), f"{task}: database") as bar:
        engine.ingest(task, rows, source=str(train), progress=bar.update)


def copy_records(src: Engine, task: str, dst: Engine, dst_task: str, limit: int | None,
                 examples: Sequence[tuple[str, str, str]] | None = None, retrieval_key: str | None = None) -> int:
    """A task's first `limit` records (or these `examples`) under another name and the destination's
    key encoder (and, for several inputs, `retrieval_key`), with their exit features, built from what
    SQL holds: no backbone forward."""
    spec = src.task_info(task).spec
    ensure_task(dst, replace(spec, name=dst_task, description=f"bench copy of {task}",
                             retrieval_key=retrieval_key or spec.retrieval_key))
    if dst.task_info(dst_task).records:
        return dst.task_info(dst_task).records
    examples = list(examples) if examples is not None else src.metadata.committed_examples(task, limit)
    codec = src.metadata.codec(task)
    if codec is not None:  # the feature rows are copied as stored
        dst.metadata.adopt_codec(dst_task, codec)
    bar = _bar(len(examples), f"{dst_task}: copy")
    for start in range(0, len(examples), 256):
        part = examples[start : start + 256]
        layers = src.metadata.layer_results([rid for rid, _, _ in part])
        features = src.metadata.features_of([rid for rid, _, _ in part])
        records = []
        for rid, text, label in part:
            gold = spec.label_index(label)
            results = tuple(LayerResult(l, spec.label_index(pred), p, gold_p, pred == label)
                            for l, (pred, p, gold_p) in enumerate(layers[rid]))
            records.append(ExitRecord(record_id(dst_task, text), dst_task, text, label, gold, results,
                                      features.get(rid)))
        keys = dst.keys(dst.spec(dst_task), [r.text for r in records])
        batch = dst.metadata.begin_batch(dst_task, f"copy of {task}")
        dst.store_records(dst_task, records, keys, batch)
        dst.metadata.finish_batch(batch, len(records), 0, 0, "done")
        bar.update(len(part))
    bar.close()
    return len(examples)


def with_neighbours(engine: Engine, task: str, rows: Sequence[Row], measured: Sequence[Measured],
                    k: int) -> list[Measured]:
    found, _ = engine.neighbours(task, [r.text for r in rows], k)
    return [Measured(m.gold, m.probs, n) for m, n in zip(measured, found)]


def latency(engine: Engine, task: str, rows: Sequence[Row], policies: Sequence[tuple[str, str, int]]
            ) -> dict[str, dict[str, dict[str, float]]]:
    """Per-stage p50/p95 (µs) of single-text served requests, per policy (truncated forwards for real)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    engine.classify(task, [rows[0].text])  # warm-up
    with _bar(len(rows) * len(policies), f"{task}: latency") as bar:
        for label, spec, k in policies:
            stages: dict[str, list[int]] = {"encode_us": [], "retrieve_us": [], "forward_us": [], "total_us": []}
            for row in rows:
                p = engine.classify(task, [row.text], policy=spec, k=k)[0]
                t = p.timings_us
                for stage in ("encode_us", "retrieve_us", "forward_us"):
                    stages[stage].append(t[stage])
                stages["total_us"].append(t["encode_us"] + t["retrieve_us"] + t["forward_us"])
                bar.update(1)
            out[label] = {s: {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95))}
                          for s, v in stages.items()}
    return out


def key_logreg(engine: Engine, spec: TaskSpec, train: Path, train_rows: int, rows: Sequence[Row],
               depth: int) -> tuple[PolicyResult, float]:
    """What a practitioner tries first: scikit-learn's logistic regression on the retrieval keys (no
    backbone), standardised, class-weighted, with its own grouped 5-fold cross-validation over a wide C
    grid (KEY_LOGREG_C) on balanced accuracy; the folds keep near-duplicates together, as the heads'
    do. Returns the result and the chosen C."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import GroupKFold

    records = first_rows(train, train_rows, inputs=spec.inputs)
    keys = np.asarray(engine.keys(spec, [r.text for r in records]), dtype=np.float64)
    mean, scale = keys.mean(0), keys.std(0) + 1e-12
    labels = np.array([spec.label_index(r.label) for r in records])
    folds = list(GroupKFold(n_splits=5).split(keys, labels, near_duplicate_groups([r.text for r in records])))
    model = LogisticRegressionCV(Cs=list(KEY_LOGREG_C), l1_ratios=(0.0,), cv=folds, scoring="balanced_accuracy",
                                 class_weight="balanced", max_iter=3000, use_legacy_attributes=False
                                 ).fit((keys - mean) / scale, labels)
    measured = (np.asarray(engine.keys(spec, [r.text for r in rows]), dtype=np.float64) - mean) / scale
    predicted = model.predict(measured)
    return (PolicyResult("key-logreg", depth, [spec.label_index(r.label) for r in rows],
                         [int(p) for p in predicted], [0] * len(rows)), float(np.ravel(model.C_)[0]))


def tuned_k(validation: Sequence[Measured], name: str, depth: int, labels: Sequence[str], objective: str) -> int:
    """The k a retrieval baseline's own validation picks (the task's objective, leave-one-out on the
    records, as `auto`'s is; the smaller k among equals): the same tuning budget for the baselines."""
    policy = parse_policy(name)
    scored = [(round(tuning.score(run_policy(policy, validation, depth, labels, k), objective, len(labels)), 6), -k)
              for k in tuning.K_CHOICES]
    return -max(scored)[1]


def leak_free_rows(records: Sequence[str], rows: Sequence[Row], n: int = LEAK_NGRAM) -> list[int]:
    """Indices of the measured rows that share no run of n words with any record, and that no record
    contains whole (a short row could otherwise sit inside a record without n words in common)."""
    # every run of 1..n words in the records: a row leaks if it holds a run of n, or is whole a shorter run
    runs = {w[i : i + m] for w in map(words, records) for m in range(1, n + 1) for i in range(len(w) - m + 1)}
    found = []
    for i, row in enumerate(rows):
        w = words(row.text)
        leaked = w in runs if len(w) < n else any(w[j : j + n] in runs for j in range(len(w) - n + 1))
        if not leaked:
            found.append(i)
    return found


def bench_task(engine: Engine, spec: TaskSpec, train: Path, dev: Path, train_rows: int, dev_rows: int,
               k: int = 12, latency_rows: int = 48, sweeps: Sequence[str] = ("k", "size", "encoder"),
               encoders: Sequence[Engine] = (), sizes: Sequence[int] = SIZE_SWEEP,
               use_heads: bool = True, dev_skip: int = 0) -> TaskBench:
    task = spec.name
    ensure_task(engine, spec)
    build(engine, task, train, train_rows)
    depth, labels = engine.depth, spec.label_names

    # Choices made on the train records only (leave-one-out / out of fold), never on the measured rows.
    heads: ExitHeads | None = None
    if use_heads:
        heads = tuning.fit_task_heads(engine, task) if tuning.needs_heads(engine, task) else engine.heads(task)
    validation = tuning.validation_rows(engine, task, tuning.VALIDATION_ROWS, max(tuning.K_CHOICES))
    ranked = tuning.choose(validation, depth, labels, heads=heads, objective=spec.objective)
    # the lens policies' thresholds, chosen the same way (with heads, auto no longer considers them)
    ranked_lens = tuning.choose(validation, depth, labels, objective=spec.objective) if heads else ranked
    calibrated = {family: next(name for name, *_ in pool if name.startswith(family + ":"))
                  for family, pool in (("static", ranked_lens), ("confidence", ranked_lens),
                                       ("paper-tol", ranked_lens), *((("cascade", ranked),) if heads else ()))}
    best = tuning.pick(ranked, len(validation))
    tuned = Choice(best[0], best[1], best[2], best[3], len(validation), train_rows,
                   datetime.now(UTC).isoformat(timespec="seconds"), 0.0, heads.version if heads else 0,
                   spec.objective)
    # the retrieval baselines get their own k from the same validation (auto searches k too)
    baseline_k = {name: tuned_k(validation, name, depth, labels, spec.objective) for name in ("paper", "knn-vote")}

    rows = first_rows(dev, dev_rows, skip=dev_skip, inputs=spec.inputs)
    with _bar(len(rows), f"{task}: measure") as bar:
        measured = measure(engine, task, rows, max(K_SWEEP), progress=bar.update)
    names = ["full", calibrated["static"], calibrated["confidence"], "paper", "paper-all", calibrated["paper-tol"],
             "knn-agree", "knn-vote"]
    if heads:  # the best fixed head (on the fit split), the head at full depth, the paper over head-judged
        # exits, the stop rules
        names += [f"heads:{heads.best_exit}", f"heads:{depth}", "paper-heads", *KNN_HEADS_SHOWN,
                  calibrated["cascade"], *CASCADE_SHOWN,
                  *(KEY_CASCADE_SHOWN if heads.key is not None else ())]
        names = list(dict.fromkeys(names))

    def policy(name: str) -> ExitPolicy:
        return bind(parse_policy(name), heads) if heads else parse_policy(name)

    auto = run_policy(policy(best[0]), measured, depth, labels, best[1])
    auto.name = f"auto={best[0]}"
    logreg, logreg_c = key_logreg(engine, spec, train, train_rows, rows, depth)
    results = [*(run_policy(policy(n), measured, depth, labels, baseline_k.get(n, k)) for n in names), auto, logreg,
               run_oracle(measured, depth)]
    if heads:
        oracle = run_oracle([Measured(m.gold, m.head_probs, m.neighbours) for m in measured
                             if m.head_probs is not None], depth)
        oracle.name = "oracle-heads"
        results.append(oracle)
    clean = leak_free_rows([r.text for r in first_rows(train, train_rows, inputs=spec.inputs)], rows)
    report = TaskBench(task, depth, labels, train_rows, len(rows), k, tuned, calibrated, results,
                       layer_accuracy(measured), heads=heads.summary() if heads else {}, dev_skip=dev_skip,
                       baseline_k=baseline_k, key_logreg_c=logreg_c,
                       leak_free=[r.subset(clean) for r in results if not r.name.startswith("oracle")])

    served = [(n, n, baseline_k.get(n, k)) for n in names] + [(auto.name, best[0], best[1])]
    report.latency = latency(engine, task, rows[:latency_rows], served)

    if "k" in sweeps:
        report.k_sweep = {p: [(kk, r.accuracy, r.mean_exit) for kk in K_SWEEP
                              for r in [run_policy(parse_policy(p), measured, depth, labels, kk)]]
                          for p in SWEEP_POLICIES}
    if "size" in sweeps:
        sizes = [s for s in sizes if s < train_rows] + [train_rows]
        report.size_sweep = {p: [] for p in SWEEP_POLICIES}
        for size in tqdm(sizes, desc=f"{task}: size sweep", file=sys.stderr, leave=False):
            sub = f"{task}--n{size}"
            if size == train_rows:
                sub_rows = measured
            else:
                copy_records(engine, task, engine, sub, size)
                sub_rows = with_neighbours(engine, sub, rows, measured, k)
            for p in SWEEP_POLICIES:
                r = run_policy(parse_policy(p), sub_rows, depth, labels, k)
                report.size_sweep[p].append((size, r.accuracy, r.mean_exit))
    if "encoder" in sweeps:
        report.encoder_sweep[engine.encoder.model_id] = {
            p: (r.accuracy, r.mean_exit) for p in SWEEP_POLICIES
            for r in [run_policy(parse_policy(p), measured, depth, labels, k)]}
        for other in encoders:
            sub = f"{task}--{other.encoder.model_id}"
            copy_records(engine, task, other, sub, None)
            sub_rows = with_neighbours(other, sub, rows, measured, k)
            report.encoder_sweep[other.encoder.model_id] = {
                p: (r.accuracy, r.mean_exit) for p in SWEEP_POLICIES
                for r in [run_policy(parse_policy(p), sub_rows, depth, labels, k)]}
    if "key" in sweeps and spec.several:
        report.key_sweep = key_sweep(engine, spec, train, train_rows, rows, measured, results, k, baseline_k)
    return report


def key_sweep(engine: Engine, spec: TaskSpec, train: Path, train_rows: int, rows: Sequence[Row],
              measured: Sequence[Measured], results: Sequence[PolicyResult], k: int, baseline_k: dict[str, int]
              ) -> dict[str, list[PolicyResult]]:
    """A task with several inputs, under each way of making its retrieval key (types.RETRIEVAL_KEYS):
    the policies that read only the key, on the same measured rows (the exits do not depend on the key).
    The spec's own key is the run's; the others are copies of its records, keyed again (no forward)."""
    by_name = {r.name: r for r in results}
    out: dict[str, list[PolicyResult]] = {spec.retrieval_key: [by_name[n] for n in KEY_POLICIES]}
    for mode in RETRIEVAL_KEYS:
        if mode == spec.retrieval_key:
            continue
        sub = f"{spec.name}--key-{mode}"
        copy_records(engine, spec.name, engine, sub, None, retrieval_key=mode)
        sub_rows = with_neighbours(engine, sub, rows, measured, k)
        keyed = [run_policy(parse_policy(n), sub_rows, engine.depth, spec.label_names, baseline_k.get(n, k))
                 for n in KEY_POLICIES if n != "key-logreg"]
        logreg, _ = key_logreg(engine, replace(spec, retrieval_key=mode), train, train_rows, rows, engine.depth)
        out[mode] = [*keyed, logreg]
    return out


# -- reports -------------------------------------------------------------------------
