"""Label-prior shift: what a skewed label mix in the records costs, and what the correction gets back.

From a task's existing records (a `raee-admin bench` or ingest built them), two databases of the
same size are drawn, copied with their exit results and features (no backbone forward): one with
the labels as balanced as the records allow, one skewed (`skewed_shares`). Each gets its own exit
heads. The same dev rows (one full forward each) are then answered from both databases by every
policy twice: as the service was before the correction (votes as the records fall, `auto` chosen
on plain accuracy) and with it (votes weighed toward equal shares, `auto` chosen on balanced
accuracy). Balanced accuracy on the dev rows is the measure: it is what a balanced dev set's
accuracy estimates, whatever the dev rows' own mix.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from raee_server.bench.harness import _bar, copy_records, first_rows
from raee_server.core import auto as tuning
from raee_server.core.engine import Engine, softmax
from raee_server.core.evaluation import Measured, PolicyResult, answers, run_policy
from raee_server.core.heads import ExitHeads
from raee_server.core.policies import bind, parse_policy
from raee_server.core.prior import PriorTracker
from raee_server.types import Neighbour, TaskSpec


def skewed_shares(counts: dict[str, int]) -> dict[str, float]:
    """The skewed mix the benchmark draws: two labels, 80/20 toward the more common one; more labels
    in a near-even mix, the most common at 55 % and the rest even; an uneven mix, made twice as
    skewed (each share squared, renormalised)."""
    labels = sorted(counts, key=lambda label: -counts[label])
    if len(labels) == 2:
        return {labels[0]: 0.8, labels[1]: 0.2}
    if max(counts.values()) <= 1.5 * min(counts.values()):
        rest = 0.45 / (len(labels) - 1)
        return {label: 0.55 if i == 0 else rest for i, label in enumerate(labels)}
    squared = {label: counts[label] ** 2 for label in labels}
    return {label: v / sum(squared.values()) for label, v in squared.items()}


def draw(examples: Sequence[tuple[str, str, str]], shares: dict[str, float], n: int, seed: int = 0
         ) -> list[tuple[str, str, str]]:
    """`n` records with the labels as near `shares` as the records allow: a label short of its
    share gives what it has and the others fill the rest in proportion to theirs."""
    rng = random.Random(seed)
    by_label: dict[str, list[tuple[str, str, str]]] = {}
    for example in examples:
        by_label.setdefault(example[2], []).append(example)
    want = {label: 0 for label in shares}
    left, open_labels = n, set(shares)
    while left > 0 and open_labels:
        total = sum(shares[label] for label in open_labels)
        given = 0
        for label in sorted(open_labels):
            take = min(len(by_label.get(label, [])) - want[label], max(1, round(left * shares[label] / total)))
            take = min(take, left - given)
            want[label] += max(take, 0)
            given += max(take, 0)
        open_labels = {label for label in open_labels if want[label] < len(by_label.get(label, []))}
        if given == 0:
            break
        left -= given
    return [e for label, count in want.items() for e in rng.sample(by_label.get(label, []), count)]


def adaptation_stream(probs: Sequence[np.ndarray], gold: Sequence[int], train_prior: Sequence[float],
                      half: int = 500, shift: float = 0.9, seed: int = 0) -> dict[str, Any]:
    """The online prior estimate on a stream of dev answers whose label mix changes half-way:
    `half` requests drawn with equal label shares, then `half` with `shift` of them of the dev
    rows' most common label (rows drawn with replacement). Reports the estimate's path and the
    second half's accuracy with and without adapting."""
    rng = np.random.default_rng(seed)
    gold_arr = np.asarray(gold)
    labels = np.unique(gold_arr)
    main = int(np.bincount(gold_arr).argmax())
    by_label = {int(c): np.flatnonzero(gold_arr == c) for c in labels}
    first = [rng.choice(by_label[int(rng.choice(labels))]) for _ in range(half)]
    rest = [c for c in labels if c != main]
    second = [rng.choice(by_label[main] if rng.random() < shift else by_label[int(rng.choice(rest))])
              for _ in range(half)]
    tracker = PriorTracker([str(c) for c in range(len(train_prior))], train_prior)
    path, right_plain, right_adapted, right_majority = [], 0, 0, 0
    for step, i in enumerate([*first, *second], 1):
        p = np.asarray(probs[i])[None, :]
        tracker.observe(p)
        if step > half:
            right_plain += int(p.argmax() == gold_arr[i])
            right_adapted += int(tracker.adjust(p).argmax() == gold_arr[i])
            right_majority += int(gold_arr[i] == main)  # always answering the stream's new majority label
        if step % 50 == 0:
            path.append((step, float(tracker.estimate[main])))
    return {"label": main, "first_half_share": 1 / len(labels), "second_half_share": shift,
            "estimate_path": path, "estimate_after": float(tracker.estimate[main]),
            "second_half_accuracy": right_plain / half, "second_half_accuracy_adapted": right_adapted / half,
            "second_half_majority_label": right_majority / half}


