"""The SQL record of what was ingested: tasks, exit records, per-layer correctness, ingest batches.

SQLite in the data directory by default; any SQLAlchemy URL (Postgres) through
`RAEE_DATABASE_URL`. The hot path never reads it: it serves admin and analytics.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from raee_server.errors import NotReady, StoreMismatch, TaskExists, TaskNotFound
from raee_server.stores.codec import CODED, LEARN_ROWS, RAW, FeatureCodec, FeatureMatrix, learn_codec
from raee_server.stores.records import ExitRecord, StoredFeatures, text_hash
from raee_server.types import Choice, Label, TaskSpec, is_task_name

# A naming convention gives every constraint a stable name, so that migrations can drop
# and alter them on every database (SQLite batch mode included).
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# A record's life: pending (SQL rows written, vectors not yet confirmed) -> committed (both stores
# hold it) -> deleting (leaving: vectors being removed, then the rows). `doctor` finishes what a
# crash leaves in between, in the same direction.
PENDING, COMMITTED, DELETING = "pending", "committed", "deleting"


def _now() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class TaskRow(Base):
    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    template: Mapped[str] = mapped_column(Text)
    labels: Mapped[list] = mapped_column(JSON)  # [{"name": ..., "word": ...}] in label order
    description: Mapped[str] = mapped_column(Text, default="")
    backbone_id: Mapped[str] = mapped_column(String(200))
    encoder_id: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    # The `auto` policy's choice for this task and its validation figures (raee_server.core.auto).
    tuned: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # {"objective", "prior_correction", "adapt_prior"}; NULL for tasks made before them: the defaults
    options: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # Records deleted or relabelled since the task was made: what the exit heads' refit rule counts
    # beside the records added.
    edits: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    def spec(self) -> TaskSpec:
        options = self.options or {}
        return TaskSpec(
            name=self.name,
            template=self.template,
            labels=tuple(Label(d["name"], d["word"], d.get("share")) for d in self.labels),
            description=self.description,
            objective=str(options.get("objective", "balanced_accuracy")),
            prior_correction=bool(options.get("prior_correction", True)),
            adapt_prior=bool(options.get("adapt_prior", False)),
        )


class IngestBatchRow(Base):
    __tablename__ = "ingest_batches"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    source: Mapped[str] = mapped_column(Text)
    added: Mapped[int] = mapped_column(Integer, default=0)
    present: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="running")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class ExitRecordRow(Base):
    __tablename__ = "exit_records"
    __table_args__ = (UniqueConstraint("task_id", "text_hash"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # the vector store's point id
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    text_hash: Mapped[str] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    label: Mapped[str] = mapped_column(String(200))
    batch_id: Mapped[int | None] = mapped_column(ForeignKey("ingest_batches.id", ondelete="SET NULL"), nullable=True)
    # pending: rows written, vectors not yet confirmed; committed: both stores hold it.
    status: Mapped[str] = mapped_column(String(16), default=PENDING, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)


class LayerResultRow(Base):
    __tablename__ = "layer_results"
    record_id: Mapped[str] = mapped_column(ForeignKey("exit_records.id", ondelete="CASCADE"), primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    predicted: Mapped[str] = mapped_column(String(200))
    probability: Mapped[float] = mapped_column(Float)
    gold_probability: Mapped[float] = mapped_column(Float)
    correct: Mapped[bool] = mapped_column(Boolean)


class ExitFeaturesRow(Base):
    """A record's exit features as `codec` says: 0, raw float16 [L + 1, H] row-major bytes (24,320 for
    Gemma 3 270M); 1, the task's compact codes (raee_server.stores.codec: 2,926)."""

    __tablename__ = "exit_features"
    record_id: Mapped[str] = mapped_column(ForeignKey("exit_records.id", ondelete="CASCADE"), primary_key=True)
    exits: Mapped[int] = mapped_column(Integer)
    dim: Mapped[int] = mapped_column(Integer)  # of the raw features, whatever the encoding
    data: Mapped[bytes] = mapped_column(LargeBinary)
    codec: Mapped[int] = mapped_column(Integer, default=RAW, server_default="0")


class FeatureCodecRow(Base):
    """A task's feature codec (raee_server.stores.codec), learned once from its first records."""

    __tablename__ = "feature_codecs"
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    data: Mapped[bytes] = mapped_column(LargeBinary)  # npz: per-exit mean and whitened basis


class TaskHeadsRow(Base):
    """One fitted set of exit heads of a task (a version); the newest is served."""

    __tablename__ = "task_heads"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    fitted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    summary: Mapped[dict] = mapped_column(JSON)  # records, C and accuracy per exit
    data: Mapped[bytes] = mapped_column(LargeBinary)  # npz: weights, scaling, out-of-fold judgments


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


