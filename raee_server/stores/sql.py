"""The metadata store's SQL side: its tables (the schema Alembic migrates, migrations/) and how it
connects (one `open_engine` for the store, `raee-admin migrate` and Alembic alike; sessions that turn
a lost connection into the service's NotReady)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from raee_server.errors import NotReady, TaskNotFound
from raee_server.stores.codec import RAW
from raee_server.types import DEFAULT_RETRIEVAL_KEY, TEXT_INPUT, Label, TaskSpec, is_task_name

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
            inputs=tuple(options.get("inputs") or (TEXT_INPUT,)),
            retrieval_key=str(options.get("retrieval_key") or DEFAULT_RETRIEVAL_KEY),
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
    """One fitted set of exit heads of a task (a version); the newest is served. A version number is
    unique per task, so two replicas that fit at once cannot both store version N."""

    __tablename__ = "task_heads"
    __table_args__ = (Index("uq_task_heads_version", "task_id", "version", unique=True),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    fitted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    summary: Mapped[dict] = mapped_column(JSON)  # records, C and accuracy per exit
    data: Mapped[bytes] = mapped_column(LargeBinary)  # npz: weights, scaling, out-of-fold judgments


class JobLeaseRow(Base):
    """A replica's claim on a task's background work (exit-head fit and `auto` tune): one holder until
    `expires_at`, renewed while the work runs; once it lapses (the holder died) another replica may
    take it (raee_server.stores.leases)."""

    __tablename__ = "job_leases"
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True)
    holder: Mapped[str] = mapped_column(String(200))
    acquired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=_now)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


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


def task_row(s: Session, name: str) -> TaskRow:
    """The task's row, or TaskNotFound (a name that cannot be a task's is not looked up)."""
    row = s.scalar(select(TaskRow).where(TaskRow.name == name)) if is_task_name(name) else None
    if row is None:
        raise TaskNotFound(name)
    return row