SAMPLE_SIZES = (300, 1000)  # auto's validation samples compared with all of its validation rows
SAMPLES = 5


def validation_sizes(validation: Sequence[Measured], measured: Sequence[Measured], depth: int,
                     labels: Sequence[str], heads: ExitHeads) -> list[dict[str, Any]]:
    """What `auto` picks (corrected, balanced accuracy) on random samples of its validation rows
    of each of SAMPLE_SIZES, SAMPLES draws each, and on all of them; and what each pick scores
    on the dev rows. Why `auto` validates on up to VALIDATION_ROWS records."""
    out = []
    for n in (*(size for size in SAMPLE_SIZES if size < len(validation)), len(validation)):
        for seed in range(SAMPLES if n < len(validation) else 1):
            sample = random.Random(seed).sample(list(validation), n)
            name, k, _, _ = tuning.pick(tuning.choose(sample, depth, labels, heads=heads), n)
            r = run_policy(bind(parse_policy(name), heads), measured, depth, labels, k)
            out.append({"rows": n, "seed": seed, "chose": f"{name} (k = {k})",
                        "balanced_accuracy": r.balanced_accuracy(len(labels))})
    return out


CASCADES = ("cascade:0.01", "cascade:0.02", "cascade:0.03")


def shares_of(label_records: dict[str, int], labels: Sequence[str]) -> list[float]:
    total = sum(label_records.values()) or 1
    return [label_records.get(label, 0) / total for label in labels]


def mix_accuracy(result: PolicyResult, shares: Sequence[float]) -> float:
    """Accuracy on traffic whose labels follow `shares` (e.g. the records' own mix), from the per-label
    recalls on the dev rows: the case where the records are a fair sample of the traffic."""
    gold, predicted = np.array(result.gold), np.array(result.predicted)
    present = [(share, np.mean(predicted[gold == c] == c)) for c, share in enumerate(shares) if np.any(gold == c)]
    return float(sum(s * r for s, r in present) / max(sum(s for s, _ in present), 1e-12))


def _plain(rows: Sequence[Sequence[Neighbour]]) -> list[list[Neighbour]]:
    return [[replace(n, weight=1.0) for n in row] for row in rows]