def _dialect_insert(dialect: str) -> Callable[..., Any]:
    """INSERT with ON CONFLICT for the two supported databases."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as postgresql_insert

        return postgresql_insert
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert
    raise NotImplementedError(f"metadata store: {dialect} is not supported (use SQLite or Postgres)")


def open_engine(url: str) -> Engine:
    """The one way this project opens its metadata database: the store, `raee-admin migrate` and Alembic's
    env.py alike, so a schema migrated from the command line saw the same connection settings."""
    engine = create_engine(url, json_serializer=lambda o: json.dumps(o, ensure_ascii=False))
    if engine.dialect.name == "sqlite":
        _sqlite_pragmas(engine)
    return engine


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA journal_mode=WAL")  # readers (admin) do not block the writer (ingest)
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()


class _Sessions:
    """sessionmaker's two forms, with a lost connection translated into NotReady: callers above
    stores/ see the service's own error (UNAVAILABLE with a retry delay, exit code 4), never
    SQLAlchemy's, and nothing was stored (the transaction rolled back)."""

    def __init__(self, engine: Engine, where: str) -> None:
        self._maker = sessionmaker(engine, expire_on_commit=False)
        self._where = where

    @contextmanager
    def _unreachable_is_not_ready(self) -> Iterator[None]:
        try:
            yield
        except OperationalError as exc:
            raise NotReady(f"metadata database {self._where} is unreachable: {exc.orig}") from exc

    @contextmanager
    def __call__(self) -> Iterator[Session]:
        with self._unreachable_is_not_ready(), self._maker() as s:
            yield s

    @contextmanager
    def begin(self) -> Iterator[Session]:
        with self._unreachable_is_not_ready(), self._maker.begin() as s:
            yield s


