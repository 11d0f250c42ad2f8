"""The `auto` policy: per task, the policy (and k) chosen on a validation split of the task's own
records: the least mean exit among the candidates within half a standard error of the best score.

Tuning never runs on a request: `raee-admin tune`, the end of a local `raee-admin ingest`, and
the server's background re-tuner (when a task grew by RAEE_RETUNE_GROWTH) call `tune`; requests
read the stored `Choice`.

Validation costs no backbone forward: each validation record's per-exit
predictions are in SQL, and its neighbours are retrieved leave-one-out: the record itself and
its near-duplicates (one text inside the other, or a shared run of words; raee_server.core.groups,
the same groups the exit heads' folds keep together) are dropped from its neighbours. Kept, they
make retrieval look better on validation than on new text (SST-2's records are phrases cut from the
same sentences; measured: docs/results.md).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from raee_server.core.engine import Engine
from raee_server.core.evaluation import Measured, PolicyResult, run_policy
from raee_server.core.fitting import MIN_RECORDS as HEADS_MIN_RECORDS
from raee_server.core.fitting import fit_heads, fit_with_key
from raee_server.core.groups import near_duplicate_groups
from raee_server.core.heads import ExitHeads
from raee_server.core.policies import bind, parse_policy
from raee_server.errors import InvalidInput
from raee_server.stores.codec import FeatureMatrix
from raee_server.stores.metadata import MetadataStore
from raee_server.stores.vectors import VectorStore
from raee_server.types import Choice

K_CHOICES = (4, 8, 12, 16, 24, 32)
# Validation records (all of them below this). The pick among near-equal candidates is noise on a
# few hundred rows, more so on balanced accuracy, which rests on the rarest label's rows. Measured
# (`raee-admin bench-shift`, 2,000-record databases, dev balanced accuracy of the pick, mean of 5
# samples): SST-2 82.3 % on 300 rows, 84.1 % on 1,000, 85.8 % on all 2,000; 80/20 SST-2 80.1, 81.8,
# 81.4 %; AG News 90.1, 90.6, 90.8 %; TREC within 0.3 point at every size (docs/results.md).
VALIDATION_ROWS = 2000
CASCADE_MARGINS = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05)
MIN_RECORDS = 10


def candidate_policies(depth: int, heads: ExitHeads | None = None) -> list[str]:
    """Every policy auto may pick; static layers and thresholds are swept.

    With exit heads, only the policies whose answer comes from the heads: each head, the paper's
    aggregation over head-judged exits, and cascades of heads at several margins. Leave-one-out
    validation on the records overrates answers that come from retrieval: near-duplicate records
    (SST-2's phrases of one sentence, AG News's articles on one story) vote for each other. At
    5,000 records, knn-heads:0.95 scored 89.5 % on 1,000 SST-2 validation records and 84.0 % on
    dev, knn-vote 90.4 % (balanced) on AG News validation and 88.4 % on dev, while heads and
    cascades validate within about a point of dev (docs/results.md). Those policies stay
    selectable by name.
    """
    if heads is not None:
        key_first = [f"key-cascade:{m:g}" for m in CASCADE_MARGINS] if heads.key is not None else []
        return [*(f"heads:{layer}" for layer in range(depth + 1)), "paper-heads",
                *(f"cascade:{m:g}" for m in CASCADE_MARGINS), *key_first]
    return [
        "paper", "paper-all", "knn-vote", "knn-agree", "full",
        *(f"paper-tol:{t}" for t in (0.05, 0.1, 0.2, 0.3)),
        *(f"confidence:{t}" for t in (0.6, 0.7, 0.8, 0.9, 0.95)),
        *(f"static:{layer}" for layer in range(depth + 1)),
    ]


def probs_from_sql(results: Sequence[tuple[str, float, float]], labels: Sequence[str]) -> np.ndarray:
    """[L + 1, C] with each exit's predicted label at its probability and the rest spread evenly.

    The argmax and the max (what exit rules read) are exactly those of the original forward.
    """
    n = len(labels)
    index = {name: i for i, name in enumerate(labels)}
    out = np.zeros((len(results), n))
    for layer, (predicted, p, *_) in enumerate(results):
        out[layer, :] = (1.0 - p) / max(n - 1, 1)
        out[layer, index[predicted]] = p
    return out


def validation_rows(engine: Engine, task: str, n: int, k_max: int, seed: int = 0) -> list[Measured]:
    spec = engine.task_info(task).spec
    examples = engine.metadata.committed_examples(task)
    if len(examples) < MIN_RECORDS:
        raise InvalidInput(f"task {task!r}: {len(examples)} records; auto needs at least {MIN_RECORDS} to choose")
    sample = random.Random(seed).sample(examples, min(n, len(examples)))
    layers = engine.metadata.layer_results([rid for rid, _, _ in sample])
    found, _ = engine.neighbours(task, [text for _, text, _ in sample], 2 * k_max + 1)
    group = dict(zip((rid for rid, _, _ in examples), near_duplicate_groups([text for _, text, _ in examples])))
    heads = engine.heads(task)
    rows = []
    for (rid, text, label), neighbours in zip(sample, found):
        # the record itself and its near-duplicates (the same group the heads' folds keep together)
        others = [nb for nb in neighbours if group.get(nb.id, -1) != group[rid]][:k_max]
        judged = heads.judged(rid) if heads else None  # out of fold: the head never saw this record
        key_judged = heads.key.judged(rid) if heads and heads.key else None
        rows.append(Measured(spec.label_index(label), probs_from_sql(layers[rid], spec.label_names), others,
                             judged, engine.head_judged(others, heads, spec) if heads else None,
                             None if key_judged is None else key_judged[0],
                             heads.covers(text, others) if heads else True))
    if heads is not None and any(r.head_probs is None for r in rows):  # records newer than the heads
        rows = [r for r in rows if r.head_probs is not None]
    return rows


def score(result: PolicyResult, objective: str, n_labels: int) -> float:
    """A policy's validation result under one of OBJECTIVES."""
    if objective == "balanced_accuracy":
        return result.balanced_accuracy(n_labels)
    if objective == "macro_f1":
        return result.macro_f1(n_labels)
    return result.accuracy


