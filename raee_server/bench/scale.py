"""Scale benchmark of the vector store: tenant-filtered top-k queries as the store grows.

The store grows step by step with keys spread over several tenants (exit payloads of realistic
size). At each size the same kind of queries are timed twice: on the segments as ingest leaves
them, then after the index build (`VectorStore.optimize()`), with recall@k of both against exact
neighbours computed here in numpy, not by the store. Disk size and memory are reported too; a
fresh process opening the finished store gives the memory a server would hold.

Keys are clustered by default (a mixture of Gaussians, like sentence embeddings); uniformly
random 384-d keys are the known worst case of graph indexes (`keys="uniform"` shows it).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from tqdm import tqdm

from raee_server.errors import InvalidInput, NotReady
from raee_server.stores.vectors import EdgeVectorStore, QdrantServerStore, VectorPoint, VectorStore

KEY_KINDS = ("clustered", "uniform")


class KeyGenerator:
    """Synthetic unit keys: clustered around `clusters` random centres, or uniform on the sphere."""

    def __init__(self, kind: str, dim: int, seed: int, clusters: int = 2000, spread: float = 0.8) -> None:
        if kind not in KEY_KINDS:
            raise InvalidInput(f"keys: expected one of {', '.join(KEY_KINDS)}, got {kind!r}")
        self.kind, self.dim, self.spread = kind, dim, spread
        self.rng = np.random.default_rng(seed)
        self.centres = self.rng.standard_normal((clusters, dim), dtype=np.float32)

    def __call__(self, n: int) -> np.ndarray:
        v = self.rng.standard_normal((n, self.dim), dtype=np.float32)
        if self.kind == "clustered":
            v = self.centres[self.rng.integers(0, len(self.centres), n)] + self.spread * v
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    probes = __call__


class KeyPool:
    """Real keys (e.g. the service's encoder on labelled texts), shuffled; the last `held_out` rows
    are never inserted and serve as queries."""

    def __init__(self, keys: np.ndarray, held_out: int, seed: int = 0) -> None:
        if len(keys) <= held_out:
            raise InvalidInput(f"keys: {len(keys)} real keys, but {held_out} are held out as queries")
        keys = keys[np.random.default_rng(seed).permutation(len(keys))].astype(np.float32)
        self.pool = keys / np.linalg.norm(keys, axis=1, keepdims=True)
        self.dim = self.pool.shape[1]
        self.capacity = len(keys) - held_out
        self._next = 0

    def __call__(self, n: int) -> np.ndarray:
        self._next += n
        return self.pool[self._next - n : self._next]

    def probes(self, n: int) -> np.ndarray:
        return self.pool[self.capacity : self.capacity + n]


class _ScratchServerStore(QdrantServerStore):
    """A throwaway collection on a Qdrant server: `optimize` waits for its background indexing."""

    def optimize(self, timeout: float = 3600.0) -> bool:
        from qdrant_client import models

        deadline = time.monotonic() + timeout
        while self.client.get_collection(self.collection).status != models.CollectionStatus.GREEN:
            if time.monotonic() > deadline:
                raise NotReady(f"collection {self.collection}: still indexing after {timeout:.0f} s")
            time.sleep(0.2)
        return True

    def close(self) -> None:
        self.client.delete_collection(self.collection)
        super().close()


def server_store_factory(url: str, dim: int = 384) -> Callable[[Path], VectorStore]:
    return lambda _root: _ScratchServerStore(url, f"raee-scale-{uuid.uuid4().hex[:8]}", dim)


def _disk_mb(root: Path) -> float:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20


def _percentiles(ms: list[float]) -> dict[str, float]:
    return {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)}


def _measure(store: VectorStore, keys: np.ndarray, tenant_of: np.ndarray, probes: np.ndarray,
             tenants: int, k: int, recall_queries: int, desc: str) -> dict[str, float]:
    """Time one query at a time (as the server sends them), then check recall against numpy
    (after the timed loop, so the exact search never competes with the timed queries)."""
    latencies, answers = [], []
    for i in tqdm(range(len(probes)), desc=desc, file=sys.stderr, leave=False):
        t0 = time.perf_counter()
        hits = store.search(f"t{i % tenants}", probes[i : i + 1], k)[0]
        latencies.append((time.perf_counter() - t0) * 1e3)
        if i < recall_queries:
            answers.append({uuid.UUID(h.id).int - 1 for h in hits})
    recalls = []
    for i, found in enumerate(answers):
        members = np.flatnonzero(tenant_of == i % tenants)
        exact = members[np.argsort(-(keys[members] @ probes[i]))[:k]]
        recalls.append(len(found & set(exact.tolist())) / k)
    return {**_percentiles(latencies), "recall": float(np.mean(recalls))}


def scale(sizes: Sequence[int], tenants: int = 10, dim: int = 384, k: int = 12, queries: int = 1000,
          recall_queries: int = 200, keys: str | np.ndarray = "clustered", seed: int = 0,
          directory: Path | None = None,
          store_factory: Callable[[Path], VectorStore] | None = None) -> list[dict[str, Any]]:
    """Grow one store to each size in turn; per size: insert time, query latency before and after
    the index build, the build's time, and recall@k. `keys` names a synthetic kind or holds real
    keys (see KeyPool). `store_factory` defaults to the embedded store."""
    make_keys = KeyPool(keys, queries, seed) if isinstance(keys, np.ndarray) else KeyGenerator(keys, dim, seed)
    dim = make_keys.dim
    total = max(sizes)
    if isinstance(make_keys, KeyPool) and total > make_keys.capacity:
        raise InvalidInput(f"size: {total:,} records asked for, but only {make_keys.capacity:,} real keys can be "
                         f"inserted ({len(make_keys.pool):,} minus {queries:,} held out as queries)")
    all_keys = np.empty((total, dim), dtype=np.float32)
    tenant_of = np.arange(total) % tenants
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        store = (store_factory or (lambda root: EdgeVectorStore(root, "scale", dim)))(Path(tmp))
        have = 0
        for size in sorted(sizes):
            start = time.perf_counter()
            with tqdm(total=size - have, desc=f"upsert to {size:,}", unit="pt", file=sys.stderr, leave=False) as bar:
                while have < size:
                    n = min(10_000, size - have)
                    all_keys[have : have + n] = make_keys(n)
                    store.upsert([
                        VectorPoint(str(uuid.UUID(int=i + 1)), all_keys[i],
                                    {"task": f"t{tenant_of[i]}", "label": "x",
                                     "exit_layers": [0, 5, 13], "exit_probs": [0.91, 0.95, 0.99]})
                        for i in range(have, have + n)])
                    have += n
                    bar.update(n)
            upsert_s = time.perf_counter() - start
            probes = make_keys.probes(queries)
            measured: dict[str, Any] = dict(keys=all_keys[:size], tenant_of=tenant_of[:size], probes=probes,
                                            tenants=tenants, k=k, recall_queries=recall_queries)
            scan = _measure(store, desc=f"scan at {size:,}", **measured)
            start = time.perf_counter()
            store.optimize()
            index_s = time.perf_counter() - start
            indexed = _measure(store, desc=f"indexed at {size:,}", **measured)
            results.append({"records": size, "per_tenant": size // tenants, "upsert_seconds": upsert_s,
                            "upsert_per_second": (size - (results[-1]["records"] if results else 0)) / upsert_s,
                            "index_seconds": index_s, "scan": scan, "indexed": indexed,
                            "disk_mb": _disk_mb(Path(tmp)),
                            # this process holds the store and a copy of every key (for recall)
                            "rss_mb": psutil.Process().memory_info().rss / 2**20,
                            "harness_keys_mb": all_keys[:size].nbytes / 2**20})
        store.close()
        if store_factory is None:
            results[-1]["serving_rss_mb"] = _serving_rss_mb(Path(tmp), dim, tenants, k)
    return results


# Run in a fresh interpreter: what a server opening the finished store holds, free of the harness.
_SERVE_PROBE = """
import sys
from pathlib import Path

import numpy as np
import psutil

from raee_server.stores.vectors import EdgeVectorStore

root, dim, tenants, k = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
before = psutil.Process().memory_info().rss
store = EdgeVectorStore(root, "scale", dim)
for i, probe in enumerate(np.random.default_rng(1).standard_normal((500, dim)).astype(np.float32)):
    store.search(f"t{i % tenants}", probe[None, :], k)
print(before / 2**20, psutil.Process().memory_info().rss / 2**20)
"""


def _serving_rss_mb(root: Path, dim: int, tenants: int, k: int) -> dict[str, float]:
    """RSS of a fresh process before and after it opens the store and answers 500 queries."""
    done = subprocess.run([sys.executable, "-c", _SERVE_PROBE, str(root), str(dim), str(tenants), str(k)],
                          check=True, capture_output=True, text=True)
    before, after = map(float, done.stdout.split())
    return {"before_open": before, "after_500_queries": after}


def table(results: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table (one row per size)."""
    lines = ["| records | per tenant | insert | index build | before build p50 / p99 | recall "
             "| after build p50 / p95 / p99 | recall | on disk | process RSS (of it, harness keys) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s, i = r["scan"], r["indexed"]
        lines.append(
            f"| {r['records']:,} | {r['per_tenant']:,} | {r['upsert_per_second']:,.0f} pt/s "
            f"| {r['index_seconds']:.1f} s | {s['p50_ms']:.2f} / {s['p99_ms']:.2f} ms | {s['recall']:.3f} "
            f"| {i['p50_ms']:.2f} / {i['p95_ms']:.2f} / {i['p99_ms']:.2f} ms | {i['recall']:.3f} "
            f"| {r['disk_mb']:,.0f} MB | {r['rss_mb']:,.0f} MB ({r['harness_keys_mb']:,.0f} MB) |")
    serving = results[-1].get("serving_rss_mb") if results else None
    if serving:
        lines.append(f"\nA fresh process opening the {results[-1]['records']:,}-record store and answering 500 "
                     f"queries: RSS {serving['after_500_queries']:,.0f} MB ({serving['before_open']:,.0f} MB "
                     "before opening it).")
    return "\n".join(lines)


def plot(results: Sequence[dict[str, Any]], path: Path, target_ms: float = 10.0) -> None:
    """p50 and p99 against store size, before and after the index build, with the target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["records"] for r in results]
    fig, ax = plt.subplots(figsize=(7, 4))
    for phase, colour, name in (("scan", "tab:orange", "before index build"),
                                ("indexed", "tab:blue", "after index build")):
        for q, style in (("p50", "--"), ("p99", "-")):
            ax.plot(sizes, [r[phase][f"{q}_ms"] for r in results], style, marker="o", color=colour,
                    label=f"{name}, {q}")
    ax.axhline(target_ms, color="grey", linestyle=":", label=f"target p99 {target_ms:g} ms")
    ax.set(title="tenant-filtered top-12 query latency, embedded store", xlabel="records (all tenants)",
           ylabel="latency (ms)")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [f"{n:,}" for n in sizes], minor=False)
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