class MetadataStore:
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

    def _task_row(self, s: Session, name: str) -> TaskRow:
        row = s.scalar(select(TaskRow).where(TaskRow.name == name)) if is_task_name(name) else None
        if row is None:
            raise TaskNotFound(name)
        return row

    def create_task(self, spec: TaskSpec, backbone_id: str, encoder_id: str) -> None:
        with self._session.begin() as s:
            if s.scalar(select(TaskRow.id).where(TaskRow.name == spec.name)) is not None:
                raise TaskExists(spec.name)
            d = spec.to_dict()
            s.add(TaskRow(name=spec.name, template=spec.template, labels=d["labels"], description=spec.description,
                          backbone_id=backbone_id, encoder_id=encoder_id,
                          options={"objective": spec.objective, "prior_correction": spec.prior_correction,
                                   "adapt_prior": spec.adapt_prior}))

    def task(self, name: str) -> TaskInfo:
        with self._session() as s:
            row = self._task_row(s, name)
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
            self._task_row(s, name).tuned = choice.to_dict()

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
            task_id = self._task_row(s, task).id
            q = (select(ExitRecordRow.id, ExitRecordRow.text, ExitRecordRow.label)
                 .where(ExitRecordRow.task_id == task_id, ExitRecordRow.status == COMMITTED)
                 .order_by(ExitRecordRow.created_at, ExitRecordRow.id))
            return [tuple(r) for r in s.execute(q.limit(limit) if limit else q)]  # type: ignore[misc]

    def delete_task(self, name: str) -> None:
        with self._session.begin() as s:
            row = self._task_row(s, name)
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
            task_id = self._task_row(s, task).id
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
            row = IngestBatchRow(task_id=self._task_row(s, task).id, source=source)
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
                self._task_row(s, task)  # TaskNotFound for a made-up name
            return [BatchInfo(b.id, name, b.source, b.status, b.added, b.present, b.rejected, b.started_at,
                              b.finished_at) for b, name in s.execute(query).all()]

    def ingesting(self, task: str, within: timedelta = timedelta(hours=1)) -> bool:
        """An ingest batch of the task is running now (started within `within`: a batch left
        `running` by a process that died must not hold back the task's background work forever)."""
        since = datetime.now(UTC) - within
        with self._session() as s:
            row = self._task_row(s, task)
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
            task_row = self._task_row(s, task)
            labels = task_row.spec().label_names
            rows = [dict(id=r.id, task_id=task_row.id, text_hash=text_hash(r.text), text=r.text, label=r.label,
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

    def _write_features(self, s: Session, records: Sequence[ExitRecord]) -> None:
        """Raw features go in encoded by the task's codec, where it has one (else raw, until it does:
        `learn_codec`); stored rows from another store go in as they are."""
        insert = _dialect_insert(self.engine.dialect.name)
        codecs: dict[str, FeatureCodec | None] = {}
        for i in range(0, len(records), 64):  # bounded statement size (1.5 MB raw for Gemma 3 270M)
            rows = []
            for r in records[i : i + 64]:
                if r.task not in codecs:
                    codecs[r.task] = self._codec(s, self._task_row(s, r.task).id)
                rows.append(_feature_row(r, codecs[r.task]))
            stmt = insert(ExitFeaturesRow).values(rows)
            s.execute(stmt.on_conflict_do_update(index_elements=["record_id"],
                                                 set_={c: stmt.excluded[c] for c in ("exits", "dim", "data", "codec")}))

    def write_features(self, records: Sequence[ExitRecord]) -> None:
        """Add exit features to existing records (the backfill)."""
        with self._session.begin() as s:
            self._write_features(s, records)

    @staticmethod
    def _codec(s: Session, task_id: int) -> FeatureCodec | None:
        data = s.scalar(select(FeatureCodecRow.data).where(FeatureCodecRow.task_id == task_id))
        return None if data is None else FeatureCodec.from_bytes(data)

    def codec(self, task: str) -> FeatureCodec | None:
        """The task's feature codec; None until it has `LEARN_ROWS` records with features."""
        with self._session() as s:
            return self._codec(s, self._task_row(s, task).id)

    def adopt_codec(self, task: str, codec: FeatureCodec) -> None:
        """Give a task another's codec, so that rows copied from it as stored stay readable. Refused
        where the task already has one or holds features."""
        with self._session.begin() as s:
            task_id = self._task_row(s, task).id
            if self._codec(s, task_id) is not None or s.scalar(self._feature_count(task_id)):
                raise StoreMismatch(f"task {task!r} already holds exit features: it keeps its own codec")
            s.add(FeatureCodecRow(task_id=task_id, data=codec.to_bytes()))

    @staticmethod
    def _feature_count(task_id: int, codec: int | None = None) -> Any:
        q = (select(func.count()).select_from(ExitFeaturesRow)
             .join(ExitRecordRow, ExitRecordRow.id == ExitFeaturesRow.record_id)
             .where(ExitRecordRow.task_id == task_id))
        return q if codec is None else q.where(ExitFeaturesRow.codec == codec)

    def compact_features(self, task: str, chunk: int = 500) -> int:
        """Learn the task's codec once it has `LEARN_ROWS` rows of raw features (from the first of them
        in id order: a sample of the records, since ids are hashes) and encode every raw row it holds.
        Returns the rows encoded. Each chunk commits alone: a row is raw or coded, never lost, and
        readers take both."""
        with self._session.begin() as s:
            task_id = self._task_row(s, task).id
            codec = self._codec(s, task_id)
            if codec is None:
                if (s.scalar(self._feature_count(task_id, RAW)) or 0) < LEARN_ROWS:
                    return 0
                rows = s.execute(self._raw_rows(task_id).limit(LEARN_ROWS)).all()
                codec = learn_codec(np.stack([_raw(r) for r in rows]))
                s.add(FeatureCodecRow(task_id=task_id, data=codec.to_bytes()))
        done = 0
        while True:
            with self._session.begin() as s:
                rows = s.execute(self._raw_rows(task_id).limit(chunk)).all()
                if not rows:
                    return done
                for r, data in zip(rows, codec.encode(np.stack([_raw(r) for r in rows]))):
                    s.execute(update(ExitFeaturesRow).where(ExitFeaturesRow.record_id == r.record_id)
                              .values(data=data, codec=CODED))
                done += len(rows)

    @staticmethod
    def _raw_rows(task_id: int) -> Any:
        return (select(ExitFeaturesRow.record_id, ExitFeaturesRow.exits, ExitFeaturesRow.dim, ExitFeaturesRow.data)
                .join(ExitRecordRow, ExitRecordRow.id == ExitFeaturesRow.record_id)
                .where(ExitRecordRow.task_id == task_id, ExitFeaturesRow.codec == RAW)
                .order_by(ExitFeaturesRow.record_id))

    def features(self, task: str) -> tuple[list[str], list[str], FeatureMatrix, FeatureCodec | None]:
        """Committed records that have exit features: ids, labels, features, and the codec they are in.
        With a codec, its int8 codes (raw rows encoded on the way: under 3 KB a record in memory); without
        one yet, the raw float16 features [N, L + 1, H]. Read in chunks into one preallocated matrix,
        so the rows' bytes never pile up beside it."""
        ids: list[str] = []
        labels: list[str] = []
        out: FeatureMatrix | None = None
        with self._session() as s:
            task_id = self._task_row(s, task).id
            codec = self._codec(s, task_id)
            expected = int(s.scalar(self._feature_count(task_id).where(ExitRecordRow.status == COMMITTED)) or 0)
            result = s.execute(
                select(ExitRecordRow.id, ExitRecordRow.label, ExitFeaturesRow.exits, ExitFeaturesRow.dim,
                       ExitFeaturesRow.data, ExitFeaturesRow.codec)
                .join(ExitFeaturesRow, ExitFeaturesRow.record_id == ExitRecordRow.id)
                .where(ExitRecordRow.task_id == task_id, ExitRecordRow.status == COMMITTED)
                .order_by(ExitRecordRow.id).execution_options(yield_per=2000))
            for chunk in result.partitions():
                part = _matrix(chunk, codec)
                if out is None:
                    out = part.empty(max(expected, len(part)))
                elif len(ids) + len(part) > len(out):  # rows committed since the count
                    out = FeatureMatrix.stack([out, part.empty(len(ids) + len(part) - len(out))])
                out.put(len(ids), part)
                ids += [r.id for r in chunk]
                labels += [r.label for r in chunk]
        if out is None:
            return [], [], FeatureMatrix(np.zeros((0, 0, 0), dtype=np.float16)), codec
        return ids, labels, out.head(len(ids)), codec

    def features_of(self, record_ids: Sequence[str]) -> dict[str, StoredFeatures]:
        """The stored feature rows of these records (those that have them), as stored."""
        out: dict[str, StoredFeatures] = {}
        with self._session() as s:
            for i in range(0, len(record_ids), 500):
                for r in s.execute(select(ExitFeaturesRow).where(
                        ExitFeaturesRow.record_id.in_(record_ids[i : i + 500]))).scalars():
                    out[r.record_id] = StoredFeatures(r.codec, r.exits, r.dim, r.data)
        return out

    def without_features(self, task: str) -> list[tuple[str, str, str]]:
        """(id, text, label) of committed records that have no exit features yet."""
        with self._session() as s:
            task_id = self._task_row(s, task).id
            has = select(ExitFeaturesRow.record_id)
            return [tuple(r) for r in s.execute(  # type: ignore[misc]
                select(ExitRecordRow.id, ExitRecordRow.text, ExitRecordRow.label)
                .where(ExitRecordRow.task_id == task_id, ExitRecordRow.status == COMMITTED,
                       ExitRecordRow.id.not_in(has))).all()]

    def save_heads(self, task: str, summary: dict[str, Any], data: bytes) -> int:
        """Store a new version of the task's exit heads; returns its version number."""
        with self._session.begin() as s:
            task_id = self._task_row(s, task).id
            version = int(s.scalar(select(func.max(TaskHeadsRow.version))
                                   .where(TaskHeadsRow.task_id == task_id)) or 0) + 1
            s.add(TaskHeadsRow(task_id=task_id, version=version, summary=summary, data=data))
            return version

    def heads(self, task: str, newer_than: int = 0) -> StoredHeads | None:
        """The task's newest exit heads (None if none, or none newer than `newer_than`)."""
        with self._session() as s:
            task_id = self._task_row(s, task).id
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
            task_id = self._task_row(s, task).id
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
            row = self._task_row(s, task)
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
            row = self._task_row(s, task)
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
            task_id = self._task_row(s, task).id
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
            task_id = self._task_row(s, task).id
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


def _raw(row: Any) -> np.ndarray:
    """A raw feature row's [L + 1, H] float16 array."""
    return np.frombuffer(row.data, dtype=np.float16).reshape(row.exits, row.dim)


def _matrix(rows: Sequence[Any], codec: FeatureCodec | None) -> FeatureMatrix:
    """Feature rows as one matrix: raw float16 without a codec; with one, codes (raw rows encoded)."""
    if codec is None:
        return FeatureMatrix(np.stack([_raw(r) for r in rows]))
    raw = [i for i, r in enumerate(rows) if r.codec == RAW]
    if not raw:
        return codec.parse([r.data for r in rows])
    values = np.empty((len(rows), codec.exits, codec.dim), np.int8)
    scales = np.empty((len(rows), codec.exits), np.float16)
    coded = [i for i, r in enumerate(rows) if r.codec != RAW]
    for at, part in ((raw, codec.quantise(np.stack([_raw(rows[i]) for i in raw]))),
                     (coded, codec.parse([rows[i].data for i in coded]))):
        values[at], scales[at] = part.values, part.scales
    return FeatureMatrix(values, scales)


def _feature_row(record: ExitRecord, codec: FeatureCodec | None) -> dict[str, Any]:
    """A record's exit_features row: stored features as they are, raw ones coded where the task has a codec."""
    f = record.features
    if isinstance(f, StoredFeatures):
        return dict(record_id=record.id, exits=f.exits, dim=f.dim, data=f.data, codec=f.codec)
    assert f is not None
    data, kind = (f.astype(np.float16).tobytes(), RAW) if codec is None else (codec.encode(f[None])[0], CODED)
    return dict(record_id=record.id, exits=f.shape[0], dim=f.shape[1], data=data, codec=kind)
