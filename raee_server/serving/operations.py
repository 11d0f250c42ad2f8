"""Long-running operations (AIP-151 style): the work a start RPC hands over, run one at a time.

An operation is queued when started and runs when the ones before it are done: one at a time, so
two fits never race for the next heads version and the cores serve requests first (a body sends its
model work through the request queue a chunk at a time; jobs.py holds the bodies). The server's own
background refits and retunes are operations too, so they queue with the ones callers start and the
console shows them. Cancelling a queued operation drops it; cancelling a running one cancels its
body at its next await. The last KEEP finished ones stay to be read; all are in memory only.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, struct_pb2
from google.rpc import status_pb2

from raee_server.errors import OperationNotFound
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.serving.status import status_of

log = logging.getLogger(__name__)
KEEP = 200  # finished operations kept to be read
State = pb.Operation.State


def _time(seconds: float | None) -> str:
    return "" if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


@dataclass
class Operation:
    name: str
    kind: str
    task: str
    created: float
    state: int = State.STATE_QUEUED
    done_units: int = 0
    total_units: int = 0
    message: str = "queued"
    started: float | None = None
    ended: float | None = None
    error: status_pb2.Status | None = None
    response: dict[str, Any] | None = None
    cancel_requested: bool = False

    @property
    def done(self) -> bool:
        return self.state in (State.STATE_SUCCEEDED, State.STATE_FAILED, State.STATE_CANCELLED)

    def to_proto(self) -> pb.Operation:
        message = pb.Operation(
            name=self.name, kind=self.kind, task=self.task, state=self.state,  # type: ignore[arg-type]
            done=self.done, progress_done=self.done_units, progress_total=self.total_units,
            progress_message=self.message, create_time=_time(self.created), start_time=_time(self.started),
            end_time=_time(self.ended))
        if self.error is not None:
            message.error.CopyFrom(self.error)
        if self.response is not None:
            response = struct_pb2.Struct()
            json_format.ParseDict(self.response, response)
            message.response.CopyFrom(response)
        return message


class Progress:
    """What a running body reports: units done of a total, and a line on what it does now."""

    def __init__(self, operation: Operation) -> None:
        self.operation = operation

    def __call__(self, message: str | None = None, done: int | None = None, total: int | None = None,
                 advance: int = 0) -> None:
        op = self.operation
        if message is not None:
            op.message = message
        if total is not None:
            op.total_units = total
        if done is not None:
            op.done_units = done
        op.done_units += advance


Body = Callable[[Progress], Coroutine[Any, Any, dict[str, Any]]]


class Operations:
    """The server's operations: start, read, list, cancel, and the runner that works through them."""

    def __init__(self) -> None:
        self._all: dict[str, Operation] = {}  # in start order
        self._queue: asyncio.Queue[tuple[Operation, Body]] = asyncio.Queue()
        self._finished: dict[str, asyncio.Event] = {}
        self._running: asyncio.Task[dict[str, Any]] | None = None
        self._runner: asyncio.Task[None] | None = None

    def start(self, kind: str, task: str, body: Body) -> Operation:
        if self._runner is None:
            self._runner = asyncio.create_task(self._run())
        op = Operation(f"op-{secrets.token_hex(8)}", kind, task, time.time())
        self._all[op.name] = op
        self._finished[op.name] = asyncio.Event()
        self._queue.put_nowait((op, body))
        self._forget_old()
        log.info("operation %s (%s %s) queued", op.name, kind, task or "-")
        return op

    def get(self, name: str) -> Operation:
        op = self._all.get(name)
        if op is None:
            raise OperationNotFound(name)
        return op

    def list(self, visible: Callable[[Operation], bool] = lambda op: True) -> list[Operation]:
        return [op for op in reversed(self._all.values()) if visible(op)]

    def busy(self, kind: str, task: str) -> bool:
        """An operation of this kind on this task is queued or running (the background loop starts no twin)."""
        return any(op.kind == kind and op.task == task and not op.done for op in self._all.values())

    def cancel(self, name: str) -> Operation:
        op = self.get(name)
        if op.done:
            return op
        op.cancel_requested = True
        if op.state == State.STATE_QUEUED:
            self._end(op, State.STATE_CANCELLED, status_pb2.Status(code=1, message="cancelled before it started"))
        elif self._running is not None:
            self._running.cancel()
        return op

    async def wait(self, op: Operation) -> Operation:
        await self._finished[op.name].wait()
        return op

    async def close(self) -> None:
        tasks = [t for t in (self._running, self._runner) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    def _end(self, op: Operation, state: int, error: status_pb2.Status | None = None,
             response: dict[str, Any] | None = None) -> None:
        op.state, op.error, op.response, op.ended = state, error, response, time.time()
        op.message = "done" if state == State.STATE_SUCCEEDED else "failed" if state == State.STATE_FAILED \
            else "cancelled"
        self._finished[op.name].set()
        log.info("operation %s (%s %s) %s", op.name, op.kind, op.task or "-", State.Name(state))

    def _forget_old(self) -> None:
        finished = [name for name, op in self._all.items() if op.done]
        for name in finished[: max(0, len(finished) - KEEP)]:
            del self._all[name]
            del self._finished[name]

    async def _run(self) -> None:
        while True:
            op, body = await self._queue.get()
            if op.done:  # cancelled while queued
                continue
            op.state, op.started, op.message = State.STATE_RUNNING, time.time(), "running"
            self._running = asyncio.create_task(body(Progress(op)))
            try:
                response = await asyncio.shield(self._running)
            except asyncio.CancelledError:
                if not op.cancel_requested:  # the server is stopping
                    self._running.cancel()
                    self._end(op, State.STATE_CANCELLED, status_pb2.Status(code=1, message="the server stopped"))
                    raise
                self._end(op, State.STATE_CANCELLED, status_pb2.Status(code=1, message="cancelled"))
            except Exception as exc:
                code, message = status_of(exc)
                if code.name == "INTERNAL":
                    log.exception("operation %s (%s %s) failed", op.name, op.kind, op.task)
                self._end(op, State.STATE_FAILED, status_pb2.Status(code=code.value[0], message=message))
            else:
                self._end(op, State.STATE_SUCCEEDED, response=response)
            finally:
                self._running = None
