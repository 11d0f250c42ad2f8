"""Compact exit features against float16 (`raee-admin bench-features`): the same records and dev rows,
heads fit on each stored form, dev accuracy per exit and at the best exit, with paired intervals.

Per task: the exit features of the first `train` train rows and of dev rows `skip`..`skip + dev` are
computed once (one forward each; cached as npz in <data dir>/feature-cache, so a rerun fits only). Each form
stores the train features as the service would and fits heads on them exactly as `fit-heads` does
(grouped folds, calibration split); the dev rows are served as the service serves them (raw
features, heads folded back through the codec). The best exit is chosen out of fold, per form.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raee_server.bench import reports
from raee_server.bench.harness import ensure_task
from raee_server.core.datafile import read_rows
from raee_server.core.engine import Engine
from raee_server.core.evaluation import PolicyResult, paired_gap
from raee_server.core.fitting import fit_heads
from raee_server.core.groups import near_duplicate_groups
from raee_server.core.heads import ExitHeads
from raee_server.stores.codec import LEARN_ROWS, learn_codec
from raee_server.types import Row, TaskSpec

BASELINE = "float16"


def _features(engine: Engine, spec: TaskSpec, path: Path, skip: int, n: int, cache: Path,
              progress: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if cache.exists():
        z = np.load(cache)
        return z["features"], z["labels"], [str(t) for t in z["texts"]]
    rows = [r for r in itertools.islice(read_rows(path), skip, skip + n) if isinstance(r, Row)]
    parts = []
    for i in range(0, len(rows), 64):
        parts.append(engine.all_exits(spec.name, [r.text for r in rows[i : i + 64]])[1])
        progress(f"{spec.name}: {path.name} features {min(i + 64, len(rows))}/{len(rows)}")
    features = np.concatenate(parts)
    labels = np.array([spec.label_index(r.label) for r in rows])
    texts = [r.text for r in rows]
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, features=features, labels=labels, texts=np.array(texts))
    return features, labels, texts


def _fit(form: str, train: np.ndarray, gold: np.ndarray, texts: list[str], spec: TaskSpec) -> tuple[ExitHeads, int]:
    """Heads fit on the train features as `form` stores them; returns them (on raw features) and the
    stored bytes per record."""
    ids, groups = [str(i) for i in range(len(gold))], near_duplicate_groups(texts)
    if form == BASELINE:
        return fit_heads(train, gold, len(spec.labels), ids, spec.label_names, groups=groups), train[0].nbytes
    dim = int(form.removeprefix("codec-"))
    codec = learn_codec(train[:LEARN_ROWS], dim=dim)  # as the store learns it: from the first records
    heads = fit_heads(codec.quantise(train), gold, len(spec.labels), ids, spec.label_names, groups=groups)
    return heads.in_raw_space(codec), codec.row_bytes


def run(engine: Engine, tasks: Sequence[tuple[TaskSpec, Path]], train_rows: int, dev_rows: int, dev_skip: int,
        forms: Sequence[str], out: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    report: dict[str, Any] = {"train_rows": train_rows, "dev_rows": dev_rows, "dev_skip": dev_skip,
                              "forms": list(forms), "tasks": {}}
    for spec, root in tasks:
        ensure_task(engine, spec)
        cache = engine.settings.data_dir / "feature-cache"
        train, gold, texts = _features(engine, spec, root / "train.tsv", 0, train_rows,
                                       cache / f"{spec.name}-train-{train_rows}.npz", progress)
        dev, dev_gold, _ = _features(engine, spec, root / "dev.tsv", dev_skip, dev_rows,
                                     cache / f"{spec.name}-dev-{dev_skip}-{dev_rows}.npz", progress)
        results: dict[str, Any] = {}
        best: dict[str, PolicyResult] = {}
        for form in forms:
            heads, size = _fit(form, train, gold, texts, spec)
            predicted = heads.all_probs(dev.astype(np.float32)).argmax(-1)  # [rows, E]
            per_exit = (predicted == dev_gold[:, None]).mean(0)
            exit_ = heads.best_exit
            best[form] = PolicyResult(form, exit_, dev_gold.tolist(), predicted[:, exit_].tolist())
            results[form] = {"bytes_per_record": int(size), "best_exit": exit_,
                             "best_exit_accuracy": round(float(per_exit[exit_]), 4),
                             "mean_accuracy_over_exits": round(float(per_exit.mean()), 4),
                             "accuracy_per_exit": [round(float(a), 4) for a in per_exit]}
            progress(f"{spec.name}: {form}: best exit {exit_} {100 * per_exit[exit_]:.1f} %, "
                     f"mean over exits {100 * per_exit.mean():.1f} % ({size:,} bytes a record)")
        for form in forms:
            if form != BASELINE and BASELINE in best:
                gap, low, high = paired_gap(best[form], best[BASELINE], len(spec.labels), balanced=False)
                results[form]["vs_float16_best_exit"] = [round(gap, 4), round(low, 4), round(high, 4)]
                per = np.array(results[form]["accuracy_per_exit"]) - np.array(results[BASELINE]["accuracy_per_exit"])
                results[form]["vs_float16_per_exit_mean"] = round(float(per.mean()), 4)
        report["tasks"][spec.name] = results
    return report


def write(report: dict[str, Any], out: Path, command: str) -> list[Path]:
    body = [f"Records: the first {report['train_rows']:,} train rows; measured on dev rows "
            f"{report['dev_skip'] + 1:,}-{report['dev_skip'] + report['dev_rows']:,}. Heads fit as `fit-heads` "
            "does on each stored form; the best exit chosen out of fold per form. Interval: 95 % paired bootstrap "
            "of the accuracy difference at each form's best exit, against float16, on the same rows.", "",
            "| task | form | bytes a record | best exit | accuracy there | vs float16 [95 % CI] | "
            "mean over exits | vs float16, mean over exits |", "|---|---|---|---|---|---|---|---|"]
    for task, forms in report["tasks"].items():
        for form, r in forms.items():
            gap = r.get("vs_float16_best_exit")
            ci = f"{100 * gap[0]:+.1f} [{100 * gap[1]:+.1f}, {100 * gap[2]:+.1f}]" if gap else "-"
            mean_gap = r.get("vs_float16_per_exit_mean")
            body.append(f"| {task} | {form} | {r['bytes_per_record']:,} | {r['best_exit']} | "
                        f"{100 * r['best_exit_accuracy']:.1f} % | {ci} | {100 * r['mean_accuracy_over_exits']:.1f} % | "
                        f"{'-' if mean_gap is None else f'{100 * mean_gap:+.1f}'} |")
    plt = reports.pyplot()
    tasks = list(report["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for form, r in report["tasks"][task].items():
            ax.plot(range(len(r["accuracy_per_exit"])), [100 * a for a in r["accuracy_per_exit"]], marker=".",
                    label=f"{form} ({r['bytes_per_record']:,} B)")
        ax.set(title=task, xlabel="exit", ylabel="dev accuracy (%)")
        ax.legend(fontsize=7)
    paths = reports.save(out, "features", report, command, "Compact exit features against float16", body)
    return [*paths, reports.save_figure(fig, out / "features.png")]