def shift_task(engine: Engine, spec: TaskSpec, dev: Path, size: int, dev_rows: int, k: int = 12
               ) -> dict[str, Any]:
    task, labels, depth = spec.name, spec.label_names, engine.depth
    examples = engine.metadata.committed_examples(task)
    counts = {label: sum(1 for e in examples if e[2] == label) for label in labels}
    mixes = {"balanced": {label: 1 / len(labels) for label in labels}, "skewed": skewed_shares(counts)}
    rows = first_rows(dev, dev_rows)
    texts, gold = [r.text for r in rows], [spec.label_index(r.label) for r in rows]
    logits, features = [], []
    with _bar(len(rows), f"{task}: dev forwards") as bar:
        for i in range(0, len(texts), 32):
            lg, ft = engine.all_exits(task, texts[i : i + 32])
            logits.append(lg)
            features.append(ft)
            bar.update(len(texts[i : i + 32]))
    all_logits, all_features = np.concatenate(logits), np.concatenate(features)
    report: dict[str, Any] = {"task": task, "records": size, "dev_rows": len(rows), "k": k,
                              "records_available": counts, "databases": {}}
    auto_results: dict[tuple[str, str], PolicyResult] = {}
    for kind, shares in mixes.items():
        sub = f"{task}--{kind}{size}"
        copy_records(engine, task, engine, sub, None, draw(examples, shares, size))
        heads = tuning.fit_task_heads(engine, sub) if tuning.needs_heads(engine, sub) else engine.heads(sub)
        assert heads is not None
        found, _ = engine.neighbours(sub, texts, max(tuning.K_CHOICES))
        head_probs = heads.all_probs(all_features)
        validation = tuning.validation_rows(engine, sub, tuning.VALIDATION_ROWS, max(tuning.K_CHOICES))
        info = engine.task_info(sub)
        entry: dict[str, Any] = {"label_records": info.label_records, "heads_best_exit": heads.best_exit,
                                 "variants": {}}
        for corrected in (False, True):
            nbs = found if corrected else _plain(found)
            measured = [Measured(g, softmax(lg.astype(np.float64)), list(nb), hp,
                                 engine.head_judged(list(nb), heads, spec))
                        for g, lg, nb, hp in zip(gold, all_logits, nbs, head_probs)]
            val = validation if corrected else [replace(r, neighbours=_plain([r.neighbours])[0],
                                                        head_neighbours=_plain([r.head_neighbours or []])[0])
                                                for r in validation]
            objective = "balanced_accuracy" if corrected else "accuracy"
            best = tuning.pick(tuning.choose(val, depth, labels, heads=heads, objective=objective), len(val))
            names = ["full", "paper", "knn-vote", "heads", *CASCADES]  # heads: the best exit
            results: dict[str, dict[str, Any]] = {}
            by_name: dict[str, PolicyResult] = {}
            for name, policy_k in [*((n, k) for n in names), ("auto", best[1])]:
                policy = bind(parse_policy(best[0] if name == "auto" else name), heads)
                r = by_name[name] = run_policy(policy, measured, depth, labels, policy_k)
                results[name] = {"accuracy": r.accuracy, "balanced_accuracy": r.balanced_accuracy(len(labels)),
                                 "records_mix_accuracy": mix_accuracy(r, shares_of(info.label_records, labels)),
                                 "mean_exit": r.mean_exit}
            if corrected:  # the cascade's promise, on this database: balanced accuracy lost against its best head
                entry["cascades"] = []
                for name in CASCADES:
                    lost, low, high = by_name["heads"].balanced_gap(by_name[name], len(labels))
                    entry["cascades"].append({"policy": name, "margin": float(name.split(":")[1]),
                                              "balanced_lost": lost, "low": low, "high": high,
                                              "mean_exit": by_name[name].mean_exit,
                                              "head_exit": by_name["heads"].mean_exit})
            results["auto"]["chose"] = f"{best[0]} (k = {best[1]})"
            variant = "corrected" if corrected else "uncorrected"
            auto_results[kind, variant] = r
            entry["variants"][variant] = results
            if corrected:
                entry["validation_sizes"] = validation_sizes(val, measured, depth, labels, heads)
            if corrected and kind == "balanced":
                policy = bind(parse_policy(best[0]), heads)
                report["adaptation"] = adaptation_stream(
                    [a for a, _, _ in answers(policy, measured, depth, labels, best[1])], gold, spec.shares)
                report["adaptation"]["policy"] = results["auto"]["chose"]
        report["databases"][kind] = entry
    # the measure: auto on the skewed database against auto on the balanced one, same dev rows
    report["auto_gap"] = {}
    for variant in ("uncorrected", "corrected"):
        gap, low, high = auto_results["skewed", variant].balanced_gap(auto_results["balanced", variant], len(labels))
        report["auto_gap"][variant] = {"gap": gap, "low": low, "high": high}
    return report


