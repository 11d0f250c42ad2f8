"""This replica's leases on tasks' background work (raee_server.stores.leases), held while it works.

Replicas over one database take turns at a task's fit and tune: a job takes the task's lease first,
and a renewer pushes its deadline forward every third of a lease while the job runs. Holds nest
within a replica (the background loop holds a task's lease around its steps, and each step's
operation holds it again), so they share one lease. If a renewal finds the lease gone (this replica
stalled past the deadline and another took the work over), the holders fail with RunningElsewhere:
two fits must not race to store the task's next heads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from raee_server.errors import NotReady, RunningElsewhere
from raee_server.settings import Settings
from raee_server.stores.metadata import MetadataStore

log = logging.getLogger(__name__)
T = TypeVar("T")


def replica_name(settings: Settings, program: str = "") -> str:
    """RAEE_REPLICA_ID, else host, process and a random suffix: unique among the replicas of now."""
    return settings.replica_id or f"{program}{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def holding(metadata: MetadataStore, task: str, holder: str, seconds: float, work: Callable[[], T]) -> T:
    """`work()` while holding the task's lease, from synchronous code: raee-admin's local fit and tune
    against a database that servers may share. RunningElsewhere if one of them holds it now. (A work
    that loses the lease midway still ends in its thread: a local run is not cancelled.)"""

    async def run() -> T:
        async with Claims(lambda: metadata, holder, seconds).hold(task):
            return await asyncio.to_thread(work)

    return asyncio.run(run())


@dataclass
class _Held:
    holders: Counter[asyncio.Task[Any]] = field(default_factory=Counter)  # a task may hold it twice
    renewer: asyncio.Task[None] | None = None
    lost: bool = False


class Claims:
    """Take, renew and give back this replica's task leases."""

    def __init__(self, metadata: Callable[[], MetadataStore], replica: str, seconds: float) -> None:
        self._metadata = metadata  # the engine's store, once the engine is loaded
        self.replica = replica
        self.seconds = seconds
        self._held: dict[str, _Held] = {}
        self._lock = asyncio.Lock()  # one claim at a time: two local holders must not both insert

    def holds(self, task: str) -> bool:
        return task in self._held

    @asynccontextmanager
    async def hold(self, task: str) -> AsyncIterator[None]:
        """The task's lease for as long as the block runs; RunningElsewhere if another replica has it."""
        me = asyncio.current_task()
        assert me is not None
        async with self._lock:
            held = self._held.get(task)
            if held is None:
                await self._claim(task)
                held = self._held[task] = _Held()
                held.renewer = asyncio.create_task(self._renew(task, held))
            held.holders[me] += 1
        try:
            yield
        except asyncio.CancelledError:
            if not held.lost:
                raise
            me.uncancel()  # the renewer's cancel, not the caller's: fail instead
            raise RunningElsewhere(f"this replica ({self.replica}) lost its lease on task {task!r} (another replica "
                                   "took its background work over); stopped", self.seconds) from None
        finally:
            held.holders[me] -= 1
            if held.holders[me] == 0:
                del held.holders[me]
            if not held.holders:
                await self._let_go(task, held)

    async def _claim(self, task: str) -> None:
        store = self._metadata()
        if await asyncio.to_thread(store.claim_lease, task, self.replica, self.seconds):
            return
        lease = await asyncio.to_thread(store.lease, task)
        left = max(0.0, (lease.expires_at - datetime.now(UTC)).total_seconds()) if lease else 0.0
        holder = lease.holder if lease else "another replica"
        raise RunningElsewhere(f"replica {holder} is fitting or tuning task {task!r} now (its lease ends in "
                               f"{left:.0f} s unless it renews it); its new heads and choice reach every replica",
                               left or 1.0)

    async def _renew(self, task: str, held: _Held) -> None:
        store = self._metadata()
        while True:
            await asyncio.sleep(self.seconds / 3)
            try:
                ours = await asyncio.to_thread(store.renew_lease, task, self.replica, self.seconds)
            except NotReady:  # the database is unreachable: try again; the lease may lapse meanwhile
                log.warning("cannot renew the lease on %s's background work: the database is unreachable", task)
                continue
            if not ours:
                log.warning("lost the lease on %s's background work to another replica: stopping it here", task)
                held.lost = True
                for holder in held.holders:
                    holder.cancel()
                return

    async def _let_go(self, task: str, held: _Held) -> None:
        if self._held.get(task) is held:
            del self._held[task]
        if held.renewer is not None and held.renewer is not asyncio.current_task():
            held.renewer.cancel()
        if held.lost:
            return
        try:
            await asyncio.to_thread(self._metadata().release_lease, task, self.replica)
        except Exception:  # an outage: the lease lapses by itself
            log.warning("cannot release the lease on %s; it lapses in %.0f s", task, self.seconds, exc_info=True)