def choose(rows: Sequence[Measured], depth: int, labels: Sequence[str], ks: Sequence[int] = K_CHOICES,
           heads: ExitHeads | None = None, objective: str = "balanced_accuracy") -> list[tuple[str, int, float, float]]:
    """(policy, k, score under `objective`, mean exit) for every candidate, best first."""
    scored = []
    heads = heads if rows and rows[0].head_probs is not None else None
    for name in candidate_policies(depth, heads):
        policy = bind(parse_policy(name), heads) if heads is not None else parse_policy(name)
        for k in ks if policy.uses_neighbours else (max(ks),):
            r = run_policy(policy, rows, depth, labels, k)
            scored.append((name, k, score(r, objective, len(labels)), r.mean_exit))
    # Best accuracy; among equals, less depth; then fewer neighbours.
    return sorted(scored, key=lambda s: (-round(s[2], 6), s[3], s[1]))


BAND_SE = 0.5  # the tie band, in standard errors of the best score


def pick(ranked: Sequence[tuple[str, int, float, float]], rows: int, band_se: float = BAND_SE
         ) -> tuple[str, int, float, float]:
    """Among the candidates whose validation score is within `band_se` standard errors of the best
    (on `rows` validation rows), the one with the least mean exit: differences that small are noise
    on a few hundred rows, and depth is compute saved. Half a standard error, not one: with one,
    a candidate 1.6 points worse on 300 rows counted as a tie, and the shallowest such candidate
    was, on dev, up to 3 points worse than the best (SST-2 and AG News, docs/results.md)."""
    best = ranked[0][2]
    band = best - band_se * math.sqrt(max(best * (1 - best), 1e-12) / max(rows, 1))
    return min((r for r in ranked if r[2] >= band), key=lambda r: (r[3], -r[2], r[1]))


