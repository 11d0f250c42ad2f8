"""Vector stores for exit records: one interface, the embedded Qdrant Edge engine as the default.

The hot path reads only this store: each point carries the exit information a
query needs in its payload. Every query filters on the `task` tenant field.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from raee_server.errors import NotReady, StoreMismatch
from raee_server.settings import Settings
from raee_server.types import Neighbour

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
    exclusive: bool  # only this process can write (the embedded store's lock)

    def upsert(self, points: Sequence[VectorPoint]) -> None: ...
    def search(self, task: str, vectors: np.ndarray, k: int) -> list[list[Neighbour]]: ...
    def count(self, task: str | None = None) -> int: ...
    def existing(self, ids: Sequence[str]) -> set[str]: ...
    def ids(self, task: str) -> set[str]: ...
    def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]: ...  # the stored keys (export)
    def delete_ids(self, ids: Sequence[str]) -> None: ...
    def delete_task(self, task: str) -> None: ...
    def optimize(self) -> bool: ...  # build pending indexes; True when anything was rebuilt
    def ping(self) -> None: ...  # raises NotReady when the store cannot answer
    def close(self) -> None: ...


def _named_vector(vector: Any) -> np.ndarray:
    """The key out of a retrieved point's named vectors."""
    return np.asarray(vector[VECTOR_NAME], dtype=np.float32)


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


# Every query filters on one tenant, so both stores build one HNSW graph per tenant (payload_m) and
# no global graph (m=0): a third of the build time, and no query would use the global graph.
# Tenants under FULL_SCAN_KB of keys (~26,000 MiniLM keys) are scanned exactly: measured, that
# costs ~2 ms at p99, while graphs over tenants of 6,000-10,000 keys only reached recall@12 of
# 0.92-0.97 (docs/results.md, "Scale").
HNSW_M, HNSW_PAYLOAD_M, HNSW_EF_CONSTRUCT, FULL_SCAN_KB = 0, 16, 100, 40_000


def _edge_config(dim: int) -> Any:
    from qdrant_edge import Distance, EdgeConfig, EdgeVectorParams, HnswIndexConfig

    return EdgeConfig(vectors={VECTOR_NAME: EdgeVectorParams(size=dim, distance=Distance.Cosine)},
                      hnsw_config=HnswIndexConfig(m=HNSW_M, payload_m=HNSW_PAYLOAD_M,
                                                  ef_construct=HNSW_EF_CONSTRUCT, full_scan_threshold=FULL_SCAN_KB))


def edge_open_error(path: Path, exc: Exception) -> NotReady | StoreMismatch:
    """The one place that reads Qdrant Edge's untyped errors (its bindings raise plain exceptions
    whose only structure is the message): another process holding the shard's lock is NotReady
    (retry, or go through the server); anything else about opening is a StoreMismatch."""
    message = str(exc)
    if "WouldBlock" in message or "lock" in message.lower():
        return NotReady(f"{path} is open in another process (a running raee-server?); "
                        "send work to it with --server HOST:PORT")
    return StoreMismatch(f"{path}: cannot open the vector store: {message}")


def unreachable(exc: BaseException) -> bool:
    """A Qdrant server call failed because the server could not be reached in time (by type:
    gRPC status codes, qdrant-client's transport errors), as opposed to a refused request."""
    import grpc
    from qdrant_client.http.exceptions import ResponseHandlingException

    if isinstance(exc, grpc.RpcError):
        return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return isinstance(exc, ResponseHandlingException | ConnectionError | TimeoutError)


def already_exists(exc: BaseException) -> bool:
    import grpc
    from qdrant_client.http.exceptions import UnexpectedResponse

    if isinstance(exc, grpc.RpcError):
        return exc.code() == grpc.StatusCode.ALREADY_EXISTS
    return isinstance(exc, UnexpectedResponse) and exc.status_code == 409


