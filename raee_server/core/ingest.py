"""The engine's write side: ingest, backfill, delete and relabel, in the one write order of both
stores (SQL pending, then vectors, then SQL committed; deletes the other way round). `RecordWrites`
is a base of raee_server.core.engine.Engine; `Host` is what it needs of the engine."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import numpy as np

from raee_server.errors import InvalidInput, clip
from raee_server.models.backbone import LabelHead
from raee_server.models.encoders import KeyEncoder
from raee_server.settings import Settings
from raee_server.stores.metadata import MetadataStore
from raee_server.stores.records import ExitRecord, is_record_id, layer_results, record_id
from raee_server.stores.vectors import VectorPoint, VectorStore
from raee_server.types import Example, IngestReport, Rejected, Row, TaskSpec


class Host(Protocol):
    """What the write side reads of the engine (and its own methods, called through it)."""

    metadata: MetadataStore
    vectors: VectorStore
    encoder: KeyEncoder
    settings: Settings

    def _task(self, name: str) -> tuple[TaskSpec, LabelHead]: ...
    def all_exits(self, task: str, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]: ...
    def forget_choice(self, task: str) -> None: ...
    def texts_of(self, task: str, examples: Sequence[Example], field_name: str = "text") -> list[str]: ...
    def keys(self, spec: TaskSpec, texts: Sequence[str]) -> np.ndarray: ...
    def store_records(self, task: str, records: Sequence[ExitRecord], keys: np.ndarray, batch_id: int) -> None: ...
    def ingest(self, task: str, rows: Iterable[Row | Rejected], source: str = "",
               progress: Callable[[int], None] | None = None) -> IngestReport: ...
    def ingest_session(self, task: str, source: str = "",
                       progress: Callable[[int], None] | None = None) -> IngestSession: ...


class RecordWrites:
    def store_records(self: Host, task: str, records: Sequence[ExitRecord], keys: np.ndarray, batch_id: int) -> None:
        """The one write order of both stores: SQL pending, then vectors, then SQL committed.

        A crash in between leaves pending rows that a rerun or `raee-admin doctor --repair` finishes.
        """
        self.metadata.write_pending(task, list(records), batch_id)
        self.vectors.upsert([VectorPoint(rec.id, key, rec.payload()) for rec, key in zip(records, keys)])
        self.metadata.mark_committed([rec.id for rec in records])

    def backfill_features(self: Host, task: str, progress: Callable[[int], None] | None = None,
                          limit: int | None = None) -> int:
        """Exit features for records stored before exit heads existed (at most `limit` of them this
        call): one forward each."""
        missing = self.metadata.without_features(task)[:limit]
        size = self.settings.ingest_batch_size
        for start in range(0, len(missing), size):
            chunk = missing[start : start + size]
            _, features = self.all_exits(task, [text for _, text, _ in chunk])
            self.metadata.write_features([ExitRecord(rid, task, text, label, 0, (), f)
                                          for (rid, text, label), f in zip(chunk, features)])
            if progress:
                progress(len(chunk))
        return len(missing)

    def ingest(
        self: Host,
        task: str,
        rows: Iterable[Row | Rejected],
        source: str = "",
        progress: Callable[[int], None] | None = None,
    ) -> IngestReport:
        """Add labelled rows to the task's exit database; idempotent, and a rerun repairs a crashed one."""
        with self.ingest_session(task, source, progress) as session:
            session.add(rows)
        return session.report

    def ingest_session(
        self: Host, task: str, source: str = "", progress: Callable[[int], None] | None = None
    ) -> IngestSession:
        """An ingest fed in pieces (the gRPC stream hands it one chunk per worker turn)."""
        spec, _ = self._task(task)
        return IngestSession(self, spec, self.metadata.begin_batch(task, source), progress)

    def delete_records(self: Host, task: str, ids: Sequence[str] = (), texts: Sequence[Example] = (),
                       batch: int | None = None) -> list[str]:
        """Delete the task's records named by id, by exact text (or inputs), or by ingest batch; returns the ids
        deleted (names that match no record are not an error: deleting is idempotent). Ingest's order
        reversed: SQL rows marked `deleting`, vectors removed (from the next request on, no search
        finds them), then the rows with their layer results and features. A crash in between leaves
        `deleting` rows that `doctor --repair` finishes. The heads count the delete as an edit."""
        self._task(task)  # TaskNotFound before touching anything
        if not (ids or texts or batch is not None):
            raise InvalidInput("ids: name the records to delete (ids, texts or an ingest batch)", "ids")
        exact = self.texts_of(task, texts, "texts") if texts else []
        check_ids(ids, "ids")
        chosen = self.metadata.mark_deleting(task, [*ids, *(record_id(task, t) for t in exact)], batch)
        if chosen:
            self.vectors.delete_ids(chosen)
            self.metadata.delete_records(chosen)
            self.forget_choice(task)
        return chosen

    def relabel(self: Host, task: str, labels: dict[str, str], source: str = "relabel") -> tuple[int, list[str]]:
        """Give records (by id) new labels; returns how many were relabelled and the ids not found.
        Each is made pending with its new label and ingested again from its text (one forward each:
        the layer results, vector payload and features follow the label), in ingest's order, so a
        crash leaves pending rows that the doctor recomputes. An unknown label refuses the whole call."""
        spec, _ = self._task(task)
        check_ids(list(labels), "records")
        for rid, label in labels.items():
            if label not in spec.label_names:
                raise InvalidInput(f"label: unknown label {clip(label)!r} for record {clip(rid)} "
                                   f"(known: {', '.join(spec.label_names)})")
        found = self.metadata.mark_relabelled(task, labels)
        if found:
            self.ingest(task, [Row(i + 1, text, labels[rid]) for i, (rid, text) in enumerate(found)], source)
        known = {rid for rid, _ in found}
        return len(found), [rid for rid in labels if rid not in known]


