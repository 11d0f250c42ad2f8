"""What Learn-then-Test certifies of a task's cascades, under each bound and candidate sequence, from its
stored heads (no forward):

    .venv/bin/python admin/cascade_bounds.py DATA_DIR TASK [TASK ...]

Per task, cascade (heads only, key first) and margin: the mean exit (the key counts 0) and the share
answered by the key on the calibration split, for the rule certified by
- the two-sided Clopper-Pearson bound (rows lost above, rows gained below, each at delta / (2 x labels))
  with the first 16 candidates and the last certified rule served (before issue 32);
- the same bound with the service's candidates (cascade.candidate_rules);
- the service's betting bound (cascade.risk_bound) with its candidates: what is served.
docs/results.md quotes its output.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from scipy.stats import beta

from raee_server.core.cascade import RISK_LEVEL, candidate_rules, cascade_exits, propose_thresholds, risk_bound
from raee_server.core.heads import ExitHeads
from raee_server.stores.metadata import MetadataStore

FIRST_PROPOSALS = (0.0, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3)
Bound = Callable[[np.ndarray, np.ndarray, np.ndarray, int, int], float]


def clopper_pearson(probs: np.ndarray, gold: np.ndarray, thresholds: np.ndarray, bound: int, labels: int) -> float:
    exits = cascade_exits(probs, thresholds, bound)
    cascade = probs[np.arange(len(gold)), exits].argmax(-1) == gold
    best = probs[:, bound].argmax(-1) == gold
    lost, gained = best & ~cascade, cascade & ~best
    level = RISK_LEVEL / (2 * labels)
    upper = []
    for label in range(labels):
        rows = gold == label
        n, k_lost, k_gained = int(rows.sum()), int(lost[rows].sum()), int(gained[rows].sum())
        most = 1.0 if k_lost == n else float(beta.ppf(1 - level, k_lost + 1, n - k_lost))
        least = 0.0 if k_gained == 0 else float(beta.ppf(level, k_gained, n - k_gained + 1))
        upper.append(most - least)
    return float(np.mean(upper))


def certified(rules: Iterable[np.ndarray], bound_of: Bound, probs: np.ndarray, gold: np.ndarray, cal: np.ndarray,
              fit: np.ndarray, stage_bound: int, labels: int, margin: float, key_first: bool, shallowest: bool
              ) -> np.ndarray:
    chosen, least = np.full(probs.shape[1], np.inf), np.inf
    for t in rules:
        if bound_of(probs[cal], gold[cal], t, stage_bound, labels) > margin:
            break
        depth = float(np.maximum(cascade_exits(probs[fit], t, stage_bound) - int(key_first), 0).mean())
        if not shallowest or depth < least:
            chosen, least = t, depth
    return chosen


def main(data_dir: str, tasks: list[str]) -> None:
    store = MetadataStore(f"sqlite:///{Path(data_dir) / 'metadata.sqlite'}")
    print("| task | cascade | m | Clopper-Pearson, first candidates | Clopper-Pearson, new candidates | "
          "betting, new candidates (served) |")
    print("|---|---|---|---|---|---|")
    for task in tasks:
        stored = store.heads(task)
        if stored is None:
            raise SystemExit(f"task {task!r} has no exit heads in {data_dir}")
        heads = ExitHeads.from_bytes(stored.data, stored.version, "", 0.0)
        assert heads.gold is not None and heads.calibration is not None
        gold, cal, fit, labels = heads.gold, heads.calibration, heads.fit_rows, len(heads.labels)
        for key_first in (False, True) if heads.key is not None else (False,):
            probs = (heads.stages() if key_first else heads.oof).astype(np.float64)
            stage_bound = heads.best_exit + int(key_first)
            for margin in (0.01, 0.02, 0.03):
                cells = []
                for bound_of, rules, shallowest in (
                        (clopper_pearson, lambda: (propose_thresholds(probs[fit], gold[fit], p, stage_bound)
                                                   for p in FIRST_PROPOSALS), False),
                        (clopper_pearson, lambda: candidate_rules(probs[fit], gold[fit], stage_bound, key_first), True),
                        (risk_bound, lambda: candidate_rules(probs[fit], gold[fit], stage_bound, key_first), True)):
                    t = certified(rules(), bound_of, probs, gold, cal, fit, stage_bound, labels, margin, key_first,
                                  shallowest)
                    stopped = cascade_exits(probs[cal], t, stage_bound)
                    depth = np.maximum(stopped - int(key_first), 0).mean()
                    cells.append(f"{depth:.2f}" + (f" ({100 * np.mean(stopped == 0):.0f} % by the key)"
                                                   if key_first else ""))
                name = "key-cascade" if key_first else "cascade"
                print(f"| {task} | {name} | {margin:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