class EdgeVectorStore:
    """Qdrant Edge: the Qdrant engine in-process, one shard directory per collection.

    Only one process may open a shard; a second gets a clear error naming the directory.
    Calls are serialised by a lock because the server's worker and ingest share one shard.
    Edge runs no background optimizer: `optimize()` builds the indexes, holding the GIL while
    it does, so it runs before the server reports SERVING and after a local ingest, never
    between requests.
    """

    exclusive = True

    def __init__(self, root: Path, collection: str, dim: int) -> None:
        from qdrant_edge import EdgeShard, KeywordIndexParams, UpdateOperation

        self.collection = collection
        self.dim = dim
        self.path = root / collection
        self._lock = threading.Lock()
        meta_file = self.path / "raee-collection.json"
        config = _edge_config(dim)
        try:
            if meta_file.exists():
                meta = json.loads(meta_file.read_text())
                if meta.get("dim") != dim:
                    raise StoreMismatch(
                        f"{self.path}: built with {meta.get('dim')}-d keys, the encoder gives {dim}-d"
                    )
                self._shard = EdgeShard.load(str(self.path), config)  # older shards converge on optimize
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
            raise edge_open_error(self.path, exc) from exc

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

    def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        if not ids:
            return {}
        with self._lock:
            found = self._shard.retrieve(list(ids), with_payload=False, with_vector=True)
        return {str(r.id): _named_vector(r.vector) for r in found}

    def ids(self, task: str) -> set[str]:
        from qdrant_edge import ScrollRequest

        found: set[str] = set()
        offset = None
        with self._lock:
            while True:
                records, offset = self._shard.scroll(ScrollRequest(
                    offset=offset, limit=1000, filter=self._task_filter(task), with_payload=False, with_vector=False))
                found.update(str(r.id) for r in records)
                if offset is None:
                    return found

    def delete_ids(self, ids: Sequence[str]) -> None:
        from qdrant_edge import UpdateOperation

        if ids:
            with self._lock:
                self._shard.update(UpdateOperation.delete_points(list(ids)))
                self._shard.flush()

    def delete_task(self, task: str) -> None:
        from qdrant_edge import UpdateOperation

        with self._lock:
            self._shard.update(UpdateOperation.delete_points_by_filter(self._task_filter(task)))
            self._shard.flush()

    def optimize(self) -> bool:
        """Merge grown segments and build their per-tenant HNSW graphs; blocks the whole process."""
        with self._lock:
            return bool(self._shard.optimize())

    def ping(self) -> None:
        if self._shard is None:
            raise NotReady(f"{self.path}: the vector store is closed")

    def close(self) -> None:
        with self._lock:
            if self._shard is not None:
                self._shard.flush()
                self._shard.close()
                self._shard = None  # type: ignore[assignment]  # closed: only ping()/close() may run after this


def check_peers(client: Any, replication_factor: int) -> None:
    """Refuse (NotReady: the server retries) to create a replicated collection before the cluster has
    the peers to hold the replicas: created early, every shard would stay on the first node."""
    try:
        status = client.cluster_status()
    except NotImplementedError:  # the in-memory mode has no cluster
        return
    peers = len(getattr(status, "peers", None) or {})
    if getattr(status, "status", "disabled") != "enabled" or peers < replication_factor:
        raise NotReady(f"Qdrant cluster has {peers} peer(s) ({getattr(status, 'status', '?')}); replication factor "
                       f"{replication_factor} needs at least {replication_factor}: waiting for the others to join")


