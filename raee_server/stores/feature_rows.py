"""The exit features' side of the metadata store: one row per record, raw float16 until the task has
learned its codec (raee_server.stores.codec), int8 codes after; written with the records' rows, read
by the heads fit in chunks. A base of MetadataStore, which gives it its engine and sessions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from raee_server.errors import StoreMismatch
from raee_server.stores.codec import CODED, LEARN_ROWS, RAW, FeatureCodec, FeatureMatrix, learn_codec
from raee_server.stores.records import ExitRecord, StoredFeatures
from raee_server.stores.sql import (
    COMMITTED,
    ExitFeaturesRow,
    ExitRecordRow,
    FeatureCodecRow,
    _dialect_insert,
    _Sessions,
    task_row,
)


class FeatureRows:
    engine: Engine
    _session: _Sessions

    def _write_features(self, s: Session, records: Sequence[ExitRecord]) -> None:
        """Raw features go in encoded by the task's codec, where it has one (else raw, until it does:
        `learn_codec`); stored rows from another store go in as they are."""
        insert = _dialect_insert(self.engine.dialect.name)
        codecs: dict[str, FeatureCodec | None] = {}
        for i in range(0, len(records), 64):  # bounded statement size (1.5 MB raw for Gemma 3 270M)
            rows = []
            for r in records[i : i + 64]:
                if r.task not in codecs:
                    codecs[r.task] = self._codec(s, task_row(s, r.task).id)
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
            return self._codec(s, task_row(s, task).id)

    def adopt_codec(self, task: str, codec: FeatureCodec) -> None:
        """Give a task another's codec, so that rows copied from it as stored stay readable. Refused
        where the task already has one or holds features."""
        with self._session.begin() as s:
            task_id = task_row(s, task).id
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
            task_id = task_row(s, task).id
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
            task_id = task_row(s, task).id
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
            task_id = task_row(s, task).id
            has = select(ExitFeaturesRow.record_id)
            return [tuple(r) for r in s.execute(  # type: ignore[misc]
                select(ExitRecordRow.id, ExitRecordRow.text, ExitRecordRow.label)
                .where(ExitRecordRow.task_id == task_id, ExitRecordRow.status == COMMITTED,
                       ExitRecordRow.id.not_in(has))).all()]


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