def tune(engine: Engine, task: str, validation: int = VALIDATION_ROWS, seed: int = 0) -> Choice:
    return tune_ranked(engine, task, validation, seed)[0]


def tune_report(engine: Engine, task: str, validation: int | None = None, show_all: bool = False) -> dict[str, Any]:
    """Tune, and say how: every candidate (or the best ten) and the choice. `raee-admin tune` prints
    it, locally or as a server's operation."""
    choice, ranked = tune_ranked(engine, task, VALIDATION_ROWS if validation is None else validation)
    objective = engine.task_info(task).spec.objective
    shown = ranked if show_all else ranked[:10]
    return {"candidates": [{"policy": name, "k": k, objective: acc, "mean_exit": mean} for name, k, acc, mean in shown],
            "choice": choice.to_dict()}


def tune_ranked(engine: Engine, task: str, validation: int = VALIDATION_ROWS, seed: int = 0
                ) -> tuple[Choice, list[tuple[str, int, float, float]]]:
    """Choose and store the task's `auto` policy; the choice and every candidate, best first."""
    start = time.perf_counter()
    rows = validation_rows(engine, task, validation, max(K_CHOICES), seed)
    spec = engine.task_info(task).spec
    heads = engine.heads(task)
    ranked = choose(rows, engine.depth, spec.label_names, heads=heads, objective=spec.objective)
    policy, k, accuracy, mean_exit = pick(ranked, len(rows))
    choice = Choice(policy, k, accuracy, mean_exit, len(rows), engine.task_info(task).records,
                    datetime.now(UTC).isoformat(timespec="seconds"), round(time.perf_counter() - start, 2),
                    heads.version if heads else 0, spec.objective)
    engine.metadata.set_tuned(task, choice)
    engine.forget_choice(task)
    return choice, ranked


def needs_tuning(engine: Engine, task: str) -> bool:
    """No choice yet (and enough records to make one), or the database grew past RAEE_RETUNE_GROWTH."""
    info = engine.task_info(task)
    if info.records < MIN_RECORDS:
        return False
    return info.tuned is None or info.tuned.stale(info.records, engine.settings.retune_growth)


KeySource = Callable[[Sequence[str]], Mapping[str, np.ndarray]]  # record ids -> their stored keys


def fit_and_store_heads(metadata: MetadataStore, task: str, progress: Callable[[str], None] | None = None,
                        cancelled: Callable[[], bool] = lambda: False, full: bool = False,
                        keys: KeySource | None = None) -> ExitHeads:
    """Fit the task's exit heads on its records' features and store them as a new version; the
    served heads switch to it at the engine's next check (atomically: one row, one version). A warm
    refit from the newest version where it can (raee_server.core.fitting.fit_heads), unless `full`.
    With `keys` (the vector store's, by record id), the key head and the records' coverage too
    (`fit_with_key`); records without a key then wait for the next fit. Needs only the SQL store
    and the keys, so a server runs it in a separate low-priority process (raee_server.serving.fitter)."""
    info = metadata.task(task)  # read before the records: edits made during the fit count for the next
    spec = info.spec
    metadata.compact_features(task)
    ids, labels, features, codec = metadata.features(task)
    texts = {rid: text for rid, text, _ in metadata.committed_examples(task)}
    stored = None if full else metadata.heads(task)
    previous = ExitHeads.from_stored(stored) if stored else None
    if keys is None:
        heads = fit_heads(features, [spec.label_index(label) for label in labels], len(spec.labels), ids,
                          spec.label_names, groups=near_duplicate_groups([texts.get(rid, rid) for rid in ids]),
                          progress=progress, cancelled=cancelled, previous=previous)
    else:
        found = keys(ids)
        keep = np.array([rid in found for rid in ids], dtype=bool)
        if not keep.all():  # e.g. written to SQL after the keys were read: the next fit takes them
            at = np.flatnonzero(keep)
            ids, labels = [ids[i] for i in at], [labels[i] for i in at]
            features = FeatureMatrix(features.values[at], None if features.scales is None else features.scales[at])
        record_texts = [texts.get(rid, rid) for rid in ids]
        heads = fit_with_key(features, np.stack([found[rid] for rid in ids]) if ids else np.zeros((0, 1)),
                             [spec.label_index(label) for label in labels], len(spec.labels), ids, spec.label_names,
                             near_duplicate_groups(record_texts), np.array([len(t.split()) for t in record_texts]),
                             progress=progress, cancelled=cancelled, previous=previous)
    if codec is not None:  # fit on the codec's coordinates; served on the raw features
        heads = heads.in_raw_space(codec)
    heads.edits = info.edits
    heads.fitted_at = datetime.now(UTC).isoformat(timespec="seconds")
    heads.version = metadata.save_heads(task, heads.summary(), heads.to_bytes())
    return heads


