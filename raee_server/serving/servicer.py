"""The RaeeService servicer: what each RPC does, converting protobuf to engine calls. ObservedCalls
(interceptors.py) checks keys, counts, logs and maps failures to codes around it; the operation RPCs
are jobs.py's; server.py runs it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence

import grpc
from google.rpc import status_pb2

from raee_server.core.datafile import check_row
from raee_server.core.engine import Engine
from raee_server.core.ingest import IngestSession
from raee_server.errors import InvalidInput, Unauthenticated, clip
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.protos.raee.v1 import raee_pb2_grpc as pb_grpc
from raee_server.serving.claims import replica_name
from raee_server.serving.interceptors import (
    Accounting,
    Undecodable,
    ended_code,
    expired,
    failure,
    key_of,
)
from raee_server.serving.jobs import Jobs, OperationRpcs
from raee_server.serving.metrics import RecentAnswers
from raee_server.serving.operations import Operations
from raee_server.serving.worker import ModelWorker
from raee_server.settings import Settings
from raee_server.stores.records import record_id
from raee_server.types import (
    DEFAULT_RETRIEVAL_KEY,
    TEXT_INPUT,
    Example,
    Label,
    Prediction,
    Rejected,
    Row,
    TaskSpec,
    pack_inputs,
    truncate,
)

log = logging.getLogger(__name__)


DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000  # ListTasks


def page_token(last_name: str) -> str:
    """An opaque ListTasks page token: the last name of the page (tasks are listed by name)."""
    return base64.urlsafe_b64encode(last_name.encode()).decode()


def page_token_name(token: str) -> str | None:
    if not token:
        return None
    try:
        name = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True).decode()
        if not name:
            raise ValueError("empty")
        return name
    except (ValueError, UnicodeError):
        raise InvalidInput("page_token: not a token this server gave (pass next_page_token as it came)",
                           field="page_token") from None


def example_of(text: str, inputs: Mapping[str, str]) -> Example:
    """A request's one example: its text, or (a task with several inputs) its inputs by name."""
    if inputs and text:
        raise InvalidInput("text: give text or inputs, not both", "text")
    return dict(inputs) if inputs else text


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def to_response(p: Prediction, labels: Sequence[str], queued_since: float, started: float,
                with_neighbours: bool) -> pb.ClassifyResponse:
    now = time.monotonic()
    t = p.timings_us
    response = pb.ClassifyResponse(
        label=p.label,
        scores=[pb.LabelScore(label=name, score=s) for name, s in zip(labels, p.scores)],
        exit_layer=p.exit_layer,
        depth=p.depth,
        policy=p.policy,
        answered_by=p.answered_by,
        coverage="" if p.covered is None else "inside" if p.covered else "outside",
        timings=pb.Timings(
            queue_us=max(0, int((now - queued_since) * 1e6) - sum(t.values())),
            encode_us=t.get("encode_us", 0), retrieve_us=t.get("retrieve_us", 0),
            forward_us=t.get("forward_us", 0), total_us=int((now - started) * 1e6),
        ),
    )
    if with_neighbours:
        response.neighbours.extend(
            pb.Neighbour(id=n.id, similarity=n.similarity, label=n.label,
                         exit_layers=[l for l, _ in n.exits], exit_probabilities=[q for _, q in n.exits])
            for n in p.neighbours
        )
    return response