class QdrantServerStore:
    """A Qdrant server or cluster through qdrant-client (gRPC), or its in-memory mode (`:memory:`).

    Writes wait for the server's acknowledgement, so an ingest that returned is
    searchable. With `shard_per_task`, each task gets its own shard key (custom
    sharding) for users whose tenants are large enough to place on their own.
    """

    exclusive = False

    def __init__(self, url: str, collection: str, dim: int, api_key: str | None = None,
                 shard_per_task: bool = False, replication_factor: int | None = None,
                 shard_number: int | None = None, timeout: int = 10) -> None:
        from qdrant_client import QdrantClient, models

        self.collection = collection
        self.dim = dim
        self.shard_per_task = shard_per_task
        self._models = models
        self._shard_keys: set[str] = set()
        # the server's key stage and model worker call from two threads: qdrant-client's in-memory
        # mode is plain Python dictionaries, so its calls take turns; a server's client is thread-safe
        self._lock: contextlib.AbstractContextManager[Any] = threading.Lock() if url == ":memory:" \
            else contextlib.nullcontext()
        if url == ":memory:":
            self.client = QdrantClient(location=":memory:")
        else:
            self.client = QdrantClient(url=url, prefer_grpc=True, api_key=api_key, timeout=timeout,
                                       check_compatibility=False)  # no extra round trip before the first call
        try:
            exists = self.client.collection_exists(collection)
        except Exception as exc:
            raise NotReady(f"Qdrant at {url} is unreachable: {exc}") from exc
        if exists:
            params = self.client.get_collection(collection).config.params.vectors
            size = params[VECTOR_NAME].size if isinstance(params, dict) else None
            if size != dim:
                raise StoreMismatch(f"collection {collection}: built with {size}-d keys, the encoder gives {dim}-d")
            return
        if replication_factor and replication_factor > 1:
            check_peers(self.client, replication_factor)
        self.client.create_collection(
            collection,
            vectors_config={VECTOR_NAME: models.VectorParams(size=dim, distance=models.Distance.COSINE)},
            hnsw_config=models.HnswConfigDiff(m=HNSW_M, payload_m=HNSW_PAYLOAD_M, ef_construct=HNSW_EF_CONSTRUCT,
                                              full_scan_threshold=FULL_SCAN_KB),
            sharding_method=models.ShardingMethod.CUSTOM if shard_per_task else None,
            replication_factor=replication_factor,
            shard_number=shard_number,
        )
        with warnings.catch_warnings():  # the in-memory mode warns that it ignores payload indexes
            warnings.simplefilter("ignore", UserWarning)
            self.client.create_payload_index(
                collection, TENANT_FIELD,
                field_schema=models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True),
                wait=True)

    def _filter(self, task: str) -> Any:
        m = self._models
        return m.Filter(must=[m.FieldCondition(key=TENANT_FIELD, match=m.MatchValue(value=task))])

    def _shard(self, task: str) -> str | None:
        if not self.shard_per_task:
            return None
        if task not in self._shard_keys:
            try:
                self.client.create_shard_key(self.collection, task)
            except Exception as exc:
                if not already_exists(exc):  # created meanwhile by another writer: fine
                    raise
            self._shard_keys.add(task)
        return task

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            with self._lock:
                return fn(*args, **kwargs)
        except (StoreMismatch, NotReady):
            raise
        except Exception as exc:
            if unreachable(exc):
                raise NotReady(f"Qdrant is unreachable: {exc}") from exc
            raise

    def upsert(self, points: Sequence[VectorPoint]) -> None:
        m = self._models
        by_task: dict[str, list[Any]] = {}
        for p in points:
            by_task.setdefault(str(p.payload[TENANT_FIELD]), []).append(
                m.PointStruct(id=p.id, vector={VECTOR_NAME: p.vector.astype(float).tolist()}, payload=p.payload))
        for task, batch in by_task.items():
            self._call(self.client.upsert, self.collection, points=batch, wait=True,
                       shard_key_selector=self._shard(task))

    def search(self, task: str, vectors: np.ndarray, k: int) -> list[list[Neighbour]]:
        m = self._models
        requests = [
            m.QueryRequest(query=v.astype(float).tolist(), using=VECTOR_NAME, filter=self._filter(task), limit=k,
                           with_payload=True, shard_key=task if self.shard_per_task else None)
            for v in vectors
        ]
        if not requests:
            return []
        responses = self._call(self.client.query_batch_points, self.collection, requests=requests)
        return [[to_neighbour(p.id, p.score, p.payload) for p in r.points] for r in responses]

    def count(self, task: str | None = None) -> int:
        flt = self._filter(task) if task else None
        return int(self._call(self.client.count, self.collection, count_filter=flt, exact=True).count)

    def existing(self, ids: Sequence[str]) -> set[str]:
        if not ids:
            return set()
        found = self._call(self.client.retrieve, self.collection, ids=list(ids), with_payload=False,
                           with_vectors=False)
        return {str(r.id) for r in found}

    def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        if not ids:
            return {}
        found = self._call(self.client.retrieve, self.collection, ids=list(ids), with_payload=False,
                           with_vectors=True)
        return {str(r.id): _named_vector(r.vector) for r in found}

    def ids(self, task: str) -> set[str]:
        found: set[str] = set()
        offset = None
        while True:
            records, offset = self._call(self.client.scroll, self.collection, scroll_filter=self._filter(task),
                                         limit=1000, offset=offset, with_payload=False, with_vectors=False)
            found.update(str(r.id) for r in records)
            if offset is None:
                return found

    def delete_ids(self, ids: Sequence[str]) -> None:
        if ids:
            self._call(self.client.delete, self.collection,
                       points_selector=self._models.PointIdsList(points=list(ids)), wait=True)

    def delete_task(self, task: str) -> None:
        self._call(self.client.delete, self.collection,
                   points_selector=self._models.FilterSelector(filter=self._filter(task)), wait=True)

    def optimize(self) -> bool:
        """Nothing to do: the server's optimizers index in the background."""
        return False

    def ping(self) -> None:
        self._call(self.client.get_collection, self.collection)

    def close(self) -> None:
        self.client.close()


def open_vector_store(settings: Settings, collection: str, dim: int) -> VectorStore:
    """The one place that picks the implementation: a Qdrant server when RAEE_QDRANT_URL is set, else Edge."""
    if settings.qdrant_url:
        return QdrantServerStore(settings.qdrant_url, collection, dim, settings.qdrant_api_key,
                                 settings.qdrant_shard_per_task, settings.qdrant_replication_factor,
                                 settings.qdrant_shard_number, settings.qdrant_timeout)
    return EdgeVectorStore(settings.data_dir / "qdrant", collection, dim)
