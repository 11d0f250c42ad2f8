"""Traffic unlike the records: does the coverage gate keep a cascade's promise where its calibration does not?

A cascade's thresholds are certified on records (raee_server.core.heads); they hold for traffic like
the records. Here the records are drawn to leave part of the traffic out, from a task's existing
records (a `raee-admin bench` built them; copied with their features, no backbone forward), and the
dev rows are split by the same rule into traffic the records cover ("control") and traffic they do
not ("shifted"). Two constructions, both reproducible from the files alone:

- `length` (SST-2: records are phrases, traffic whole sentences): records of at most `SHORT_WORDS`
  words; shifted traffic: dev rows of at least `LONG_WORDS` words; control: dev rows of at most
  `SHORT_WORDS` words.
- `subtopic` (AG News: a topic's stories the records never saw): within each label, the records'
  keys in two clusters (k-means, seeded); records: one cluster per label (the first); shifted traffic:
  dev rows whose nearest cluster centre is a dropped one; control: those nearest a kept one.

On each, per margin: the best fixed head, the heads-only cascade, and the key-first cascade with and
without the gate; balanced accuracy lost against the best head with a 95 % paired bootstrap interval.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raee_server.bench.harness import _bar, copy_records, first_rows
from raee_server.core import auto as tuning
from raee_server.core.engine import Engine
from raee_server.core.evaluation import measure, run_policy
from raee_server.core.policies import bind, parse_policy
from raee_server.types import Row, TaskSpec

SHORT_WORDS = 8
LONG_WORDS = 20
MARGINS = (0.01, 0.02, 0.03)
FAMILIES = ("cascade", "key-cascade-ungated", "key-cascade")


def _words(text: str) -> int:
    return len(text.split())


def split_by_length(examples: Sequence[tuple[str, str, str]], rows: Sequence[Row], n: int
                    ) -> tuple[list[tuple[str, str, str]], list[Row], list[Row]]:
    """`length`: short records; up to n long dev rows (shifted) and n short ones (control)."""
    records = [e for e in examples if _words(e[1]) <= SHORT_WORDS]
    shifted = [r for r in rows if _words(r.text) >= LONG_WORDS][:n]
    control = [r for r in rows if _words(r.text) <= SHORT_WORDS][:n]
    return records, shifted, control


def split_by_subtopic(engine: Engine, examples: Sequence[tuple[str, str, str]], rows: Sequence[Row], n: int,
                      seed: int = 0) -> tuple[list[tuple[str, str, str]], list[Row], list[Row]]:
    """`subtopic`: per label, the records' keys in two k-means clusters; the first kept."""
    from sklearn.cluster import KMeans

    keys = engine.encoder.encode([text for _, text, _ in examples])
    labels = np.array([label for _, _, label in examples])
    kept, centres, kept_centre = np.zeros(len(examples), dtype=bool), [], []
    for label in sorted(set(labels)):
        mine = np.flatnonzero(labels == label)
        fit = KMeans(2, random_state=seed, n_init=10).fit(keys[mine])
        kept[mine[fit.labels_ == 0]] = True
        centres += list(fit.cluster_centers_)
        kept_centre += [True, False]
    dev_keys = engine.encoder.encode([r.text for r in rows])
    nearest = np.argmax(dev_keys @ np.array(centres).T, axis=1)
    inside = np.array(kept_centre)[nearest]
    records = [e for e, keep in zip(examples, kept) if keep]
    shifted = [r for r, i in zip(rows, inside) if not i][:n]
    control = [r for r, i in zip(rows, inside) if i][:n]
    return records, shifted, control


