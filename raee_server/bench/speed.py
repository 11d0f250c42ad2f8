"""Ingest speed against what the machine can do (`raee-admin bench-speed`).

In one run, for each task: the same rows ingested into fresh stores with the previous code path
(rows in file order, 32 per batch) and the current one (rows batched by token count), the
records of the two compared exit by exit, and the backbone's FLOPs per row set against the
machine's own fp32 matrix-multiply rate, measured in the same run. Both paths share the loaded
models, so only the batching differs.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raee_server.bench import reports
from raee_server.core.datafile import read_rows
from raee_server.core.engine import Engine
from raee_server.models.hardware import bfloat16_units
from raee_server.stores.metadata import MetadataStore
from raee_server.stores.vectors import EdgeVectorStore, collection_name
from raee_server.types import Row, TaskSpec

# The two paths: before this bench existed (file order, 32 rows at a time) and now.
PATHS = {"file order": {"ingest_sort_by_length": False, "ingest_batch_size": 32},
         "by length": {"ingest_sort_by_length": True, "ingest_batch_size": 128}}


def machine_gflops(size: int = 1024, seconds: float = 3.0, dtype: torch.dtype = torch.float32) -> float:
    """Matrix-multiply rate of this machine with torch's threads, GFLOP/s (best of the run)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm up
    best = 0.0
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - t0) / 1e9)
    return best


def flops_per_row(engine: Engine, tokens: int) -> float:
    """Forward FLOPs of one prompt of `tokens` tokens through every layer: 2 per weight of the layer
    stack per token (the matrix multiplies), plus attention's scores and weighted sum, 4·t²·d per
    layer. Embeddings are a lookup; the label words' head is a few rows, left out."""
    layers = engine.backbone.layers
    weights = sum(p.numel() for p in layers.parameters())
    config: Any = getattr(engine.backbone.model, "config", None)  # a transformers config (torch types it oddly)
    config = getattr(config, "text_config", config)
    heads = int(config.num_attention_heads)
    width = heads * int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return float(2.0 * weights * tokens + 4.0 * len(layers) * tokens**2 * width)


@dataclass
class PathResult:
    rows: int
    seconds: float
    added: int

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds


def _fresh_engine(base: Engine, where: Path, overrides: dict[str, Any]) -> Engine:
    settings = base.settings.model_copy(update={"data_dir": where, "database_url": None, **overrides})
    where.mkdir(parents=True, exist_ok=True)
    vectors = EdgeVectorStore(where / "qdrant", collection_name(base.backbone.model_id, base.encoder.model_id),
                              base.encoder.dim)
    return Engine(base.backbone, base.encoder, vectors, MetadataStore(settings.sql_url), settings)


def _records(engine: Engine, task: str) -> dict[str, list[tuple[str, float, float]]]:
    ids = [rid for rid, _, _ in engine.metadata.committed_examples(task)]
    return engine.metadata.layer_results(ids)


def compare_records(a: dict[str, list[tuple[str, float, float]]],
                    b: dict[str, list[tuple[str, float, float]]]) -> dict[str, Any]:
    """Same record ids, the same prediction at every exit, probabilities within 1e-4."""
    same_ids = set(a) == set(b)
    worst, flipped = 0.0, 0
    for rid in set(a) & set(b):
        for (pa, qa, ga), (pb, qb, gb) in zip(a[rid], b[rid]):
            worst = max(worst, abs(qa - qb), abs(ga - gb))
            flipped += pa != pb
    return {"same_ids": same_ids, "records": len(a), "max_probability_difference": worst,
            "predictions_that_differ": flipped, "identical": same_ids and flipped == 0 and worst <= 1e-4}


