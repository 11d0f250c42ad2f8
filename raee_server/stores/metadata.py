"""The SQL record of what was ingested: tasks, exit records, per-layer correctness, ingest batches.

SQLite in the data directory by default; any SQLAlchemy URL (Postgres) through
`RAEE_DATABASE_URL`. The hot path never reads it: it serves admin and analytics. The tables and the
connection are raee_server.stores.sql's; this module is what the rest of the service calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Integer, delete, func, select, update
from sqlalchemy.exc import DatabaseError, OperationalError

from raee_server.errors import NotReady, StoreMismatch, TaskExists
from raee_server.stores.feature_rows import FeatureRows
from raee_server.stores.leases import Leases
from raee_server.stores.records import ExitRecord, text_hash
from raee_server.stores.sql import (
    COMMITTED,
    DELETING,
    PENDING,
    ExitFeaturesRow,
    ExitRecordRow,
    FeatureCodecRow,
    IngestBatchRow,
    LayerResultRow,
    TaskHeadsRow,
    TaskRow,
    _dialect_insert,
    _now,
    _Sessions,
    open_engine,
    task_row,
)
from raee_server.types import Choice, TaskSpec


@dataclass(frozen=True)
class StoredHeads:
    version: int
    fitted_at: datetime
    summary: dict[str, Any]
    data: bytes


@dataclass(frozen=True)
class BatchInfo:
    """One ingest call: its counts and how it ended (running, done, cancelled, failed, interrupted)."""

    id: int
    task: str
    source: str
    status: str
    added: int
    present: int
    rejected: int
    started_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class TaskInfo:
    spec: TaskSpec
    backbone_id: str
    encoder_id: str
    created_at: datetime
    records: int
    tuned: Choice | None = None
    label_records: dict[str, int] = field(default_factory=dict)  # committed records per label
    edits: int = 0  # records deleted or relabelled since the task was made

    @property
    def imbalanced(self) -> bool:
        """The records' label mix is far from the traffic's expected one (the declared shares, else
        equal): some label holds over 1.5x, or under half, its expected share."""
        total = sum(self.label_records.values())
        if not total:
            return False
        return any(not 0.5 * want <= self.label_records.get(label.name, 0) / total <= 1.5 * want
                   for label, want in zip(self.spec.labels, self.spec.shares))


class MetadataStore(FeatureRows, Leases):
    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = open_engine(url)
        from raee_server.stores.migrate import ensure_schema

        where = self.engine.url.render_as_string(hide_password=True)
        try:
            ensure_schema(self.engine)
        except OperationalError as exc:  # cannot connect (or a SQLite file that cannot be opened)
            if self.engine.dialect.name == "sqlite" and "not a database" not in str(exc):
                raise StoreMismatch(f"metadata database {where} cannot be opened: {exc.orig}") from exc
            raise NotReady(f"metadata database {where} is unreachable: {exc.orig}") from exc
        except DatabaseError as exc:  # e.g. "file is not a database": never start on an empty replacement
            raise StoreMismatch(f"metadata database {where} is corrupt or not a database: {exc.orig}") from exc
        self._session = _Sessions(self.engine, where)

    def close(self) -> None:
        self.engine.dispose()

    # -- tasks ---------------------------------------------------------------

    def create_task(self, spec: TaskSpec, backbone_id: str, encoder_id: str) -> None:
        with self._session.begin() as s:
            if s.scalar(select(TaskRow.id).where(TaskRow.name == spec.name)) is not None:
                raise TaskExists(spec.name)
            d = spec.to_dict()
            s.add(TaskRow(name=spec.name, template=spec.template, labels=d["labels"], description=spec.description,
                          backbone_id=backbone_id, encoder_id=encoder_id,
                          options={"objective": spec.objective, "prior_correction": spec.prior_correction,
                                   "adapt_prior": spec.adapt_prior, "inputs": list(spec.inputs),
                                   "retrieval_key": spec.retrieval_key}))

    def task(self, name: str) -> TaskInfo:
        with self._session() as s:
            row = task_row(s, name)
            counts = {str(label): int(n) for label, n in s.execute(
                select(ExitRecordRow.label, func.count()).where(
                    ExitRecordRow.task_id == row.id, ExitRecordRow.status == COMMITTED)
                .group_by(ExitRecordRow.label)).all()}
            return TaskInfo(row.spec(), row.backbone_id, row.encoder_id, row.created_at, sum(counts.values()),
                            Choice.from_dict(row.tuned) if row.tuned else None, counts, row.edits or 0)

    def task_names(self, after: str | None, limit: int) -> list[str]:
        """Up to `limit` task names after `after`, in name order (ListTasks pages)."""
        query = select(TaskRow.name).order_by(TaskRow.name).limit(limit)
        if after is not None:
            query = query.where(TaskRow.name > after)
        with self._session() as s:
            return list(s.scalars(query).all())

    def list_tasks(self) -> list[TaskInfo]:
        with self._session() as s:
            names = s.scalars(select(TaskRow.name).order_by(TaskRow.name)).all()
        return [self.task(n) for n in names]

    def set_tuned(self, name: str, choice: Choice) -> None:
        with self._session.begin() as s:
            task_row(s, name).tuned = choice.to_dict()

    def layer_results(self, ids: Sequence[str]) -> dict[str, list[tuple[str, float, float]]]:
        """(predicted label, its probability, the gold label's probability) at every exit, per record."""
        out: dict[str, list[tuple[str, float, float]]] = {}
        with self._session() as s:
            for i in range(0, len(ids), 500):
                rows = s.execute(
                    select(LayerResultRow.record_id, LayerResultRow.layer, LayerResultRow.predicted,
                           LayerResultRow.probability, LayerResultRow.gold_probability)
                    .where(LayerResultRow.record_id.in_(list(ids[i:i + 500])))
                    .order_by(LayerResultRow.record_id, LayerResultRow.layer))
                for rid, _layer, predicted, p, gold_p in rows:
                    out.setdefault(rid, []).append((predicted, p, gold_p))
        return out

    def committed_examples(self, task: str, limit: int | None = None) -> list[tuple[str, str, str]]:
        """(id, text, label) of committed records in ingest order."""
        with self._session() as s:
            task_id = task_row(s, task).id
            q = (select(ExitRecordRow.id, ExitRecordRow.text, ExitRecordRow.label)
                 .where(ExitRecordRow.task_id == task_id, ExitRecordRow.status == COMMITTED)
                 .order_by(ExitRecordRow.created_at, ExitRecordRow.id))
            return [tuple(r) for r in s.execute(q.limit(limit) if limit else q)]  # type: ignore[misc]

    def delete_task(self, name: str) -> None:
        with self._session.begin() as s:
            row = task_row(s, name)
            ids = select(ExitRecordRow.id).where(ExitRecordRow.task_id == row.id)
            s.execute(delete(LayerResultRow).where(LayerResultRow.record_id.in_(ids)))
            s.execute(delete(ExitFeaturesRow).where(ExitFeaturesRow.record_id.in_(ids)))
            s.execute(delete(TaskHeadsRow).where(TaskHeadsRow.task_id == row.id))
            s.execute(delete(FeatureCodecRow).where(FeatureCodecRow.task_id == row.id))
            s.execute(delete(ExitRecordRow).where(ExitRecordRow.task_id == row.id))
            s.execute(delete(IngestBatchRow).where(IngestBatchRow.task_id == row.id))
            s.delete(row)

    # -- ingest --------------------------------------------------------------

    def committed_ids(self, task: str, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        with self._session() as s:
            task_id = task_row(s, task).id
            for i in range(0, len(ids), 500):
                chunk = list(ids[i : i + 500])
                found.update(s.scalars(
                    select(ExitRecordRow.id).where(
                        ExitRecordRow.task_id == task_id, ExitRecordRow.id.in_(chunk),
                        ExitRecordRow.status == COMMITTED)
                ))
        return found

    def begin_batch(self, task: str, source: str) -> int:
        with self._session.begin() as s:
            row = IngestBatchRow(task_id=task_row(s, task).id, source=source)
            s.add(row)
            s.flush()
            return row.id

    def finish_batch(self, batch_id: int, added: int, present: int, rejected: int, status: str) -> None:
        with self._session.begin() as s:
            s.execute(update(IngestBatchRow).where(IngestBatchRow.id == batch_id).values(
                added=added, present=present, rejected=rejected, status=status, finished_at=_now()))

    def list_batches(self, task: str | None = None, limit: int = 50) -> list[BatchInfo]:
        """The newest ingest batches first (of one task, or of all)."""
        query = (select(IngestBatchRow, TaskRow.name).join(TaskRow, TaskRow.id == IngestBatchRow.task_id)
                 .order_by(IngestBatchRow.id.desc()).limit(limit))
        if task is not None:
            query = query.where(TaskRow.name == task)
        with self._session() as s:
            if task is not None:
                task_row(s, task)  # TaskNotFound for a made-up name
            return [BatchInfo(b.id, name, b.source, b.status, b.added, b.present, b.rejected, b.started_at,
                              b.finished_at) for b, name in s.execute(query).all()]

    def ingesting(self, task: str, within: timedelta = timedelta(hours=1)) -> bool:
        """An ingest batch of the task is running now (started within `within`: a batch left
        `running` by a process that died must not hold back the task's background work forever)."""
        since = datetime.now(UTC) - within
        with self._session() as s:
            row = task_row(s, task)
            return s.scalar(select(func.count()).select_from(IngestBatchRow).where(
                IngestBatchRow.task_id == row.id, IngestBatchRow.status == "running",
                IngestBatchRow.started_at >= since)) != 0

    def close_stale_batches(self) -> int:
        """Mark batches still `running` as `interrupted`: for a process that holds the only write
        access (the embedded store's lock), such rows are left by a process that died mid-ingest."""
        with self._session.begin() as s:
            result = s.execute(update(IngestBatchRow).where(IngestBatchRow.status == "running")
                               .values(status="interrupted", finished_at=_now()))
            return int(result.rowcount or 0)  # type: ignore[attr-defined]

    def write_pending(self, task: str, records: Iterable[ExitRecord], batch_id: int | None) -> None:
        """Record examples and their per-layer results as pending, in one transaction.

        Upserts, not inserts: several writers may ingest overlapping rows at once, and a
        crashed attempt's rows are overwritten. A row another writer already committed
        stays committed (its values are the same: ids and results are deterministic).
        """
        records = list(records)
        if not records:
            return
        insert = _dialect_insert(self.engine.dialect.name)
        with self._session.begin() as s:
            row = task_row(s, task)
            labels = row.spec().label_names
            rows = [dict(id=r.id, task_id=row.id, text_hash=text_hash(r.text), text=r.text, label=r.label,
                         batch_id=batch_id, status=PENDING, created_at=_now()) for r in records]
            stmt = insert(ExitRecordRow).values(rows)
            s.execute(stmt.on_conflict_do_update(index_elements=["id"], set_={"batch_id": stmt.excluded.batch_id}))
            results = [dict(record_id=r.id, layer=lr.layer, predicted=labels[lr.predicted], probability=lr.probability,
                            gold_probability=lr.gold_probability, correct=lr.correct)
                       for r in records for lr in r.layers]
            for i in range(0, len(results), 2000):  # bounded statement size
                stmt = insert(LayerResultRow).values(results[i : i + 2000])
                s.execute(stmt.on_conflict_do_update(
                    index_elements=["record_id", "layer"],
                    set_={c: stmt.excluded[c] for c in ("predicted", "probability", "gold_probability", "correct")}))
            self._write_features(s, [r for r in records if r.features is not None])

    def save_heads(self, task: str, summary: dict[str, Any], data: bytes) -> int:
        """Store a new version of the task's exit heads; returns its version number, one above the
        newest. Writers take turns on the task's row (Postgres: FOR UPDATE; SQLite: one writer at a
        time), and (task, version) is unique besides."""
        with self._session.begin() as s:
            task_id = s.scalar(select(TaskRow.id).where(TaskRow.id == task_row(s, task).id).with_for_update())
            version = int(s.scalar(select(func.max(TaskHeadsRow.version))
                                   .where(TaskHeadsRow.task_id == task_id)) or 0) + 1
            s.add(TaskHeadsRow(task_id=task_id, version=version, summary=summary, data=data))
        return version

    def heads(self, task: str, newer_than: int = 0) -> StoredHeads | None:
        """The task's newest exit heads (None if none, or none newer than `newer_than`)."""
        with self._session() as s:
            task_id = task_row(s, task).id
            row = s.scalars(select(TaskHeadsRow).where(TaskHeadsRow.task_id == task_id,
                                                       TaskHeadsRow.version > newer_than)
                            .order_by(TaskHeadsRow.version.desc()).limit(1)).first()
            return None if row is None else StoredHeads(row.version, row.fitted_at, dict(row.summary), row.data)

    def mark_committed(self, ids: Sequence[str]) -> None:
        with self._session.begin() as s:
            s.execute(update(ExitRecordRow).where(ExitRecordRow.id.in_(list(ids))).values(status=COMMITTED))

    def record_states(self, task: str) -> dict[str, str]:
        """Every record id of the task with its state (pending or committed)."""
        with self._session() as s:
            task_id = task_row(s, task).id
            rows = s.execute(select(ExitRecordRow.id, ExitRecordRow.status).where(ExitRecordRow.task_id == task_id))
            return {rid: status for rid, status in rows}

    def examples(self, ids: Sequence[str]) -> list[tuple[str, str]]:
        """(text, label) of the given records, to recompute them."""
        out: list[tuple[str, str]] = []
        with self._session() as s:
            for i in range(0, len(ids), 500):
                out += [(t, l) for t, l in s.execute(
                    select(ExitRecordRow.text, ExitRecordRow.label).where(ExitRecordRow.id.in_(list(ids[i:i + 500]))))]
        return out

    def mark_deleting(self, task: str, ids: Iterable[str] = (), batch: int | None = None) -> list[str]:
        """The first step of a delete: the task's records among `ids`, or of ingest `batch`, marked
        `deleting` (no longer served by SQL readers; counted as edits). Returns their ids."""
        wanted = list(dict.fromkeys(ids))
        with self._session.begin() as s:
            row = task_row(s, task)
            of_task = select(ExitRecordRow.id).where(ExitRecordRow.task_id == row.id)
            found: list[str] = []
            for i in range(0, len(wanted), 500):
                found += s.scalars(of_task.where(ExitRecordRow.id.in_(wanted[i : i + 500]))).all()
            if batch is not None:
                found += s.scalars(of_task.where(ExitRecordRow.batch_id == batch)).all()
            found = list(dict.fromkeys(found))
            for i in range(0, len(found), 500):
                s.execute(update(ExitRecordRow).where(ExitRecordRow.id.in_(found[i : i + 500])).values(status=DELETING))
            row.edits = (row.edits or 0) + len(found)
            return found

    def delete_records(self, ids: Sequence[str]) -> None:
        """The last step of a delete: the rows, their layer results and their features."""
        with self._session.begin() as s:
            for i in range(0, len(ids), 500):
                chunk = list(ids[i : i + 500])
                s.execute(delete(LayerResultRow).where(LayerResultRow.record_id.in_(chunk)))
                s.execute(delete(ExitFeaturesRow).where(ExitFeaturesRow.record_id.in_(chunk)))
                s.execute(delete(ExitRecordRow).where(ExitRecordRow.id.in_(chunk), ExitRecordRow.status == DELETING))

    def mark_relabelled(self, task: str, labels: dict[str, str]) -> list[tuple[str, str]]:
        """The first step of a relabel: each record's new label, and the record pending again (its
        layer results and vector payload are recomputed by an ingest of its text). Returns (id, text)
        of the records found."""
        with self._session.begin() as s:
            row = task_row(s, task)
            ids = list(labels)
            found: list[tuple[str, str]] = []
            for i in range(0, len(ids), 500):
                found += [(rid, text) for rid, text in s.execute(
                    select(ExitRecordRow.id, ExitRecordRow.text).where(
                        ExitRecordRow.task_id == row.id, ExitRecordRow.id.in_(ids[i : i + 500]),
                        ExitRecordRow.status != DELETING))]
            for rid, _ in found:
                s.execute(update(ExitRecordRow).where(ExitRecordRow.id == rid)
                          .values(label=labels[rid], status=PENDING))
            row.edits = (row.edits or 0) + len(found)
            return found

    def mark_pending(self, ids: Sequence[str]) -> None:
        with self._session.begin() as s:
            for i in range(0, len(ids), 500):
                s.execute(
                    update(ExitRecordRow).where(ExitRecordRow.id.in_(list(ids[i:i + 500]))).values(status=PENDING)
                )

    # -- analytics -----------------------------------------------------------

    def layer_accuracy(self, task: str) -> dict[int, float]:
        """Fraction of the task's committed records each exit gets right."""
        with self._session() as s:
            task_id = task_row(s, task).id
            rows = s.execute(
                select(LayerResultRow.layer, func.avg(func.cast(LayerResultRow.correct, Integer)))
                .join(ExitRecordRow, ExitRecordRow.id == LayerResultRow.record_id)
                .where(ExitRecordRow.task_id == task_id, ExitRecordRow.status == COMMITTED)
                .group_by(LayerResultRow.layer).order_by(LayerResultRow.layer)
            ).all()
        return {int(layer): float(acc) for layer, acc in rows}

    def earliest_exits(self, task: str, depth: int) -> tuple[list[int], int]:
        """Records whose earliest correct exit is each layer 0..depth, and records no layer gets right."""
        with self._session() as s:
            task_id = task_row(s, task).id
            first = (
                select(func.min(LayerResultRow.layer).label("layer"))
                .join(ExitRecordRow, ExitRecordRow.id == LayerResultRow.record_id)
                .where(ExitRecordRow.task_id == task_id, ExitRecordRow.status == COMMITTED,
                       LayerResultRow.correct.is_(True))
                .group_by(LayerResultRow.record_id).subquery()
            )
            rows = s.execute(select(first.c.layer, func.count()).group_by(first.c.layer)).all()
            total = s.scalar(select(func.count()).select_from(ExitRecordRow).where(
                ExitRecordRow.task_id == task_id, ExitRecordRow.status == COMMITTED)) or 0
        counts = [0] * (depth + 1)
        for layer, n in rows:
            if 0 <= layer <= depth:
                counts[int(layer)] = int(n)
        return counts, int(total) - sum(counts)
