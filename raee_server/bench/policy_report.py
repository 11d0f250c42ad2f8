"""The policy bench's report (raee_server.bench.harness): the markdown tables, the plots, and the
summary line the CLI prints per task."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raee_server.bench.harness import LEAK_NGRAM, SWEEP_POLICIES, TaskBench


def markdown(reports: Sequence[TaskBench], command: str) -> str:
    out = ["# Benchmark", "", f"Command: `{command}`", ""]
    for r in reports:
        n = len(r.labels)
        measured = (f"dev rows {r.dev_skip + 1}-{r.dev_skip + r.dev_rows}" if r.dev_skip
                    else f"first {r.dev_rows} dev rows")
        out += [f"## {r.task}", "",
                f"Database: first {r.train_rows} train rows; measured: {measured}; "
                f"backbone depth {r.depth}; k = {r.k} (paper k = {r.baseline_k.get('paper', r.k)}, knn-vote "
                f"k = {r.baseline_k.get('knn-vote', r.k)}: each chosen by its own validation on the records; "
                f"key-logreg C = {r.key_logreg_c:g} by its own grouped cross-validation). Static layer, "
                f"confidence threshold and tolerance chosen on the train records (leave-one-out): "
                f"{', '.join(r.calibrated.values())}; auto chose {r.tuned.policy} with k = {r.tuned.k} "
                f"({r.tuned.objective.replace('_', ' ')} {100 * r.tuned.accuracy:.1f} % on "
                f"{r.tuned.validation_rows} validation records).", ""]
        if r.heads:
            out += [f"Exit heads v{r.heads['version']}: fit on {r.heads.get('fit_records', r.heads['records'])} "
                    f"records ({r.heads.get('calibration_records', 0)} more held out to certify the cascade) in "
                    f"{r.heads['seconds']:.0f} s; out-of-fold accuracy per exit: "
                    + " ".join(f"L{i}={100 * a:.1f}%" for i, a in enumerate(r.heads["accuracy"])), "",
                    "C per exit: " + " ".join(f"L{i}={c:g}" for i, c in enumerate(r.heads.get("c", [])))
                    + f" ({r.heads.get('c_at_grid_edge', 0)} of {len(r.heads.get('c', []))} at an edge of the grid)",
                    ""]
        best = r.best_baseline
        out += [*r.against_baselines(), ""]
        for title, results in (("", r.results), ("leak-free", r.leak_free)):
            if not results:
                continue
            gaps = r.gaps(results)
            if title:
                out += [f"On the {results[0].rows} of these {r.dev_rows} rows that share no {LEAK_NGRAM}-word "
                        "phrase with a record (and sit inside none):", ""]
            out += [f"| policy | accuracy | vs {best.name if best else 'best baseline'} [95 % CI] | "
                    "balanced accuracy | vs it, balanced [95 % CI] | macro-F1 | mean exit | p95 exit | layers saved | "
                    "by the key |", "|---|---|---|---|---|---|---|---|---|---|"]
            for p in results:
                g = gaps.get(p.name)
                vs = (f"{100 * g['vs_best_baseline']:+.1f} [{100 * g['vs_best_baseline_low']:+.1f}, "
                      f"{100 * g['vs_best_baseline_high']:+.1f}]" if g else "")
                vs_bal = (f"{100 * g['balanced_vs_best_baseline']:+.1f} "
                          f"[{100 * g['balanced_vs_best_baseline_low']:+.1f}, "
                          f"{100 * g['balanced_vs_best_baseline_high']:+.1f}]" if g else "")
                out.append(f"| {p.name} | {100 * p.accuracy:.1f} % | {vs} | {100 * p.balanced_accuracy(n):.1f} % | "
                           f"{vs_bal} | {100 * p.macro_f1(n):.1f} % | {p.mean_exit:.2f} | "
                           f"{p.p95_exit:.0f} | {100 * p.layers_saved:.0f} % | {100 * p.key_share:.0f} % |")
            out.append("")
        if r.latency:
            out += ["", "Served latency, one text per request (µs, p50 / p95):", "",
                    "| policy | encode | retrieve | forward | total |", "|---|---|---|---|---|"]
            for name, stages in r.latency.items():
                cells = [f"{stages[s]['p50']:.0f} / {stages[s]['p95']:.0f}"
                         for s in ("encode_us", "retrieve_us", "forward_us", "total_us")]
                out.append(f"| {name} | " + " | ".join(cells) + " |")
        for title, sweep, unit in (("k", r.k_sweep, "k"), ("database size", r.size_sweep, "records")):
            if sweep:
                xs = [x for x, _, _ in next(iter(sweep.values()))]
                out += ["", f"Sweep over {title} (accuracy, mean exit):", "",
                        "| policy | " + " | ".join(f"{x} {unit}" for x in xs) + " |",
                        "|---|" + "---|" * len(xs)]
                for policy, points in sweep.items():
                    out.append(f"| {policy} | " + " | ".join(f"{100 * a:.1f} % @ {m:.1f}" for _, a, m in points) + " |")
        if r.encoder_sweep:
            out += ["", "Key encoders (accuracy, mean exit):", "", "| encoder | " + " | ".join(SWEEP_POLICIES) + " |",
                    "|---|" + "---|" * len(SWEEP_POLICIES)]
            for enc, res in r.encoder_sweep.items():
                out.append(f"| {enc} | " + " | ".join(f"{100 * res[p][0]:.1f} % @ {res[p][1]:.1f}"
                                                      for p in SWEEP_POLICIES) + " |")
        if r.key_sweep:
            own = next(iter(r.key_sweep))
            out += ["", f"Retrieval keys (the task's own: {own}); accuracy, and the difference against the same "
                    f"policy under {own} [95 % paired CI]:", "",
                    "| key | " + " | ".join(p.name for p in r.key_sweep[own]) + " |",
                    "|---|" + "---|" * len(r.key_sweep[own])]
            for mode, keyed in r.key_sweep_gaps().items():
                cells = [f"{100 * g['accuracy']:.1f} %" + ("" if mode == own else
                         f" ({100 * g['vs_own_key']:+.1f} [{100 * g['vs_own_key_low']:+.1f}, "
                         f"{100 * g['vs_own_key_high']:+.1f}])") for g in keyed]
                out.append(f"| {mode} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(reports: Sequence[TaskBench], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    n = len(reports)

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4.6), squeeze=False)
    for ax, r in zip(axes[0], reports):
        for p in r.results:
            ax.scatter(p.mean_exit, 100 * p.accuracy, s=40)
            ax.annotate(p.name, (p.mean_exit, 100 * p.accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(title=f"{r.task}: accuracy against depth", xlabel="mean exit layer", ylabel="accuracy (%)",
               xlim=(-0.5, r.depth + 1))
        ax.grid(alpha=0.3)
    save(fig, "accuracy_vs_exit.png")

    fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
    for ax, r in zip(axes[0], reports):
        shown = [p for p in r.results if p.name in ("paper", "paper-all", "knn-agree", "oracle") or
                 p.name.startswith("auto")]
        width = 0.8 / max(len(shown), 1)
        for i, p in enumerate(shown):
            ax.bar(np.arange(r.depth + 1) + i * width, p.histogram(), width=width, label=p.name)
        ax.set(title=f"{r.task}: exit layers", xlabel="exit layer", ylabel="rows")
        ax.legend(fontsize=7)
    save(fig, "exit_histograms.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in reports:
        ax.plot(range(r.depth + 1), [100 * a for a in r.layer_accuracy], marker="o", label=r.task)
    ax.set(title="accuracy of each single exit (logit lens)", xlabel="layer", ylabel="accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, "layer_accuracy.png")

    for key, title, xlabel, log in (("k_sweep", "k", "k (neighbours)", True),
                                    ("size_sweep", "database size", "records", True)):
        if not any(getattr(r, key) for r in reports):
            continue
        fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
        for ax, r in zip(axes[0], reports):
            for p, points in getattr(r, key).items():
                ax.plot([x for x, _, _ in points], [100 * a for _, a, _ in points], marker="o", label=p)
            ax.set(title=f"{r.task}: accuracy over {title}", xlabel=xlabel, ylabel="accuracy (%)")
            if log:
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, f"{key}.png")

    if any(r.encoder_sweep for r in reports):
        fig, axes = plt.subplots(1, n, figsize=(6 * n, 4), squeeze=False)
        for ax, r in zip(axes[0], reports):
            encoders = list(r.encoder_sweep)
            width = 0.8 / len(encoders)
            for i, enc in enumerate(encoders):
                ax.bar(np.arange(len(SWEEP_POLICIES)) + i * width,
                       [100 * r.encoder_sweep[enc][p][0] for p in SWEEP_POLICIES], width=width, label=enc)
            ax.set_xticks(np.arange(len(SWEEP_POLICIES)) + 0.4 - width / 2, SWEEP_POLICIES, fontsize=8)
            ax.set(title=f"{r.task}: key encoders", ylabel="accuracy (%)")
            ax.legend(fontsize=7)
        save(fig, "encoder_sweep.png")
    return written


def write_reports(reports: Sequence[TaskBench], out: Path, command: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"command": command, "tasks": [r.to_dict() for r in reports]},
                                                 indent=2))
    (out / "results.md").write_text(markdown(reports, command))
    return [out / "results.json", out / "results.md", *plot(reports, out)]


def print_summary(report: TaskBench, echo: Callable[[str], None]) -> None:
    """The task's tables (policies, latency, sweeps) as they go into results.md."""
    echo("\n".join(markdown([report], "").splitlines()[4:]))
