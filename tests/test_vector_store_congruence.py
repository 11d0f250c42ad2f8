"""One suite, every vector store: the same calls on Edge, qdrant-client's in-memory mode and a real
Qdrant server (RAEE_TEST_QDRANT_URL, or testcontainers when a Docker daemon answers) give the same answers."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from raee_server.stores.vectors import EdgeVectorStore, QdrantServerStore, VectorPoint, VectorStore

from .databases import docker_available

DIM = 16


def qdrant_server_url() -> str | None:
    url = os.environ.get("RAEE_TEST_QDRANT_URL")
    if url or not docker_available():
        return url
    from testcontainers.qdrant import QdrantContainer

    container = QdrantContainer("qdrant/qdrant:latest")
    container.start()
    import atexit

    atexit.register(container.stop)
    return f"http://{container.get_container_host_ip()}:{container.exposed_rest_port}"


def make_store(kind: str, tmp_path: Path) -> VectorStore:
    collection = f"congruence_{uuid.uuid4().hex[:8]}"
    if kind == "edge":
        return EdgeVectorStore(tmp_path / "qdrant", collection, DIM)
    if kind == "memory":
        return QdrantServerStore(":memory:", collection, DIM)
    url = qdrant_server_url()
    if url is None:
        pytest.skip("no Qdrant server: set RAEE_TEST_QDRANT_URL or run a Docker daemon")
    return QdrantServerStore(url, collection, DIM)


def points(rng: np.random.Generator, task: str, n: int) -> list[VectorPoint]:
    out = []
    for i in range(n):
        layers = sorted(rng.choice(19, size=int(rng.integers(0, 5)), replace=False).tolist())
        out.append(VectorPoint(
            id=str(uuid.uuid5(uuid.NAMESPACE_OID, f"{task}-{i}")),
            vector=rng.normal(size=DIM).astype(np.float32),
            payload={"task": task, "label": f"l{i % 3}", "exit_layers": layers,
                     "exit_probs": [round(float(p), 6) for p in rng.uniform(0.5, 1, len(layers))]},
        ))
    return out


def script(store: VectorStore) -> dict[str, Any]:
    """Every call the service makes, recorded as plain data."""
    rng = np.random.default_rng(7)
    a, b = points(rng, "alpha", 60), points(rng, "beta", 40)
    store.upsert(a[:30])
    store.upsert(a[20:] + b)  # overlapping upsert: ids are idempotent
    queries = rng.normal(size=(5, DIM)).astype(np.float32)
    out: dict[str, Any] = {
        "count": (store.count(), store.count("alpha"), store.count("beta"), store.count("gamma")),
        "search_alpha": [[(n.id, round(n.similarity, 4), n.label, n.exits) for n in hits]
                         for hits in store.search("alpha", queries, 7)],
        "search_beta": [[n.id for n in hits] for hits in store.search("beta", queries, 50)],
        "search_empty_tenant": store.search("gamma", queries, 3),
        "existing": sorted(store.existing([a[0].id, b[0].id, str(uuid.uuid4())])),
        "ids_beta": sorted(store.ids("beta")),
    }
    store.delete_ids([a[0].id, a[1].id])
    store.delete_task("beta")
    out["after_delete"] = (store.count(), store.count("alpha"), store.count("beta"), sorted(store.ids("beta")))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    store = make_store("edge", tmp_path_factory.mktemp("ref"))
    try:
        return script(store)
    finally:
        store.close()


def test_reference_is_meaningful(reference: dict[str, Any]) -> None:
    assert reference["count"] == (100, 60, 40, 0)
    assert all(len(hits) == 7 for hits in reference["search_alpha"])
    assert all(len(hits) == 40 for hits in reference["search_beta"])  # only beta's records, never alpha's
    assert reference["search_empty_tenant"] == [[], [], [], [], []]
    assert reference["after_delete"] == (58, 58, 0, [])


@pytest.mark.parametrize("kind", ["memory", "server"])
def test_same_answers_as_edge(kind: str, tmp_path: Path, reference: dict[str, Any]) -> None:
    store = make_store(kind, tmp_path)
    try:
        got = script(store)
    finally:
        store.close()
    assert got == reference