def check_ids(ids: Sequence[str], field_name: str) -> None:
    for i, rid in enumerate(ids):
        if not is_record_id(rid):
            where = f"{field_name}[{i}]"
            raise InvalidInput(f"{where}: {clip(rid)} is not a record id (a uuid, as Classify's neighbours "
                               "give it)", where)


def row_problem(spec: TaskSpec, row: Row, max_chars: int) -> str | None:
    """Why a labelled row cannot be ingested into the task (None: it can). A task with several inputs
    names the input at fault ("article2: empty text")."""
    if row.label not in spec.label_names:
        return f"unknown label {row.label!r} (known: {', '.join(spec.label_names)})"
    if spec.several:
        try:
            spec.text_of(row.text, "", max_chars)
        except InvalidInput as exc:
            return str(exc)
    elif len(row.text) > max_chars:
        return f"text of {len(row.text)} characters, over the limit of {max_chars}"
    return None


class IngestSession:
    """One ingest batch: rows validated, deduplicated, and written batch by batch.

    Order per batch: SQL rows written as pending, vectors upserted, rows marked
    committed. A crash leaves pending rows that the next run recomputes.
    """

    def __init__(self, engine: Host, spec: TaskSpec, batch_id: int, progress: Callable[[int], None] | None) -> None:
        self.engine = engine
        self.spec = spec
        self.batch_id = batch_id
        self.progress = progress
        self.report = IngestReport()
        self._seen: set[str] = set()

    def __enter__(self) -> IngestSession:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.finish("failed" if exc_type else "done")

    def finish(self, status: str = "done") -> None:
        r = self.report
        self.engine.metadata.finish_batch(self.batch_id, r.added, r.present, len(r.rejected), status)
        if r.added:  # the task may have enough records for its feature codec now (raee_server.stores.codec)
            self.engine.metadata.compact_features(self.spec.name)
        # the task's cached metadata (records, label mix: `auto`'s fallback, the prior correction) is stale now
        self.engine.forget_choice(self.spec.name)

    def add(self, rows: Iterable[Row | Rejected]) -> None:
        pending: list[Row] = []
        size = self.engine.settings.ingest_batch_size
        for item in rows:
            if isinstance(item, Rejected):
                self.report.rejected.append(item)
                continue
            reason = row_problem(self.spec, item, self.engine.settings.max_text_chars)
            if reason:
                self.report.rejected.append(Rejected(item.line, reason))
                continue
            if self.spec.several:  # the inputs in their one form: the same pair, the same record
                item = Row(item.line, self.spec.text_of(item.text, "", self.engine.settings.max_text_chars),
                           item.label)
            rid = record_id(self.spec.name, item.text)
            if rid in self._seen:
                self.report.present += 1  # a duplicate within this input
                if self.progress:
                    self.progress(1)
                continue
            self._seen.add(rid)
            pending.append(item)
            if len(pending) >= size:
                self._write(pending)
                pending = []
        self._write(pending)

    def _write(self, rows: list[Row]) -> None:
        if not rows:
            return
        engine, spec, report = self.engine, self.spec, self.report
        ids = [record_id(spec.name, r.text) for r in rows]
        done = engine.metadata.committed_ids(spec.name, ids)
        new = [(rid, r) for rid, r in zip(ids, rows) if rid not in done]
        report.present += len(rows) - len(new)
        if new:
            texts = [r.text for _, r in new]
            logits, features = engine.all_exits(spec.name, texts)
            keys = engine.keys(spec, texts)
            records = [
                ExitRecord(rid, spec.name, r.text, r.label, spec.label_index(r.label),
                           layer_results(lg, spec.label_index(r.label)), f)
                for (rid, r), lg, f in zip(new, logits, features)
            ]
            engine.store_records(spec.name, records, keys, self.batch_id)
            report.added += len(records)
        if self.progress:
            self.progress(len(rows))
