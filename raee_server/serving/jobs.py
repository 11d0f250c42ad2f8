"""The operation RPCs, and what each long-running operation does on a server (operations.py runs
them one at a time).

Model work goes through the model worker's queue a chunk at a time (`worker.call`), so requests
interleave with it; work that needs no model (SQL, the vector store, the heads fit) runs in a thread
or in the fit's low-priority child. Each body returns the report `raee-admin <verb> --json` prints
for the same work done locally: the core functions that build it are the ones the CLI calls.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from raee_server.core import auto, evaluation
from raee_server.core import doctor as checks
from raee_server.core.datafile import check_row
from raee_server.core.engine import Engine
from raee_server.errors import InvalidInput, PermissionDenied, clip
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.serving.auth import ADMIN_METHODS
from raee_server.serving.claims import Claims
from raee_server.serving.fitter import fit_heads_in_child
from raee_server.serving.interceptors import Accounting
from raee_server.serving.operations import Body, Operation, Operations, Progress
from raee_server.serving.worker import ModelWorker
from raee_server.settings import Settings
from raee_server.types import Example, Rejected, Row

CHUNK = 16  # rows per model turn: a request waits behind at most this much of an operation


class Jobs:
    """The bodies, bound to the server's worker and settings."""

    def __init__(self, worker: ModelWorker, settings: Settings, replica: str) -> None:
        self.worker = worker
        self.settings = settings
        self.claims = Claims(lambda: self.engine.metadata, replica, settings.lease_seconds)

    @property
    def engine(self) -> Engine:
        if self.worker.engine is None:
            from raee_server.errors import NotReady

            raise NotReady("the model and stores are still loading")
        return self.worker.engine

    async def _exists(self, task: str) -> None:
        await asyncio.to_thread(self.engine.task_info, task)  # TaskNotFound before the work starts

    def fit_heads(self, task: str, full: bool = False, then_tune: bool = True) -> Body:
        async def body(progress: Progress) -> dict[str, Any]:
            await self._exists(task)
            async with self.claims.hold(task):  # one replica at a time fits a task
                return await fit(progress)

        async def fit(progress: Progress) -> dict[str, Any]:
            engine = self.engine
            progress("reading the records' keys")
            handle, name = tempfile.mkstemp(prefix=f".fit-keys-{task}-", suffix=".npz", dir=self.settings.data_dir)
            os.close(handle)  # a name of its own: replicas may share the data directory
            keys = Path(name)
            try:
                await asyncio.to_thread(auto.save_keys, engine.vectors, task, keys)
                summary = await fit_heads_in_child(self.settings.sql_url, task, self.settings.fit_niceness, keys,
                                                   full, progress)
            finally:
                keys.unlink(missing_ok=True)
            engine.forget_heads(task)
            if not then_tune:
                return summary
            progress("choosing auto")
            choice = await asyncio.to_thread(auto.tune, engine, task)
            return {**summary, "auto": choice.to_dict()}

        return body

    def tune(self, task: str, validation: int | None = None, show_all: bool = False) -> Body:
        async def body(progress: Progress) -> dict[str, Any]:
            await self._exists(task)
            async with self.claims.hold(task):
                progress("choosing auto on the task's records")
                return await asyncio.to_thread(auto.tune_report, self.engine, task, validation, show_all)

        return body

    def evaluate(self, task: str, rows: Sequence[Row], policies: Sequence[str], k: int | None) -> Body:
        async def body(progress: Progress) -> dict[str, Any]:
            engine = self.engine
            chosen = await asyncio.to_thread(evaluation.plan, engine, task, policies, k)
            need_k = max(r.k for r in chosen)
            measured: list[evaluation.Measured] = []
            progress("measuring rows", done=0, total=len(rows))
            for start in range(0, len(rows), CHUNK):
                part = rows[start:start + CHUNK]

                def chunk(e: Engine, part: Sequence[Row] = part) -> list[evaluation.Measured]:
                    return evaluation.measure(e, task, part, need_k)

                measured += await self.worker.call(chunk)
                progress(advance=len(part))
            found = await asyncio.to_thread(evaluation.report, engine, task, chosen, measured, k)
            return dict(found.to_dict())

        return body

    def backfill_features(self, task: str) -> Body:
        async def body(progress: Progress) -> dict[str, Any]:
            engine = self.engine
            missing = len(await asyncio.to_thread(engine.metadata.without_features, task))
            progress("computing exit features", done=0, total=missing)
            done = 0
            while True:
                added: int = await self.worker.call(lambda e: e.backfill_features(task, limit=CHUNK))
                if not added:
                    return {"task": task, "records": done}
                done += added
                progress(done=done, total=max(missing, done))

        return body

    def check_records(self, task: str, repair: bool) -> Body:
        async def body(progress: Progress) -> dict[str, Any]:
            engine = self.engine
            progress("comparing SQL with the vector store")
            diagnosis = await asyncio.to_thread(checks.diagnose, engine, task)
            first = diagnosis.summary()
            if not diagnosis.healthy and repair:
                progress("repairing")
                found = diagnosis
                diagnosis = await self.worker.call(lambda e: checks.repair(e, found))
            return {"task": task, "found": first, "healthy": diagnosis.healthy, "now": diagnosis.summary()}

        return body

    def build_index(self) -> Body:
        async def body(progress: Progress) -> dict[str, Any]:
            progress("building the vector store's indexes")
            seconds = await self.worker.call(lambda e: e.build_index())
            return {"points": await asyncio.to_thread(self.engine.vectors.count), "seconds": seconds}

        return body


