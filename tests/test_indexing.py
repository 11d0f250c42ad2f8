"""Index builds of the embedded store: nothing lost, answers unchanged, run where no request waits."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from raee_server.core.engine import Engine
from raee_server.settings import Settings
from raee_server.stores.vectors import EdgeVectorStore, VectorPoint

from .tiny_models import save_tiny_backbone

DIM = 16


def fill(store: EdgeVectorStore, rng: np.random.Generator, n: int, tenants: int, batch: int) -> np.ndarray:
    keys = rng.normal(size=(n, DIM)).astype(np.float32)
    for start in range(0, n, batch):  # many small upserts leave many small segments
        store.upsert([VectorPoint(str(uuid.UUID(int=i + 1)), keys[i], {"task": f"t{i % tenants}", "label": "x"})
                      for i in range(start, min(n, start + batch))])
    return keys


def exact_ids(keys: np.ndarray, alive: np.ndarray, probe: np.ndarray, tenant: int, tenants: int, k: int) -> list[int]:
    members = np.flatnonzero((np.arange(len(keys)) % tenants == tenant) & alive)
    unit = keys[members] / np.linalg.norm(keys[members], axis=1, keepdims=True)
    return members[np.argsort(-(unit @ probe))[:k]].tolist()


def test_optimize_keeps_every_point_and_every_answer(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    store = EdgeVectorStore(tmp_path, "c", DIM)
    keys = fill(store, rng, 3000, tenants=3, batch=200)
    deleted = [str(uuid.UUID(int=i + 1)) for i in range(0, 3000, 7)]
    store.delete_ids(deleted)
    alive = np.ones(3000, dtype=bool)
    alive[::7] = False
    probes = rng.normal(size=(15, DIM)).astype(np.float32)

    def answers(s: EdgeVectorStore) -> list[list[int]]:
        return [[uuid.UUID(n.id).int - 1 for n in s.search(f"t{i % 3}", probes[i : i + 1], 12)[0]]
                for i in range(len(probes))]

    before = answers(store)
    expected = [exact_ids(keys, alive, p / np.linalg.norm(p), i % 3, 3, 12) for i, p in enumerate(probes)]
    assert before == expected
    store.optimize()
    assert answers(store) == expected
    assert [store.count(f"t{t}") for t in range(3)] == [int(((np.arange(3000) % 3 == t) & alive).sum())
                                                       for t in range(3)]
    store.close()
    reopened = EdgeVectorStore(tmp_path, "c", DIM)
    assert answers(reopened) == expected and reopened.count() == int(alive.sum())
    assert reopened.optimize() is False  # nothing left to build
    reopened.close()


def test_a_store_made_before_tenant_graphs_opens_and_converges(tmp_path: Path) -> None:
    """Stores written by earlier releases (default HNSW config) load with the current one."""
    from qdrant_edge import Distance, EdgeConfig, EdgeShard, EdgeVectorParams, KeywordIndexParams, UpdateOperation

    path = tmp_path / "c"
    shard = EdgeShard.create(str(path), EdgeConfig(vectors={"key": EdgeVectorParams(size=DIM,
                                                                                    distance=Distance.Cosine)}))
    shard.update(UpdateOperation.create_field_index("task", KeywordIndexParams(is_tenant=True)))
    shard.close()
    (path / "raee-collection.json").write_text(json.dumps({"dim": DIM, "collection": "c"}))
    store = EdgeVectorStore(tmp_path, "c", DIM)
    keys = fill(store, np.random.default_rng(4), 600, tenants=2, batch=100)
    store.optimize()
    probe = keys[5] / np.linalg.norm(keys[5])
    hits = store.search("t1", probe[None, :], 3)[0]
    assert uuid.UUID(hits[0].id).int - 1 == 5 and hits[0].similarity == pytest.approx(1.0, abs=1e-5)
    store.close()
    saved = json.loads((path / "edge_config.json").read_text())
    hnsw = saved["hnsw_config"]
    assert (hnsw["m"], hnsw["payload_m"], hnsw["full_scan_threshold"]) == (0, 16, 40_000)


def test_the_server_engine_builds_indexes_before_serving_unless_told_not_to(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = EdgeVectorStore.optimize
    monkeypatch.setattr(EdgeVectorStore, "optimize", lambda self: calls.append(self.count()) or real(self))
    settings = Settings(data_dir=tmp_path / "data", backbone=str(save_tiny_backbone(tmp_path / "m")),
                        encoder="hashing:32")
    Engine.open_for_serving(settings).close()
    assert calls == [0]
    Engine.open_for_serving(settings.model_copy(update={"index_on_start": False})).close()
    Engine.open(settings).close()  # plain opens (admin commands, tests) never build
    assert calls == [0]