def bench_task(base: Engine, spec: TaskSpec, data: Path, rows: int, out: Path,
               progress: Callable[[str], None]) -> dict[str, Any]:
    items = [r for r in itertools.islice(read_rows(data), rows) if isinstance(r, Row)]
    prompts = [base._prompt(spec, r.text) for r in items]
    tokens = base.backbone.token_counts(prompts)
    flops = sum(flops_per_row(base, t) for t in tokens)
    results: dict[str, PathResult] = {}
    snapshots = {}
    for name, overrides in PATHS.items():
        engine = _fresh_engine(base, out / "data" / f"{spec.name}-{name.replace(' ', '-')}", overrides)
        engine.create_task(spec)
        progress(f"{spec.name}: {len(items)} rows, {name}")
        start = time.perf_counter()
        report = engine.ingest(spec.name, items, source=str(data))
        results[name] = PathResult(len(items), time.perf_counter() - start, report.added)
        snapshots[name] = _records(engine, spec.name)
        engine.vectors.close()
        engine.metadata.close()
    before, after = results["file order"], results["by length"]
    return {
        "task": spec.name, "rows": len(items), "tokens_mean": float(np.mean(tokens)),
        "tokens_max": int(max(tokens)), "gflop_per_row": flops / len(items) / 1e9,
        "paths": {name: {"seconds": r.seconds, "rows_per_second": r.rows_per_second,
                         "achieved_gflops": flops / r.seconds / 1e9, "added": r.added}
                  for name, r in results.items()},
        "speedup": after.rows_per_second / before.rows_per_second,
        "records": compare_records(snapshots["file order"], snapshots["by length"]),
    }


def write(report: dict[str, Any], out: Path, command: str) -> list[Path]:
    machine = report["machine_gflops"]
    lines = [f"This machine's fp32 matrix multiply, measured in the same run: {machine:.1f} GFLOP/s "
             f"({report['threads']} torch threads). A 512-wide multiply in the same run: "
             + ", ".join(f"{name} {g:.1f} GFLOP/s" for name, g in report["matmul_512_gflops"].items())
             + f" (native bfloat16 units: {', '.join(report['bfloat16_units']) or 'none'}).", "",
             "| task | rows | tokens (mean / max) | GFLOP per row | path | rows/s | achieved GFLOP/s | % of the "
             "machine | speed-up | records identical |", "|---|---|---|---|---|---|---|---|---|---|"]
    for t in report["tasks"]:
        for name, p in t["paths"].items():
            lines.append(f"| {t['task']} | {t['rows']} | {t['tokens_mean']:.1f} / {t['tokens_max']} | "
                         f"{t['gflop_per_row']:.2f} | {name} | {p['rows_per_second']:.1f} | "
                         f"{p['achieved_gflops']:.1f} | {100 * p['achieved_gflops'] / machine:.0f} % | "
                         + (f"{t['speedup']:.2f}x | " if name == "by length" else "| ")
                         + (("yes" if t["records"]["identical"] else
                             f"no ({t['records']['predictions_that_differ']} predictions differ, max "
                             f"probability difference {t['records']['max_probability_difference']:.1e})")
                            if name == "by length" else "") + " |")
    written = reports.save(out, "speed", report, command, "Ingest speed (`raee-admin bench-speed`)", lines)
    fig, ax = reports.pyplot().subplots(figsize=(7, 4))
    tasks = [t["task"] for t in report["tasks"]]
    width = 0.38
    for j, name in enumerate(PATHS):
        ax.bar([i + j * width for i in range(len(tasks))],
               [t["paths"][name]["rows_per_second"] for t in report["tasks"]], width, label=name)
    ax.set_xticks([i + width / 2 for i in range(len(tasks))], tasks)
    ax.set_ylabel("rows ingested per second")
    ax.set_title(f"Ingest, file order vs batched by length (machine: {machine:.0f} GFLOP/s fp32)")
    ax.legend()
    return [*written, reports.save_figure(fig, out / "speed.png")]


def run(base: Engine, tasks: Sequence[tuple[TaskSpec, Path, int]], out: Path,
        progress: Callable[[str], None]) -> dict[str, Any]:
    progress("measuring this machine's fp32 matrix multiply")
    machine = machine_gflops()
    # float32 beside bfloat16 on the same 512-wide multiply (small: emulated bfloat16 is ~70x slower)
    peaks = {name: machine_gflops(512, 1.5, dtype) for name, dtype in (("float32", torch.float32),
                                                                        ("bfloat16", torch.bfloat16))}
    done = [bench_task(base, spec, data, rows, out, progress) for spec, data, rows in tasks]
    return {"machine_gflops": machine, "threads": torch.get_num_threads(), "tasks": done,
            "matmul_512_gflops": peaks, "bfloat16_units": bfloat16_units()}
