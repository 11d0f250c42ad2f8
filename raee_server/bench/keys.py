"""Key encoder runtimes side by side (`raee-admin bench-keys`).

The key is the first stage of every early-exit answer, and with early exits the largest. One run
times each runtime on the same texts, alternating between them text by text so that a busy moment
of the machine falls on both: one text per call (what a lone Classify pays) and batches of 16
(what the server's dynamic batches pay), with the largest difference between their keys.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raee_server.bench import reports
from raee_server.models.encoders import KeyEncoder

BATCH = 16


def _timed(encoder: KeyEncoder, texts: Sequence[str]) -> float:
    start = time.perf_counter()
    encoder.encode(texts)
    return time.perf_counter() - start


def compare(encoders: dict[str, KeyEncoder], texts: Sequence[str],
            progress: Callable[[str], None]) -> dict[str, Any]:
    names = list(encoders)
    for encoder in encoders.values():  # warm up: first calls allocate
        encoder.encode(texts[:BATCH])
    progress(f"{len(texts)} texts one at a time, alternating {', '.join(names)}")
    single: dict[str, list[float]] = {name: [] for name in names}
    for i, text in enumerate(texts):
        for name in names if i % 2 == 0 else reversed(names):
            single[name].append(_timed(encoders[name], [text]))
    progress(f"{len(texts)} texts in batches of {BATCH}")
    batched = {name: 0.0 for name in names}
    for start in range(0, len(texts), BATCH):
        for name in names if (start // BATCH) % 2 == 0 else reversed(names):
            batched[name] += _timed(encoders[name], texts[start : start + BATCH])
    keys = {name: encoders[name].encode(texts) for name in names}
    reference = keys[names[0]]
    return {
        "texts": len(texts),
        "runtimes": {
            name: {
                "single_p50_ms": 1e3 * float(np.percentile(single[name], 50)),
                "single_p90_ms": 1e3 * float(np.percentile(single[name], 90)),
                "batched_texts_per_second": len(texts) / batched[name],
                "max_key_difference": float(np.abs(keys[name] - reference).max()),
            }
            for name in names
        },
        "reference": names[0],
    }


def write(report: dict[str, Any], out: Path, command: str) -> list[Path]:
    runtimes = report["runtimes"]
    body = [f"{report['texts']} texts, alternating runtimes text by text.", "",
            f"| runtime | one text: p50 | p90 | batches of {BATCH}: texts/s | max key difference from "
            f"{report['reference']} |", "|---|---|---|---|---|"]
    for name, r in runtimes.items():
        body.append(f"| {name} | {r['single_p50_ms']:.2f} ms | {r['single_p90_ms']:.2f} ms | "
                    f"{r['batched_texts_per_second']:.0f} | {r['max_key_difference']:.1e} |")
    written = reports.save(out, "keys", report, command, "Key encoder runtimes (`raee-admin bench-keys`)", body)
    fig, (left, right) = reports.pyplot().subplots(1, 2, figsize=(8, 3.5))
    names = list(runtimes)
    left.bar(names, [runtimes[n]["single_p50_ms"] for n in names], color="tab:blue")
    left.set_ylabel("ms per text (p50)")
    left.set_title("one text per call")
    right.bar(names, [runtimes[n]["batched_texts_per_second"] for n in names], color="tab:green")
    right.set_ylabel("texts per second")
    right.set_title(f"batches of {BATCH}")
    return [*written, reports.save_figure(fig, out / "keys.png")]