class RaeeServicer(OperationRpcs, pb_grpc.RaeeServiceServicer):
    """What each RPC does. ObservedCalls (interceptors.py) wraps the unary and client-streaming ones:
    key checks, metrics, the access log and the status code of a failure are not repeated here."""

    def __init__(self, worker: ModelWorker, settings: Settings, accounting: Accounting) -> None:
        self.worker = worker
        self.metrics = accounting.metrics
        self.settings = settings
        self.accounting = accounting
        self.keys = accounting.keys
        self.recent = RecentAnswers()
        self.operations = Operations()
        self.replica = replica_name(settings)
        self.jobs = Jobs(worker, settings, self.replica)

    async def answer(self, task: str, texts: list[Example], options: pb.ClassifyOptions,
                        context: grpc.aio.ServicerContext, method: str | None = None) -> list[pb.ClassifyResponse]:
        started = time.monotonic()
        if method:  # a stream: each request names its own task
            self.accounting.authorize(context, method, task)
        if options.truncate:
            texts = [truncate(t, self.settings.max_text_chars) for t in texts]
        predictions, queued_since = await self.worker.classify(
            task, texts, options.policy or None, options.k or None, _deadline(context))
        responses = [to_response(p, p.labels, queued_since, started, options.return_neighbours) for p in predictions]
        for r, p in zip(responses, predictions):
            if self.metrics.exit_layer is not None:
                self.metrics.exit_layer.labels(task).observe(r.exit_layer)
            self.metrics.answered(task, p.answered_by, p.covered)
            self.recent.add(task, r.exit_layer, r.timings.total_us / 1000, p.answered_by, p.covered)
        engine = self.worker.engine  # answered: the engine is loaded
        tracker = engine.active_prior(task) if engine is not None else None
        if tracker is not None:  # the time first: the estimate read after it is at least that new
            updated = tracker.updated_unix
            self.metrics.set_traffic_prior(task, tracker.labels, [float(x) for x in tracker.estimate], updated)
        return responses

    # -- RPCs --------------------------------------------------------------------

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        response = (await self.answer(request.task, [example_of(request.text, request.inputs)], request.options,
                                      context))[0]
        response.request_id = request.request_id
        return response

    async def ClassifyBatch(self, request: pb.ClassifyBatchRequest,
                            context: grpc.aio.ServicerContext) -> pb.ClassifyBatchResponse:
        if request.texts and request.inputs:
            raise InvalidInput("texts: give texts or inputs, not both", "texts")
        examples: list[Example] = list(request.texts) or [dict(row.values) for row in request.inputs]
        if not examples:
            raise InvalidInput("texts: no text given")
        if len(examples) > self.settings.max_batch_texts:
            raise InvalidInput(f"texts: {len(examples)} texts, over the limit of "
                               f"{self.settings.max_batch_texts} per request (RAEE_MAX_BATCH_TEXTS)")
        return pb.ClassifyBatchResponse(results=await self.answer(request.task, examples, request.options, context))

    async def ClassifyStream(self, request_iterator: AsyncIterator[pb.ClassifyStreamRequest | Undecodable],
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ClassifyStreamResponse]:
        # Requests are submitted as they arrive (so they batch with each other and with other
        # callers); answers are written in request order. A failing request gets its own error
        # response and the stream goes on. When the call ends (cancelled, deadline), the work of
        # unanswered requests is cancelled: the worker drops it at its next chunk.
        if self.keys is not None:  # the caller is known for the whole stream; each task is checked per message
            try:
                self.keys.authenticate(key_of(context))
            except Unauthenticated as exc:
                self.accounting.count("ClassifyStream", None, grpc.StatusCode.UNAUTHENTICATED, 0.0)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        pending: asyncio.Queue[asyncio.Task[pb.ClassifyStreamResponse] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                index = 0
                async for request in request_iterator:
                    pending.put_nowait(asyncio.create_task(self._stream_one(index, request, context)))
                    index += 1
            finally:
                pending.put_nowait(None)

        reader = asyncio.create_task(read())
        answering: asyncio.Task[pb.ClassifyStreamResponse] | None = None
        try:
            while (answering := await pending.get()) is not None:
                yield await answering
            await reader  # a failure to read the stream itself (not a bad message) ends the call
        finally:
            reader.cancel()
            while not pending.empty():
                if (left := pending.get_nowait()) is not None:
                    left.cancel()
            if answering is not None:
                answering.cancel()

    async def _stream_one(self, index: int, request: pb.ClassifyStreamRequest | Undecodable,
                          context: grpc.aio.ServicerContext) -> pb.ClassifyStreamResponse:
        """One request of a stream: its answer, or a response that carries its error."""
        start = time.monotonic()
        task = None if isinstance(request, Undecodable) else request.task
        code = grpc.StatusCode.UNKNOWN
        try:
            if isinstance(request, Undecodable):
                raise request.error("ClassifyStreamRequest")
            result = (await self.answer(request.task, [example_of(request.text, request.inputs)], request.options,
                                        context, "ClassifyStream"))[0]
            result.request_id = request.request_id
            code = grpc.StatusCode.OK
            return pb.ClassifyStreamResponse(index=index, request_id=request.request_id, result=result)
        except asyncio.CancelledError:
            code = ended_code(context)
            raise
        except Exception as exc:
            code, message = failure(exc, f"ClassifyStream request {index}")
            return pb.ClassifyStreamResponse(
                index=index, request_id="" if task is None else request.request_id,  # type: ignore[union-attr]
                error=status_pb2.Status(code=code.value[0], message=message))
        finally:
            self.accounting.count("ClassifyStream", task, code, time.monotonic() - start)

    async def Ingest(self, request_iterator: AsyncIterator[pb.IngestRequest | Undecodable],
                     context: grpc.aio.ServicerContext) -> pb.IngestResponse:
        """Chunks are written as messages arrive; the first message names the task and its key is
        checked then. Contract on cancel/deadline: what was written stays, and the batch row says
        `cancelled` with its counts (a re-send adds only the missing rows)."""
        task = ""
        session: IngestSession | None = None
        status = "failed"
        size = self.settings.ingest_chunk_rows  # one worker turn each: a Classify waits at most one
        seen = 0
        try:
            async for message in request_iterator:
                if isinstance(message, Undecodable):
                    raise message.error("IngestRequest")
                if session is None:
                    if not message.task:
                        raise InvalidInput("task: the first Ingest message must name the task")
                    task = message.task
                    self.accounting.authorize(context, "Ingest", task)

                    def open_session(e: Engine, name: str = task) -> IngestSession:
                        return e.ingest_session(name, source="grpc")

                    session = await self.worker.call(open_session)
                elif message.task and message.task != task:
                    raise InvalidInput(
                        f"task: one Ingest call takes one task ({clip(task)}, then {clip(message.task)})")
                rows = [check_row(seen + i, ex.text, ex.label) if not ex.inputs else
                        Rejected(seen + i, "give text or inputs, not both") if ex.text else
                        check_row(seen + i, pack_inputs(dict(ex.inputs)), ex.label)
                        for i, ex in enumerate(message.examples)]
                seen += len(rows)
                for start in range(0, len(rows), size):  # one worker turn per chunk: Classify interleaves

                    def add_chunk(e: Engine, s: IngestSession = session,
                                  c: list[Row | Rejected] = rows[start : start + size]) -> None:
                        s.add(c)

                    await self.worker.call(add_chunk)
            # A cancelled call's message stream just ends, like a finished one; its cancellation is
            # delivered at a later await (one yield is not always enough on a busy machine), so ask
            # the call itself: a stream cut by its deadline or by the client is not a finished ingest.
            await asyncio.sleep(0)
            if expired(context) or context.cancelled():
                raise asyncio.CancelledError
            if session is None:
                raise InvalidInput("task: no task named in the Ingest stream")
            status = "done"
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            if session is not None:
                await self._close_batch(session, status)
        report = session.report
        self.metrics.ingested.labels(task).inc(report.added)
        return pb.IngestResponse(
            added=report.added, already_present=report.present, rejected=len(report.rejected),
            rejections=[pb.Rejection(index=r.line, reason=r.reason) for r in report.rejected])

    async def _close_batch(self, session: IngestSession, status: str) -> None:
        """Record how an ingest call ended. Past the queue and shielded: the row must not stay
        `running`. A cancellation that arrives while closing a `done` batch means the client never
        got the answer: the row then says `cancelled` (same counts)."""
        closing = asyncio.ensure_future(self.worker.call_now(lambda e: session.finish(status)))
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            await closing
            if status == "done":
                await self.worker.call_now(lambda e: session.finish("cancelled"))
            raise

    async def ListTasks(self, request: pb.ListTasksRequest, context: grpc.aio.ServicerContext) -> pb.ListTasksResponse:
        size = request.page_size or DEFAULT_PAGE_SIZE
        if not 0 < size <= MAX_PAGE_SIZE:
            raise InvalidInput(f"page_size: {request.page_size} is not in 1..{MAX_PAGE_SIZE}", field="page_size")
        after = page_token_name(request.page_token)
        names = await self.worker.call(lambda e: e.metadata.task_names(after, size + 1))
        response = pb.ListTasksResponse(tasks=[await self._task_message(n) for n in names[:size]])
        if len(names) > size:
            response.next_page_token = page_token(names[size - 1])
        return response

    async def GetTask(self, request: pb.GetTaskRequest, context: grpc.aio.ServicerContext) -> pb.GetTaskResponse:
        return pb.GetTaskResponse(task=await self._task_message(request.name))

    async def GetServerInfo(self, request: pb.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> pb.GetServerInfoResponse:
        from importlib.metadata import PackageNotFoundError, version

        from raee_server.core.policies import policy_names

        try:
            release = version("raee-serve")
        except PackageNotFoundError:  # a source checkout that was never installed
            release = "unknown"
        engine = await self.worker.call(lambda e: e)
        s = self.settings
        return pb.GetServerInfoResponse(
            version=release, backbone=engine.backbone.model_id, encoder=engine.encoder.model_id,
            depth=engine.depth, device=s.device, dtype=s.dtype, policies=policy_names(),
            default_k=s.default_k, max_k=s.max_k, max_text_chars=s.max_text_chars,
            max_batch_texts=s.max_batch_texts, max_message_bytes=s.max_message_bytes,
            api_keys_required=self.keys is not None, replica=self.replica)

    async def CreateTask(self, request: pb.CreateTaskRequest,
                         context: grpc.aio.ServicerContext) -> pb.CreateTaskResponse:
        spec = TaskSpec(request.name, request.template,
                        tuple(Label(lb.name, lb.word, lb.share if lb.HasField("share") else None)
                              for lb in request.labels), request.description,
                        objective=request.objective or "balanced_accuracy",
                        prior_correction=request.prior_correction if request.HasField("prior_correction")
                        else True, adapt_prior=request.adapt_prior,
                        inputs=tuple(request.inputs) or (TEXT_INPUT,),
                        retrieval_key=request.retrieval_key or DEFAULT_RETRIEVAL_KEY)
        await self.worker.call(lambda e: e.create_task(spec))
        return pb.CreateTaskResponse(task=await self._task_message(request.name))

    async def DeleteRecords(self, request: pb.DeleteRecordsRequest,
                            context: grpc.aio.ServicerContext) -> pb.DeleteRecordsResponse:
        texts: list[Example] = [*request.texts, *(dict(row.values) for row in request.inputs)]
        ids, batch = list(request.ids), request.batch or None
        deleted = await self.worker.call(lambda e: e.delete_records(request.task, ids, texts, batch))
        return pb.DeleteRecordsResponse(deleted_ids=deleted)

    async def RelabelRecords(self, request: pb.RelabelRecordsRequest,
                             context: grpc.aio.ServicerContext) -> pb.RelabelRecordsResponse:
        task = request.task
        wanted = [(r.id or (record_id(task, r.text) if r.text else ""), r.label) for r in request.records]
        for i, (rid, _) in enumerate(wanted):
            if not rid:
                raise InvalidInput(f"records[{i}]: give the record's id or its text", f"records[{i}]")
        done, missing = await self.worker.call(lambda e: e.relabel(task, dict(wanted), source="grpc relabel"))
        absent = set(missing)
        rejections = [pb.Rejection(index=i, reason=f"no record {clip(rid)} in task {clip(task)}")
                      for i, (rid, _) in enumerate(wanted) if rid in absent]
        return pb.RelabelRecordsResponse(relabelled=done, rejections=rejections)

    async def DeleteTask(self, request: pb.DeleteTaskRequest,
                         context: grpc.aio.ServicerContext) -> pb.DeleteTaskResponse:
        await self.worker.call(lambda e: e.delete_task(request.name))
        self.recent.forget(request.name)
        self.metrics.forget_task(request.name)
        return pb.DeleteTaskResponse()

    async def GetTaskStats(self, request: pb.GetTaskStatsRequest,
                           context: grpc.aio.ServicerContext) -> pb.GetTaskStatsResponse:
        name = request.name

        def task_depth(engine: Engine) -> int:
            engine.task_info(name)  # NOT_FOUND for a task that does not exist
            return engine.depth

        depth = await self.worker.call(task_depth)
        stats = self.recent.stats(name, depth)
        p50, p90, p99 = stats.latency_ms
        return pb.GetTaskStatsResponse(name=name, window=self.recent.window, answers=stats.answers,
                                       exit_layer_counts=stats.exit_layer_counts, depth=depth, latency_p50_ms=p50,
                                       latency_p90_ms=p90, latency_p99_ms=p99, since=stats.since,
                                       key_answers=stats.key_answers, coverage_checked=stats.coverage_checked,
                                       outside_coverage=stats.outside_coverage)

    async def load_task_names(self) -> None:
        names = await self.worker.call(lambda e: [i.spec.name for i in e.metadata.list_tasks()])
        self.accounting.known_tasks.update(names)

    async def _task_message(self, name: str) -> pb.Task:
        def read(engine: Engine) -> pb.Task:
            info = engine.task_info(name)
            counts, never = engine.metadata.earliest_exits(name, engine.depth)
            message = pb.Task(
                name=info.spec.name, template=info.spec.template, description=info.spec.description,
                labels=[pb.Label(name=lb.name, word=lb.word, share=lb.share) for lb in info.spec.labels],
                records=info.records, depth=engine.depth, earliest_exit_counts=counts, never_correct=never,
                backbone=info.backbone_id, encoder=info.encoder_id, label_records=info.label_records,
                imbalanced=info.imbalanced, objective=info.spec.objective,
                prior_correction=info.spec.prior_correction, adapt_prior=info.spec.adapt_prior,
                inputs=list(info.spec.inputs), retrieval_key=info.spec.retrieval_key if info.spec.several else "")
            tracker = engine.prior_tracker(name)
            if tracker is not None and tracker.active:
                message.traffic_prior.update(dict(zip(tracker.labels, map(float, tracker.estimate))))
                message.traffic_prior_updated_at = tracker.updated_at
            if tracker is not None:
                message.traffic_prior_answers = tracker.seen
            heads = engine.heads(name)
            if heads is not None:
                message.heads.CopyFrom(pb.ExitHeadsInfo(
                    version=heads.version, fitted_at=heads.fitted_at, fit_seconds=heads.seconds,
                    records=len(heads.record_ids), validation_accuracy=[float(a) for a in heads.accuracy],
                    best_exit=heads.best_exit))
            if info.tuned:
                t = info.tuned
                message.auto.CopyFrom(pb.AutoChoice(
                    policy=t.policy, k=t.k, validation_accuracy=t.accuracy, validation_mean_exit=t.mean_exit,
                    validation_rows=t.validation_rows, records=t.records, chosen_at=t.chosen_at,
                    objective=t.objective, heads_version=t.heads_version or 0))
            return message

        return await self.worker.call(read)

