"""The cascade's stopping rule: where it stops a row, the candidate rules proposed on the fit split, and
the bound that certifies one of them on the calibration split (Learn-then-Test; `ExitHeads.cascade_thresholds`
runs the procedure). Pure numpy on [N, stages, C] probabilities: no heads, no model."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

RISK_LEVEL = 0.1  # delta: the cascade's promise fails with probability at most this
# The cascade's candidate stopping rules, most cautious first: per-exit thresholds proposed on the fit
# split's out-of-fold probabilities at each of these proposal margins; Learn-then-Test keeps the last
# one in this order whose risk it certifies. Dense, and from below zero (a rule that must gain on the
# bound's head where it stops early): the certified rule is the last candidate before the first that
# fails, so gaps between candidates are depth given away.
PROPOSALS = tuple(float(p) for p in np.round(np.arange(-0.05, 0.3001, 0.0025), 4))


def row_weights(gold: np.ndarray) -> np.ndarray:
    """Per record, the inverse of its label's share of the records, scaled to mean 1: weighted by
    these, accuracy is balanced accuracy (and all weights are 1 on a balanced database)."""
    counts = np.bincount(gold)
    present = np.count_nonzero(counts)
    return np.asarray(len(gold) / (present * counts[gold]), dtype=np.float64)


def cascade_exits(probs: np.ndarray, thresholds: np.ndarray, bound: int) -> np.ndarray:
    """[N] where the cascade answers each row of [N, E, C] probabilities: the first exit below the bound
    whose top probability reaches its threshold, else the bound."""
    if bound == 0:  # nothing before the bound to stop at
        return np.zeros(len(probs), dtype=np.int64)
    sure = probs[:, :bound].max(-1) >= thresholds[None, :bound]  # [N, bound]
    return np.where(sure.any(1), sure.argmax(1), bound)


def risk_bound(probs: np.ndarray, gold: np.ndarray, thresholds: np.ndarray, bound: int, n_labels: int,
                delta: float = RISK_LEVEL) -> float:
    """An upper confidence bound, at level 1 - delta, on the balanced accuracy the cascade loses against
    the bound head: per label, on each of its rows d = (bound head right) - (cascade right), in {-1, 0, 1},
    the mean of d bounded above at delta / labels (`betting_upper`, Bonferroni over the labels), averaged
    over the labels. A label without calibration rows bounds at 1: nothing is known.

    Gains offset losses, as in the balanced accuracy itself. One bound on the paired difference, not
    two Clopper-Pearson bounds (lost above, gained below, each at delta / (2 x labels), as before): the
    betting bound adapts to how rarely the two disagree. On SST-2's 5,000 records it certified
    `cascade:0.02` at mean exit 5.68 on the calibration split where the two-sided Clopper-Pearson
    bound certified no early stop at all (docs/results.md, "Key-first cascade")."""
    exits = cascade_exits(probs, thresholds, bound)
    cascade = probs[np.arange(len(gold)), exits].argmax(-1) == gold
    d = (probs[:, bound].argmax(-1) == gold).astype(np.float64) - cascade
    upper = []
    for label in range(n_labels):
        rows = gold == label
        upper.append(2 * betting_upper((d[rows] + 1) / 2, delta / n_labels) - 1 if rows.any() else 1.0)
    return float(np.mean(upper))


def betting_upper(x: np.ndarray, delta: float, cap: float = 0.99, seed: int = 0) -> float:
    """An upper confidence bound at level 1 - delta on the mean of exchangeable x in [0, 1], by betting
    (Waudby-Smith and Ramdas, JRSS B 2024; the bound Learn-then-Test recommends): the capital of a bettor
    against "the mean is at least m", prod_t (1 - lambda_t (x_t - m)), with predictable bets lambda_t
    from the rows before t (their mean and variance, capped at `cap` / (1 - m)), reaches 1 / delta with
    probability at most delta when the mean is m or more (Ville's inequality). The bound is the least
    m where it does, found by bisection (the capital grows with m). The rows are taken in a seeded
    order; tight where x varies little (a cascade that rarely disagrees with the bound's head)."""
    n = len(x)
    if n == 0:
        return 1.0
    x = np.random.default_rng(seed).permutation(np.asarray(x, dtype=np.float64))
    t = np.arange(1, n + 1)
    mean = (0.5 + np.cumsum(x)) / (t + 1)
    var = (0.25 + np.cumsum((x - mean) ** 2)) / (t + 1)
    before = np.concatenate([[0.25], var[:-1]])  # each bet sees only the rows before it
    bets = np.sqrt(2 * np.log(1 / delta) / (n * before))
    target = np.log(1 / delta)

    def rejected(m: float) -> bool:
        # capped at cap / (1 - m): the capital stays positive at x = 1, and the bettor may stake up to
        # twice as much near m = 1/2, where a cascade's ties (x = 1/2) sit
        stakes = np.minimum(bets, cap / max(1 - m, 1e-12))
        return bool(np.cumsum(np.log1p(-stakes * (x - m))).max() >= target)

    low, high = 0.0, 1.0
    if not rejected(high):
        return 1.0
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (low, mid) if rejected(mid) else (mid, high)
    return high


SHARES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # steps up to the first proposal that stops early


def candidate_rules(probs: np.ndarray, gold: np.ndarray, bound: int, key_first: bool = False
                    ) -> Iterator[np.ndarray]:
    """The cascade's candidate rules from the fit split alone, most cautious first: the proposal at each of
    PROPOSALS; before the first that stops any row early, the same rule stopping only the most confident
    SHARES of its early stops at each stage (`shrink`): one proposal margin to the next can jump from no
    early stop to a third of the depth (AG News), and a step the calibration split cannot certify ends
    the sequence. Only there: steps between later proposals gave a failing step more chances to end the
    sequence early (on AG News, key-cascade:0.03's calibration mean exit went from 1.6 to 3.7).

    `key_first` (stage 0 is the key head): first the rules that stop only at the key (each proposal's key
    threshold, no early exit after it), then the full proposals. The key is what saves depth, and in
    the full proposals' order a rule adding early exits before the key's threshold appears can fail
    the test and end the sequence (AG News at m = 0.02: the key-only rule stopping 71 % of the
    calibration rows was certified, but the full sequence failed before reaching it)."""
    proposals = [propose_thresholds(probs, gold, p, bound) for p in PROPOSALS]
    if key_first:
        key_only = [np.where(np.arange(len(t)) == 0, t, np.inf) for t in proposals]
        yield from _stepped(probs, bound, key_only)
    yield from _stepped(probs, bound, proposals)


def _stepped(probs: np.ndarray, bound: int, rules: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
    """The rules, without repeats, with SHARES steps before the first that stops any row early."""
    before: np.ndarray | None = None
    for thresholds in rules:
        if before is not None and np.array_equal(thresholds, before):
            continue
        if before is not None and not np.isfinite(before).any() and np.isfinite(thresholds).any():
            for share in SHARES:
                yield shrink(probs, thresholds, bound, share)
        yield thresholds
        before = thresholds


def shrink(probs: np.ndarray, thresholds: np.ndarray, bound: int, share: float) -> np.ndarray:
    """The rule stopping, at each stage, the most confident `share` of the rows `thresholds` stop there
    (of those still running under the shrunk rule): thresholds raised, stage by stage."""
    out = np.full_like(thresholds, np.inf)
    confidence = probs.max(-1)
    running = np.ones(len(probs), dtype=bool)
    for stage in range(min(bound, len(thresholds))):
        if not np.isfinite(thresholds[stage]):
            continue
        stopping = np.sort(confidence[running & (confidence[:, stage] >= thresholds[stage]), stage])[::-1]
        if stopping.size == 0:
            continue
        out[stage] = stopping[max(int(np.ceil(share * stopping.size)) - 1, 0)]
        running &= ~(confidence[:, stage] >= out[stage])
    return out


def propose_thresholds(oof: np.ndarray, gold: np.ndarray, margin: float, bound: int, min_rows: int = 10) -> np.ndarray:
    """Candidate thresholds from the fit split's out-of-fold probabilities, exit by exit: at each exit,
    the lowest threshold at which the rows still running that would stop there lose at most `margin`
    balanced accuracy (plus one standard error) against the bound's head on those same rows. At least
    `min_rows` records must stop at an exit for it to get a threshold. A proposal only: it promises
    nothing until the calibration split certifies it (`ExitHeads.cascade_thresholds`)."""
    correct = oof.argmax(-1) == gold[:, None]  # [N, E]
    confidence = oof.max(-1)
    weight = row_weights(gold)
    thresholds = np.full(oof.shape[1], np.inf)
    running = np.ones(len(gold), dtype=bool)
    for exit_ in range(min(bound, oof.shape[1] - 1)):
        rows = np.flatnonzero(running)
        order = rows[np.argsort(-confidence[rows, exit_], kind="stable")]
        ranked = confidence[order, exit_]
        # +w: stopping here loses a row the bound's head gets right, weighted by its label's rarity
        change = weight[order] * (correct[order, bound].astype(np.int64) - correct[order, exit_])
        lost, count, mass = np.cumsum(change), np.arange(1, len(order) + 1), np.cumsum(weight[order])
        spread = np.sqrt(np.maximum(np.cumsum(change**2) - lost**2 / count, 0.0))  # sqrt(n) x sd of the loss
        ok = np.flatnonzero(lost + spread <= margin * mass)
        # a threshold stops every row at least that sure: cut only between different confidences
        boundary = np.append(ranked[1:] < ranked[:-1], True)  # the next row is less sure
        ok = ok[(ok + 1 >= min_rows) & boundary[ok]]
        if ok.size == 0:
            continue
        thresholds[exit_] = confidence[order[ok.max()], exit_]
        running &= ~(confidence[:, exit_] >= thresholds[exit_])
    return thresholds