# The RPC that starts each kind: its key rule (auth.py) is also the rule to cancel one.
START_METHODS = {"fit-heads": "FitHeads", "tune": "Tune", "evaluate": "Evaluate",
                 "backfill-features": "BackfillFeatures", "check-records": "CheckRecords", "build-index": "BuildIndex"}


class OperationRpcs:
    """RaeeService's operation RPCs (mixed into its servicer): a start converts its request into a
    body and queues it; reads and cancels are checked against the key rule of the RPC that started it."""

    operations: Operations
    jobs: Jobs
    accounting: Accounting
    settings: Settings

    async def _started(self, kind: str, task: str, body: Body) -> pb.Operation:
        """Queue the operation; a task that does not exist is refused now (NOT_FOUND), not later by the
        operation, so a made-up name never counts as a task (the metrics label only real ones)."""
        if kind != "build-index":  # every other kind works on a task, named or not
            await asyncio.to_thread(self.jobs.engine.task_info, task)
        return self.operations.start(kind, task, body).to_proto()

    async def FitHeads(self, request: pb.FitHeadsRequest, context: Any) -> pb.FitHeadsResponse:
        return pb.FitHeadsResponse(operation=await self._started(
            "fit-heads", request.task, self.jobs.fit_heads(request.task, request.full)))

    async def Tune(self, request: pb.TuneRequest, context: Any) -> pb.TuneResponse:
        body = self.jobs.tune(request.task, request.validation or None, request.all_candidates)
        return pb.TuneResponse(operation=await self._started("tune", request.task, body))

    async def Evaluate(self, request: pb.EvaluateRequest, context: Any) -> pb.EvaluateResponse:
        info = await asyncio.to_thread(self.jobs.engine.task_info, request.task)
        labels = {label.name for label in info.spec.labels}
        rows = []
        for i, example in enumerate(request.examples):
            given: Example = dict(example.inputs) if example.inputs else example.text
            row = check_row(i, "inputs" if example.inputs else example.text, example.label)  # the inputs: below
            if isinstance(row, Rejected):
                raise InvalidInput(f"examples[{i}]: {row.reason}", f"examples[{i}]")
            if example.inputs and example.text:
                raise InvalidInput(f"examples[{i}]: give text or inputs, not both", f"examples[{i}]")
            if row.label not in labels:
                raise InvalidInput(f"examples[{i}].label: {clip(row.label)} is not a label of task "
                                   f"{clip(request.task)}", f"examples[{i}].label")
            where = f"examples[{i}].inputs" if isinstance(given, dict) else f"examples[{i}].text"
            rows.append(Row(i, info.spec.text_of(given, where, self.settings.max_text_chars), row.label))
        if not rows:
            raise InvalidInput("examples: no labelled example given", "examples")
        body = self.jobs.evaluate(request.task, rows, list(request.policies) or ["auto"], request.k or None)
        return pb.EvaluateResponse(operation=await self._started("evaluate", request.task, body))

    async def BackfillFeatures(self, request: pb.BackfillFeaturesRequest, context: Any) -> pb.BackfillFeaturesResponse:
        body = self.jobs.backfill_features(request.task)
        return pb.BackfillFeaturesResponse(operation=await self._started("backfill-features", request.task, body))

    async def CheckRecords(self, request: pb.CheckRecordsRequest, context: Any) -> pb.CheckRecordsResponse:
        body = self.jobs.check_records(request.task, request.repair)
        return pb.CheckRecordsResponse(operation=await self._started("check-records", request.task, body))

    async def BuildIndex(self, request: pb.BuildIndexRequest, context: Any) -> pb.BuildIndexResponse:
        return pb.BuildIndexResponse(operation=await self._started("build-index", "", self.jobs.build_index()))

    def _visible(self, context: Any, op: Operation, to_cancel: bool = False) -> Operation:
        """A key that may use the task reads its operations; cancelling one, or reading an admin
        operation, needs what starting it needs."""
        start = START_METHODS[op.kind]
        method = start if to_cancel or start in ADMIN_METHODS else "GetOperation"
        self.accounting.authorize(context, method, op.task or None)
        return op

    async def GetOperation(self, request: pb.GetOperationRequest, context: Any) -> pb.GetOperationResponse:
        op = self._visible(context, self.operations.get(request.name))
        return pb.GetOperationResponse(operation=op.to_proto())

    async def ListOperations(self, request: pb.ListOperationsRequest, context: Any) -> pb.ListOperationsResponse:
        def visible(op: Operation) -> bool:
            if request.task and op.task != request.task:
                return False
            try:
                self._visible(context, op)
            except PermissionDenied:
                return False
            return True

        return pb.ListOperationsResponse(operations=[op.to_proto() for op in self.operations.list(visible)])

    async def CancelOperation(self, request: pb.CancelOperationRequest, context: Any) -> pb.CancelOperationResponse:
        op = self._visible(context, self.operations.get(request.name), to_cancel=True)
        return pb.CancelOperationResponse(operation=self.operations.cancel(op.name).to_proto())