def key_reader(vectors: VectorStore, chunk: int = 1000) -> KeySource:
    """The vector store's keys by record id, read `chunk` ids per call."""
    def read(ids: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for at in range(0, len(ids), chunk):
            out.update(vectors.vectors(ids[at : at + chunk]))
        return out
    return read


def save_keys(vectors: VectorStore, task: str, path: Path) -> int:
    """The task's stored keys into one .npz file (ids and float32 keys) for a fit in another process
    (the embedded store allows one process); returns how many."""
    ids = sorted(vectors.ids(task))
    found = key_reader(vectors)(ids)
    ids = [rid for rid in ids if rid in found]
    np.savez(path, ids=np.array(ids), keys=np.stack([found[rid] for rid in ids]) if ids else np.zeros((0, 0)))
    return len(ids)


def load_keys(path: Path) -> KeySource:
    """`save_keys`' file as a key source."""
    z = np.load(path, allow_pickle=False)
    table = {str(rid): key for rid, key in zip(z["ids"], z["keys"])}
    return lambda ids: {rid: table[rid] for rid in ids if rid in table}


def fit_task_heads(engine: Engine, task: str, progress: Callable[[str], None] | None = None,
                   cancelled: Callable[[], bool] = lambda: False, full: bool = False) -> ExitHeads:
    """`fit_and_store_heads` in this process; the engine serves the new version at once."""
    heads = fit_and_store_heads(engine.metadata, task, progress, cancelled, full, keys=key_reader(engine.vectors))
    engine.forget_heads(task)
    return heads


def needs_heads(engine: Engine, task: str) -> bool:
    """No heads yet (and enough records); or, since the fit, RAEE_HEADS_REFIT_ROWS records were added,
    deleted or relabelled (a warm refit: its cost follows them), or the task grew past
    RAEE_RETUNE_GROWTH. Reads the engine's loaded heads (refreshed per version), not the stored blob."""
    info = engine.task_info(task)
    if info.records < HEADS_MIN_RECORDS:
        return False
    heads = engine.heads(task)
    if heads is None or heads.calibration is None:  # none, or fit before the cascade had a calibration split
        return True
    known, settings = len(heads.record_ids), engine.settings
    changed = max(info.records - known, 0) + info.edits - heads.edits  # added, deleted or relabelled since
    return changed >= settings.heads_refit_rows or info.records > known * (1 + settings.retune_growth)


def maintenance(engine: Engine, task: str) -> Iterator[str]:
    """The one rule after records change, for the server's background loop and a local ingest alike:
    "fit-heads" when the heads are due (not while an ingest is writing), then, checked after the
    caller has done that, "tune" when the `auto` choice is due. Each at most once per call."""
    if needs_heads(engine, task) and not engine.metadata.ingesting(task):
        yield "fit-heads"
    if needs_tuning(engine, task) or needs_tuning_after_heads(engine, task):
        yield "tune"


def due(engine: Engine, task: str) -> bool:
    """Some step of `maintenance` is due now."""
    return next(maintenance(engine, task), None) is not None


def needs_tuning_after_heads(engine: Engine, task: str) -> bool:
    """The stored `auto` choice was made among older exit heads (or none): their policies changed."""
    heads, tuned = engine.heads(task), engine.task_info(task).tuned
    return heads is not None and tuned is not None and tuned.heads_version != heads.version
