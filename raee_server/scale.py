"""Scale benchmark of the embedded vector store: tenant-filtered top-k query latency as it grows.

Synthetic unit vectors (the key dimension of MiniLM) spread over several tenants, exit payloads
of realistic size; the store grows step by step and each step is measured with the same queries.
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .vector_store import EdgeVectorStore, VectorPoint


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def scale(sizes: Sequence[int], tenants: int = 10, dim: int = 384, k: int = 12, queries: int = 1000,
          directory: Path | None = None, seed: int = 0, optimize: bool = True) -> list[dict[str, float]]:
    rng = np.random.default_rng(seed)
    results = []
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        store = EdgeVectorStore(Path(tmp), "scale", dim)
        have = 0
        for size in sorted(sizes):
            start = time.perf_counter()
            with tqdm(total=size - have, desc=f"upsert to {size:,}", unit="pt", file=sys.stderr, leave=False) as bar:
                while have < size:
                    n = min(10_000, size - have)
                    vectors = _unit(rng, n, dim)
                    store.upsert([
                        VectorPoint(str(uuid.UUID(int=have + i + 1)), vectors[i],
                                    {"task": f"t{(have + i) % tenants}", "label": "x",
                                     "exit_layers": [0, 5, 13], "exit_probs": [0.91, 0.95, 0.99]})
                        for i in range(n)])
                    have += n
                    bar.update(n)
            upsert_s = time.perf_counter() - start
            start = time.perf_counter()
            if optimize:
                store.optimize()
            optimize_s = time.perf_counter() - start
            probes = _unit(rng, queries, dim)
            latencies = []
            for i in tqdm(range(queries), desc=f"query at {size:,}", file=sys.stderr, leave=False):
                t0 = time.perf_counter()
                hits = store.search(f"t{i % tenants}", probes[i : i + 1], k)
                latencies.append((time.perf_counter() - t0) * 1e3)
                assert len(hits[0]) == k
            ms = np.array(latencies)
            results.append({"records": size, "per_tenant": size // tenants, "upsert_seconds": upsert_s,
                            "optimize_seconds": optimize_s,
                            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                            "p99_ms": float(np.percentile(ms, 99))})
        store.close()
    return results