def markdown(reports: Sequence[dict[str, Any]], command: str) -> str:
    out = ["# Label-prior shift", "", f"Command: `{command}`", "",
           "Balanced accuracy on the dev rows (accuracy in brackets) @ mean exit. *uncorrected*: votes as the "
           "records fall, `auto` chosen on accuracy (the service before the correction); *corrected*: votes "
           "weighed toward equal label shares, `auto` chosen on balanced accuracy.", ""]
    for rep in reports:
        dbs = rep["databases"]
        out += [f"## {rep['task']}", "",
                f"{rep['records']} records per database, {rep['dev_rows']} dev rows, k = {rep['k']}. "
                + "; ".join(f"{kind}: " + ", ".join(f"{lb} {n}" for lb, n in d["label_records"].items())
                            for kind, d in dbs.items()), "",
                "| policy | balanced db, uncorrected | balanced db, corrected | skewed db, uncorrected "
                "| skewed db, corrected |", "|---|---|---|---|---|"]
        for name in dbs["balanced"]["variants"]["corrected"]:
            cells = []
            for kind in ("balanced", "skewed"):
                for variant in ("uncorrected", "corrected"):
                    r = dbs[kind]["variants"][variant][name]
                    chose = f" {r['chose']}" if "chose" in r else ""
                    cells.append(f"{100 * r['balanced_accuracy']:.1f} % ({100 * r['accuracy']:.1f} %) "
                                 f"@ {r['mean_exit']:.2f}{chose}")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out += ["", "Accuracy on traffic that follows each database's own label mix (per-label recalls on the dev "
                "rows, weighted by the records' shares):", "",
                "| policy | balanced db, uncorrected | balanced db, corrected | skewed db, uncorrected "
                "| skewed db, corrected |", "|---|---|---|---|---|"]
        for name in dbs["balanced"]["variants"]["corrected"]:
            out.append(f"| {name} | " + " | ".join(
                f"{100 * dbs[kind]['variants'][variant][name]['records_mix_accuracy']:.1f} %"
                for kind in ("balanced", "skewed") for variant in ("uncorrected", "corrected")) + " |")
        for kind, d in dbs.items():
            for c in d.get("cascades", []):
                out.append(f"- {kind} db, {c['policy']}: loses {100 * c['balanced_lost']:+.1f} points of balanced "
                           f"accuracy ({100 * c['low']:+.1f} to {100 * c['high']:+.1f}) against the best head "
                           f"(promise: at most {100 * c['margin']:.0f}), mean exit {c['mean_exit']:.2f} against "
                           f"{c['head_exit']:.0f}")
        if all("validation_sizes" in d for d in dbs.values()):
            parts = []
            for kind, d in dbs.items():
                sizes: dict[int, list[float]] = {}
                for v in d["validation_sizes"]:
                    sizes.setdefault(v["rows"], []).append(v["balanced_accuracy"])
                parts.append(f"{kind} db " + ", ".join(
                    f"{n} rows {100 * float(np.mean(a)):.1f} %" for n, a in sizes.items()))
            out += ["", f"`auto` (corrected) chosen on validation samples of each size ({SAMPLES} draws; one "
                    "for all rows), mean balanced accuracy of its pick on dev: " + "; ".join(parts)]
        if "auto_gap" in rep:
            g = rep["auto_gap"]
            out += ["", "`auto`, skewed database minus balanced database, balanced accuracy (95 % paired "
                    "bootstrap interval over the dev rows): " + "; ".join(
                        f"{variant} {100 * g[variant]['gap']:+.1f} points ({100 * g[variant]['low']:+.1f} to "
                        f"{100 * g[variant]['high']:+.1f})" for variant in ("uncorrected", "corrected"))]
        if "adaptation" in rep:
            a = rep["adaptation"]
            total = a["estimate_path"][-1][0]
            out += ["", f"Online prior adaptation ({a['policy']}, balanced database, corrected): a stream of "
                    f"{total} dev answers, equal label shares, then {100 * a['second_half_share']:.0f} % "
                    f"label {a['label']}: the estimate of that label's share reached {a['estimate_after']:.2f}; "
                    f"second-half accuracy {100 * a['second_half_accuracy']:.1f} % without adapting, "
                    f"{100 * a['second_half_accuracy_adapted']:.1f} % with; always answering that label: "
                    f"{100 * a['second_half_majority_label']:.1f} %."]
        out.append("")
    return "\n".join(out)


def plot(reports: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(5.5 * len(reports), 4), squeeze=False)
    bars = [("balanced", "uncorrected"), ("skewed", "uncorrected"), ("skewed", "corrected"), ("balanced", "corrected")]
    for ax, rep in zip(axes[0], reports):
        names = list(rep["databases"]["balanced"]["variants"]["corrected"])
        x = np.arange(len(names))
        for i, (kind, variant) in enumerate(bars):
            values = [100 * rep["databases"][kind]["variants"][variant][n]["balanced_accuracy"] for n in names]
            ax.bar(x + (i - 1.5) * 0.2, values, 0.2, label=f"{kind} db, {variant}")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylabel("balanced accuracy on dev (%)")
        ax.set_title(rep["task"])
        ax.set_ylim(0, 100)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for rep in reports:
        if "adaptation" in rep:
            steps, shares = zip(*rep["adaptation"]["estimate_path"])
            ax.plot(steps, shares, marker=".", label=rep["task"])
            ax.axvline(steps[-1] / 2, color="grey", ls=":")
    ax.set_xlabel("requests")
    ax.set_ylabel("estimated share of the shifted label")
    ax.set_title("online prior estimate: equal shares, then 90 %")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_name("adaptation.png"), dpi=110)
    plt.close(fig)


def write(reports: Sequence[dict[str, Any]], out: Path, command: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "shift.json").write_text(json.dumps({"command": command, "tasks": list(reports)}, indent=2))
    (out / "shift.md").write_text(markdown(reports, command))
    plot(reports, out / "shift.png")
    return [out / "shift.json", out / "shift.md", out / "shift.png", out / "adaptation.png"]
