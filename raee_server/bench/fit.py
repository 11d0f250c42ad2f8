"""The exit heads' fit at scale (`raee-admin bench-fit`): time and peak memory of a full fit, then of
a warm refit after growth, at each size, on synthetic codes of the real shape (no forward).

Each size runs in a fresh child process, so its peak resident memory (ru_maxrss) is its own: the
codes, the fit, and the heads' stored form, everything the server's background fitter holds.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raee_server.bench import reports
from raee_server.core.fitting import fit_heads
from raee_server.stores.codec import FeatureMatrix


def synthetic(n: int, exits: int, dim: int, labels: int, seed: int) -> tuple[FeatureMatrix, np.ndarray]:
    """Codes as a task's store holds them (int8 [n, exits, dim], float16 scales), with a label signal
    that grows with the exit, so the fit has something to find."""
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, labels, n)
    codes = np.empty((n, exits, dim), dtype=np.int8)
    centres = (rng.normal(size=(exits, labels, dim)) * np.linspace(0, 4, exits)[:, None, None]).astype(np.float32)
    for i in range(0, n, 4096):  # in small chunks: the generator must not set the process's peak memory
        signal = centres[:, gold[i : i + 4096]].transpose(1, 0, 2)  # ~75 % accuracy at the last exit
        part = rng.standard_normal(size=signal.shape, dtype=np.float32) * 40 + signal
        codes[i : i + len(part)] = np.clip(np.rint(part), -127, 127)
    scales = np.full((n, exits), 1 / 40, dtype=np.float16)
    return FeatureMatrix(codes, scales), gold


def _measure(n: int, added: int, exits: int, dim: int, labels: int, out: Any) -> None:
    features, gold = synthetic(n + added, exits, dim, labels, seed=n)
    ids = [f"{i:012d}" for i in range(n + added)]
    names = [f"l{i}" for i in range(labels)]
    first = FeatureMatrix(features.values[:n], None if features.scales is None else features.scales[:n])
    t0 = time.perf_counter()
    heads = fit_heads(first, gold[:n], labels, ids[:n], names)
    full = time.perf_counter() - t0
    stored = len(heads.to_bytes())
    heads.version = 1
    t0 = time.perf_counter()
    grown = fit_heads(features, gold, labels, ids, names, previous=heads)
    warm = time.perf_counter() - t0
    out.put({"records": n, "added": added, "full_fit_s": round(full, 1), "warm_refit_s": round(warm, 1),
             "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
             "codes_gb": round((features.values.nbytes + features.scales.nbytes) / 2**30, 2)
             if features.scales is not None else 0.0,
             "heads_mb": round(stored / 2**20, 1), "warm_was_warm": grown.space is not None
             and grown.space.full_fit_records == n, "best_exit": heads.best_exit,
             "best_accuracy": round(float(heads.balanced_accuracy[heads.best_exit]), 4)})


def run(sizes: Sequence[int], added: int, exits: int, dim: int, labels: int,
        progress: Callable[[str], None]) -> dict[str, Any]:
    rows = []
    context = multiprocessing.get_context("spawn")
    for n in sizes:
        queue = context.Queue()
        child = context.Process(target=_measure, args=(n, added, exits, dim, labels, queue))
        child.start()
        row = queue.get()
        child.join()
        progress(json.dumps(row))
        rows.append(row)
    return {"exits": exits, "dim": dim, "labels": labels, "rows": rows}


def write(report: dict[str, Any], out: Path, command: str) -> list[Path]:
    body = [f"Synthetic codes, {report['exits']} exits x {report['dim']} coordinates, {report['labels']} labels; "
            "each size in its own process (peak RSS is that process's).", "",
            "| records | full fit | warm refit (+added) | peak RSS | codes in memory | stored heads |",
            "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        body.append(f"| {r['records']:,} | {r['full_fit_s']} s | {r['warm_refit_s']} s (+{r['added']:,}) | "
                    f"{r['peak_rss_gb']} GB | {r['codes_gb']} GB | {r['heads_mb']} MB |")
    plt = reports.pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    n = [r["records"] for r in report["rows"]]
    left.plot(n, [r["full_fit_s"] for r in report["rows"]], "o-", label="full fit")
    left.plot(n, [r["warm_refit_s"] for r in report["rows"]], "o-", label="warm refit")
    left.set(xscale="log", yscale="log", xlabel="records", ylabel="seconds")
    left.legend()
    right.plot(n, [r["peak_rss_gb"] for r in report["rows"]], "o-")
    right.set(xscale="log", xlabel="records", ylabel="peak RSS (GB)")
    paths = reports.save(out, "fit", report, command, "The exit heads' fit at scale", body)
    return [*paths, reports.save_figure(fig, out / "fit.png")]
