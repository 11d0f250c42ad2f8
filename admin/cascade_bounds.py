"""How much each cascade rule costs and what Learn-then-Test can certify of it, on a task's stored heads.

    .venv/bin/python admin/cascade_bounds.py DATA_DIR TASK

For each candidate rule (the fit split's proposal at each of heads.PROPOSALS), on the calibration split:
the bound the service uses (balanced accuracy lost, gains offsetting losses: heads.risk_bound), the
bound that counts every disagreement with the best head as a loss (the first version), and the rule's
mean exit. docs/results.md quotes its output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy.stats import beta

from raee_server.core.heads import PROPOSALS, RISK_LEVEL, ExitHeads, cascade_exits, propose_thresholds, risk_bound
from raee_server.stores.metadata import MetadataStore


def disagreement_bound(probs: np.ndarray, gold: np.ndarray, thresholds: np.ndarray, bound: int, labels: int) -> float:
    """Per label, the Clopper-Pearson upper bound (at delta / labels) on the share of rows whose answer
    differs from the bound head's, averaged over the labels."""
    exits = cascade_exits(probs, thresholds, bound)
    differ = probs[np.arange(len(gold)), exits].argmax(-1) != probs[:, bound].argmax(-1)
    upper = []
    for label in range(labels):
        rows = gold == label
        n, k = int(rows.sum()), int(differ[rows].sum())
        upper.append(1.0 if n == 0 or k == n else float(beta.ppf(1 - RISK_LEVEL / labels, k + 1, n - k)))
    return float(np.mean(upper))


def main(data_dir: str, task: str) -> None:
    stored = MetadataStore(f"sqlite:///{Path(data_dir) / 'metadata.sqlite'}").heads(task)
    if stored is None:
        raise SystemExit(f"task {task!r} has no exit heads in {data_dir}")
    heads = ExitHeads.from_bytes(stored.data, stored.version, "", 0.0)
    if heads.gold is None or heads.calibration is None:
        raise SystemExit("these heads have no calibration split: refit them (raee-admin fit-heads)")
    probs, gold, bound, labels = heads.oof.astype(np.float64), heads.gold, heads.best_exit, len(heads.labels)
    fit, cal = heads.fit_rows, heads.calibration
    print(f"{task}: best exit {bound}, {int(cal.sum())} calibration records, delta = {RISK_LEVEL}")
    print("| proposal | bound used (lost minus gained) | disagreement bound | mean exit (calibration) |")
    print("|---|---|---|---|")
    for proposal in PROPOSALS:
        t = propose_thresholds(probs[fit], gold[fit], proposal, bound)
        mean_exit = cascade_exits(probs[cal], t, bound).mean()
        print(f"| {proposal:g} | {risk_bound(probs[cal], gold[cal], t, bound, labels):.4f} | "
              f"{disagreement_bound(probs[cal], gold[cal], t, bound, labels):.4f} | {mean_exit:.2f} |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
