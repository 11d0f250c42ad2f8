"""Vector stores for exit records: one interface, the embedded Qdrant Edge engine as the default.

The hot path reads only this store: each point carries the exit information a
query needs in its payload. Every query filters on the `task` tenant field.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import NotReady, StoreMismatch
from .policies import Neighbour

VECTOR_NAME = "key"
TENANT_FIELD = "task"


@dataclass(frozen=True)
class VectorPoint:
    id: str
    vector: np.ndarray
    payload: dict[str, Any]


class VectorStore(Protocol):
    collection: str
    dim: int

    def upsert(self, points: Sequence[VectorPoint]) -> None: ...
    def search(self, task: str, vectors: np.ndarray, k: int) -> list[list[Neighbour]]: ...
    def count(self, task: str | None = None) -> int: ...
    def existing(self, ids: Sequence[str]) -> set[str]: ...
    def delete_task(self, task: str) -> None: ...
    def close(self) -> None: ...


def collection_name(backbone_id: str, encoder_id: str) -> str:
    """One collection per (backbone, encoder) pair: records from different models never mix."""
    slug = lambda s: re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-").lower()  # noqa: E731
    return f"raee__{slug(backbone_id)}__{slug(encoder_id)}"


def to_neighbour(point_id: object, score: float, payload: dict[str, Any] | None) -> Neighbour:
    payload = payload or {}
    layers = payload.get("exit_layers") or []
    probs = payload.get("exit_probs") or []
    return Neighbour(
        id=str(point_id),
        similarity=float(score),
        label=str(payload.get("label", "")),
        exits=tuple((int(l), float(p)) for l, p in zip(layers, probs)),
    )


class EdgeVectorStore:
    """Qdrant Edge: the Qdrant engine in-process, one shard directory per collection.

    Only one process may open a shard; a second gets a clear error naming the directory.
    Calls are serialised by a lock because the server's worker and ingest share one shard.
    """

    def __init__(self, root: Path, collection: str, dim: int) -> None:
        from qdrant_edge import Distance, EdgeConfig, EdgeShard, EdgeVectorParams, KeywordIndexParams, UpdateOperation

        self.collection = collection
        self.dim = dim
        self.path = root / collection
        self._lock = threading.Lock()
        meta_file = self.path / "raee-collection.json"
        config = EdgeConfig(vectors={VECTOR_NAME: EdgeVectorParams(size=dim, distance=Distance.Cosine)})
        try:
            if meta_file.exists():
                meta = json.loads(meta_file.read_text())
                if meta.get("dim") != dim:
                    raise StoreMismatch(
                        f"{self.path}: built with {meta.get('dim')}-d keys, the encoder gives {dim}-d"
                    )
                self._shard = EdgeShard.load(str(self.path))
            else:
                if self.path.exists() and any(self.path.iterdir()):
                    raise StoreMismatch(
                        f"{self.path}: holds files but no raee-collection.json; a partly written "
                        "store? Move it away to rebuild, or restore it from a backup"
                    )
                self._shard = EdgeShard.create(str(self.path), config)
                self._shard.update(
                    UpdateOperation.create_field_index(TENANT_FIELD, KeywordIndexParams(is_tenant=True))
                )
                self._shard.flush()
                meta_file.write_text(json.dumps({"dim": dim, "collection": collection}))
        except (StoreMismatch, NotReady):
            raise
        except Exception as exc:  # the Edge bindings raise plain exceptions
            if "WouldBlock" in str(exc) or "lock" in str(exc).lower():
                raise NotReady(
                    f"{self.path} is open in another process (a running raee-server?); "
                    "send work to it with --server HOST:PORT"
                ) from exc
            raise StoreMismatch(f"{self.path}: cannot open the vector store: {exc}") from exc

    @staticmethod
    def _task_filter(task: str) -> Any:
        from qdrant_edge import FieldCondition, Filter, MatchValue

        return Filter(must=[FieldCondition(key=TENANT_FIELD, match=MatchValue(task))])

    def upsert(self, points: Sequence[VectorPoint]) -> None:
        from qdrant_edge import Point, UpdateOperation

        if not points:
            return
        batch = [Point(p.id, {VECTOR_NAME: p.vector.astype(float).tolist()}, p.payload) for p in points]
        with self._lock:
            self._shard.update(UpdateOperation.upsert_points(batch))
            self._shard.flush()

    def search(self, task: str, vectors: np.ndarray, k: int) -> list[list[Neighbour]]:
        from qdrant_edge import Query, QueryBatchRequest, QueryRequest

        flt = self._task_filter(task)
        requests = [
            QueryRequest(limit=k, query=Query.Nearest(v.astype(float).tolist(), using=VECTOR_NAME), filter=flt,
                         with_payload=True, with_vector=False)
            for v in vectors
        ]
        with self._lock:
            results = self._shard.query_batch(QueryBatchRequest(requests))
        return [[to_neighbour(p.id, p.score, p.payload) for p in hits] for hits in results]

    def count(self, task: str | None = None) -> int:
        from qdrant_edge import CountRequest

        with self._lock:
            return int(self._shard.count(CountRequest(exact=True, filter=self._task_filter(task) if task else None)))

    def existing(self, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        with self._lock:
            found = self._shard.retrieve(list(ids), with_payload=False, with_vector=False)
        return {str(r.id) for r in found}

    def delete_task(self, task: str) -> None:
        from qdrant_edge import UpdateOperation

        with self._lock:
            self._shard.update(UpdateOperation.delete_points_by_filter(self._task_filter(task)))
            self._shard.flush()

    def close(self) -> None:
        with self._lock:
            if self._shard is not None:
                self._shard.flush()
                self._shard.close()
                self._shard = None
