"""Leases on a task's background work, in the metadata store every replica shares.

Several servers over one database would each fit and tune every task. A lease row per task names the
one replica that may do that work now, until a deadline it pushes forward while it works; a replica
that dies stops pushing, and after the deadline another may take the lease. The claim is one
statement (an insert, or an update of a lapsed row), so of two replicas racing for it exactly one
wins, on SQLite (writes take turns) and Postgres (the loser's update waits on the row lock and then
sees the winner's deadline); RETURNING says which row changed. Deadlines are the replicas' own UTC
clocks: they must agree to well within a lease (NTP does; docs/deployment.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, or_, select, update
from sqlalchemy.engine import Engine

from raee_server.errors import TaskNotFound
from raee_server.stores.sql import JobLeaseRow, _dialect_insert, _now, _Sessions, task_row


@dataclass(frozen=True)
class Lease:
    holder: str
    acquired_at: datetime
    expires_at: datetime


class Leases:
    """The metadata store's lease methods (a base of MetadataStore)."""

    engine: Engine
    _session: _Sessions

    def claim_lease(self, task: str, holder: str, seconds: float) -> bool:
        """Take the task's lease for `seconds` if it is free, lapsed or already `holder`'s."""
        now = _now()
        until = now + timedelta(seconds=seconds)
        with self._session.begin() as s:
            task_id = task_row(s, task).id
            insert = _dialect_insert(self.engine.dialect.name)
            if s.execute(insert(JobLeaseRow).values(task_id=task_id, holder=holder, acquired_at=now,
                                                    expires_at=until)
                         .on_conflict_do_nothing(index_elements=["task_id"])
                         .returning(JobLeaseRow.task_id)).first() is not None:
                return True
            return s.execute(update(JobLeaseRow).where(
                JobLeaseRow.task_id == task_id,
                or_(JobLeaseRow.holder == holder, JobLeaseRow.expires_at < now)).values(
                holder=holder, acquired_at=now, expires_at=until).returning(JobLeaseRow.task_id)).first() is not None

    def renew_lease(self, task: str, holder: str, seconds: float) -> bool:
        """Push `holder`'s deadline `seconds` ahead; False when the lease is no longer its own (it
        lapsed and another replica took it, or the task was deleted)."""
        with self._session.begin() as s:
            try:
                task_id = task_row(s, task).id
            except TaskNotFound:
                return False
            return s.execute(update(JobLeaseRow).where(
                JobLeaseRow.task_id == task_id, JobLeaseRow.holder == holder).values(
                expires_at=_now() + timedelta(seconds=seconds)).returning(JobLeaseRow.task_id)).first() is not None

    def release_lease(self, task: str, holder: str) -> None:
        """Give the lease up (only `holder`'s: a lease another replica took over stays)."""
        with self._session.begin() as s:
            try:
                task_id = task_row(s, task).id
            except TaskNotFound:
                return
            s.execute(delete(JobLeaseRow).where(JobLeaseRow.task_id == task_id, JobLeaseRow.holder == holder))

    def lease(self, task: str) -> Lease | None:
        """Who holds the task's lease and until when (None: nobody; a lapsed lease is shown as it is)."""
        with self._session() as s:
            row = s.scalar(select(JobLeaseRow).where(JobLeaseRow.task_id == task_row(s, task).id))
            if row is None:
                return None
            return Lease(row.holder, _utc(row.acquired_at), _utc(row.expires_at))


def _utc(moment: datetime) -> datetime:
    """SQLite gives back the stored UTC time without its zone."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