def coverage_task(engine: Engine, spec: TaskSpec, dev: Path, construction: str, rows: int, dev_skip: int,
                  k: int = 12) -> dict[str, Any]:
    task = spec.name
    examples = engine.metadata.committed_examples(task)
    pool = first_rows(dev, 10**9, skip=dev_skip)
    if construction == "length":
        records, shifted, control = split_by_length(examples, pool, rows)
    else:
        records, shifted, control = split_by_subtopic(engine, examples, pool, rows)
    sub = f"{task}--{construction}"
    copy_records(engine, task, engine, sub, None, records)
    heads = tuning.fit_task_heads(engine, sub) if tuning.needs_heads(engine, sub) else engine.heads(sub)
    assert heads is not None
    labels, depth = spec.label_names, engine.depth
    best = f"heads:{heads.best_exit}"
    names = [best, *(f"{family}:{m:g}" for m in MARGINS for family in FAMILIES)]
    out: dict[str, Any] = {"task": task, "construction": construction, "records": len(records),
                           "heads": heads.summary(), "traffic": {}}
    for traffic, chosen in (("control", control), ("shifted", shifted)):
        if not chosen:  # the dev rows hold none of this kind (e.g. no long row in a small file)
            out["traffic"][traffic] = {"rows": 0, "outside": 0.0, "mean_words": 0.0, "policies": []}
            continue
        with _bar(len(chosen), f"{sub}: {traffic}") as bar:
            measured = measure(engine, sub, chosen, k, progress=bar.update)
        results = {name: run_policy(bind(parse_policy(name), heads), measured, depth, labels, k) for name in names}
        reference = results[best]
        rows_out = []
        for name, r in results.items():
            lost, low, high = reference.balanced_gap(r, len(labels))
            rows_out.append({"policy": name, "balanced_accuracy": r.balanced_accuracy(len(labels)),
                             "balanced_lost": lost, "low": low, "high": high, "mean_exit": r.mean_exit,
                             "key_share": r.key_share})
        out["traffic"][traffic] = {"rows": len(chosen), "outside": float(np.mean([not m.covered for m in measured])),
                                   "mean_words": float(np.mean([_words(r.text) for r in chosen])),
                                   "policies": rows_out}
    return out


def _margin(policy: str) -> float | None:
    family, _, rest = policy.partition(":")
    return float(rest) if family in FAMILIES else None


def markdown(reports: Sequence[dict[str, Any]], command: str) -> str:
    out = ["# Traffic unlike the records: the coverage gate", "", f"Command: `{command}`", "",
           "Balanced accuracy lost against the best fixed head (points, 95 % paired bootstrap interval); "
           "a cascade promises at most its margin on traffic like the records.", ""]
    for r in reports:
        cov = r["heads"].get("coverage") or {}
        out += [f"## {r['task']}, {r['construction']}", "",
                f"{r['records']} records; coverage learned from them: nearest-record similarity at least "
                f"{cov.get('similarity', 0):.3f}, at most {cov.get('words', 0)} words.", ""]
        for traffic, t in r["traffic"].items():
            out += [f"**{traffic}**: {t['rows']} dev rows, {t['mean_words']:.1f} words on average, "
                    f"{100 * t['outside']:.0f} % outside the coverage.", "",
                    "| policy | balanced accuracy | lost vs the best head [95 % CI] | within its margin | mean exit | "
                    "by the key |", "|---|---|---|---|---|---|"]
            for p in t["policies"]:
                margin = _margin(p["policy"])
                within = "" if margin is None else "yes" if p["balanced_lost"] <= margin else "**no**"
                out.append(f"| {p['policy']} | {100 * p['balanced_accuracy']:.1f} % | {100 * p['balanced_lost']:+.1f} "
                           f"[{100 * p['low']:+.1f}, {100 * p['high']:+.1f}] | {within} | {p['mean_exit']:.2f} | "
                           f"{100 * p['key_share']:.0f} % |")
            out.append("")
    return "\n".join(out)


def plot(reports: Sequence[dict[str, Any]], path: Path) -> None:
    """Per construction and traffic, balanced accuracy lost against the best head by margin, one line per
    cascade, with the margin itself (the promise) as the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(r, traffic) for r in reports for traffic, t in r["traffic"].items() if t["policies"]]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (r, traffic) in zip(axes[0], panels):
        rows = r["traffic"][traffic]["policies"]
        for family in FAMILIES:
            mine = [p for p in rows if p["policy"].partition(":")[0] == family]
            xs = [100 * (_margin(p["policy"]) or 0) for p in mine]
            ys = [100 * p["balanced_lost"] for p in mine]
            err = [[100 * (p["balanced_lost"] - p["low"]) for p in mine], [100 * (p["high"] - p["balanced_lost"])
                                                                           for p in mine]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=family)
        ax.plot([1, 3], [1, 3], "k--", linewidth=0.8, label="the promise")
        ax.set_title(f"{r['task']} {r['construction']}: {traffic}", fontsize=9)
        ax.set_xlabel("margin (points)")
        ax.set_ylabel("balanced accuracy lost vs best head (points)")
        ax.axhline(0, color="grey", linewidth=0.5)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(reports: Sequence[dict[str, Any]], out: Path, command: str | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    command = command or "raee-admin " + " ".join(sys.argv[1:])
    paths = [out / "coverage.md", out / "coverage.json", out / "coverage.png"]
    paths[0].write_text(markdown(reports, command) + "\n", encoding="utf-8")
    paths[1].write_text(json.dumps({"command": command, "reports": list(reports)}, indent=1), encoding="utf-8")
    plot(reports, paths[2])
    return [p for p in paths if p.exists()]
