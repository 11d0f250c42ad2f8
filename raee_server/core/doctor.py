"""Consistency between the SQL record and the vector store, and its repair.

An ingest writes SQL rows as pending, upserts vectors, then marks the rows
committed; a delete marks rows deleting, removes their vectors, then the rows.
A crash can leave pending rows (with or without their vectors) or deleting
rows (with or without theirs); other accidents can leave committed rows without
vectors, or vectors without rows. The doctor finds all four; repair recomputes
pending rows and rows without vectors from the texts SQL holds, finishes the
deletes, and deletes orphan vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raee_server.core.engine import Engine
from raee_server.types import Row


@dataclass
class Diagnosis:
    task: str
    committed: int
    vectors: int
    pending: list[str] = field(default_factory=list)  # SQL rows of an unfinished ingest
    deleting: list[str] = field(default_factory=list)  # SQL rows of an unfinished delete
    missing_vectors: list[str] = field(default_factory=list)  # committed in SQL, absent from the vector store
    orphan_vectors: list[str] = field(default_factory=list)  # in the vector store, unknown to SQL
    without_features: int = 0  # committed records with no exit features (from before exit heads)

    @property
    def healthy(self) -> bool:
        return not (self.pending or self.deleting or self.missing_vectors or self.orphan_vectors
                    or self.without_features)

    def summary(self) -> str:
        state = "consistent" if self.healthy else "INCONSISTENT"
        return (f"{self.task}: {state}: {self.committed} committed rows, {self.vectors} vectors, "
                f"{len(self.pending)} pending, {len(self.deleting)} deleting, "
                f"{len(self.missing_vectors)} missing vectors, "
                f"{len(self.orphan_vectors)} orphan vectors, {self.without_features} without exit features")


def diagnose(engine: Engine, task: str) -> Diagnosis:
    states = engine.metadata.record_states(task)
    vectors = engine.vectors.ids(task)
    committed = {rid for rid, s in states.items() if s == "committed"}
    return Diagnosis(
        task=task,
        committed=len(committed),
        vectors=len(vectors),
        pending=sorted(rid for rid, s in states.items() if s == "pending"),
        deleting=sorted(rid for rid, s in states.items() if s == "deleting"),
        missing_vectors=sorted(committed - vectors),
        orphan_vectors=sorted(vectors - set(states)),
        without_features=len(engine.metadata.without_features(task)),
    )


def repair(engine: Engine, diagnosis: Diagnosis) -> Diagnosis:
    """Recompute pending rows and rows without vectors, finish deletes, delete orphan vectors; returns a
    new diagnosis."""
    engine.vectors.delete_ids(diagnosis.orphan_vectors + diagnosis.deleting)
    engine.metadata.delete_records(diagnosis.deleting)
    redo = diagnosis.pending + diagnosis.missing_vectors
    if redo:
        engine.metadata.mark_pending(redo)
        rows = [Row(i, text, label) for i, (text, label) in enumerate(engine.metadata.examples(redo))]
        engine.ingest(diagnosis.task, rows, source="doctor --repair")
    engine.backfill_features(diagnosis.task)  # records from before exit heads (or whose features were lost)
    return diagnose(engine, diagnosis.task)
