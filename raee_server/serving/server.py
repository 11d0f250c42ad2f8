"""The gRPC front end: thin servicers that convert protobuf to engine calls (interceptors.py checks keys,
counts, logs and maps failures to codes around them), and the server that runs them with health,
reflection, metrics and the HTTP/JSON gateway.

Health (`grpc.health.v1`) is NOT_SERVING until the model and stores are loaded
and again during shutdown; reflection is on; metrics are served on their own port.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import gc
import ipaddress
import logging
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
from google.rpc import status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from raee_server import tracing
from raee_server.core import auto
from raee_server.core.datafile import check_row
from raee_server.core.engine import Engine, IngestSession
from raee_server.errors import InvalidInput, NotReady, Unauthenticated, clip
from raee_server.protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.protos.raee.v1 import raee_pb2_grpc as pb_grpc
from raee_server.serving import open_inference, open_inference_http
from raee_server.serving.auth import LiveKeys
from raee_server.serving.gateway import Gateway, tls_context
from raee_server.serving.interceptors import (
    Accounting,
    ObservedCalls,
    RequestDecoding,
    Undecodable,
    ended_code,
    expired,
    failure,
    key_of,
)
from raee_server.serving.jobs import Jobs, OperationRpcs
from raee_server.serving.metrics import Metrics, RecentAnswers
from raee_server.serving.operations import Operations
from raee_server.serving.worker import ModelWorker
from raee_server.settings import Settings
from raee_server.stores.records import record_id
from raee_server.types import Label, Prediction, Rejected, Row, TaskSpec

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RaeeService"].full_name
# Health service names. Readiness ("", the service's name, "readiness"): models loaded and stores
# reachable; route traffic here. Liveness ("liveness"): the process and its model worker loop run;
# restart when it fails. A store outage turns readiness off, never liveness.
READINESS = ("", SERVICE_NAME, "readiness")
LIVENESS = "liveness"


def check_exposure(settings: Settings) -> None:
    """Refuse to serve without API keys on an address others can reach, unless told to (like Redis's
    protected mode); loopback and Unix sockets are always allowed. The HTTP port gets the same rule."""
    if settings.api_keys_file is not None:
        return
    for setting, address in (("address", settings.address), ("http_address", settings.http_address)):
        if not address or address.startswith("unix:"):
            continue
        host = address.rsplit(":", 1)[0].strip("[]")
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:  # a host name: it may resolve to anything
            loopback = False
        if loopback:
            continue
        if not settings.allow_unauthenticated:
            raise InvalidInput(
                f"{setting}: {address} is reachable from other machines and no API keys are configured: anyone "
                "who reaches it could create, delete and ingest into any task. Set RAEE_API_KEYS_FILE "
                "(docs/security.md), bind a loopback address, or set RAEE_ALLOW_UNAUTHENTICATED=1 to serve it "
                "open on purpose")
        log.warning("serving %s WITHOUT API keys (RAEE_ALLOW_UNAUTHENTICATED): anyone who reaches it can change "
                    "every task", address)


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
        self.jobs = Jobs(worker, settings)

    async def answer(self, task: str, texts: list[str], options: pb.ClassifyOptions,
                        context: grpc.aio.ServicerContext, method: str | None = None) -> list[pb.ClassifyResponse]:
        started = time.monotonic()
        if method:  # a stream: each request names its own task
            self.accounting.authorize(context, method, task)
        if options.truncate:
            texts = [t[: self.settings.max_text_chars] for t in texts]
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
        response = (await self.answer(request.task, [request.text], request.options, context))[0]
        response.request_id = request.request_id
        return response

    async def ClassifyBatch(self, request: pb.ClassifyBatchRequest,
                            context: grpc.aio.ServicerContext) -> pb.ClassifyBatchResponse:
        if not request.texts:
            raise InvalidInput("texts: no text given")
        if len(request.texts) > self.settings.max_batch_texts:
            raise InvalidInput(f"texts: {len(request.texts)} texts, over the limit of "
                               f"{self.settings.max_batch_texts} per request (RAEE_MAX_BATCH_TEXTS)")
        return pb.ClassifyBatchResponse(
            results=await self.answer(request.task, list(request.texts), request.options, context))

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
            result = (await self.answer(request.task, [request.text], request.options, context,
                                           "ClassifyStream"))[0]
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
                rows = [check_row(seen + i, ex.text, ex.label) for i, ex in enumerate(message.examples)]
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
            api_keys_required=self.keys is not None)

    async def CreateTask(self, request: pb.CreateTaskRequest,
                         context: grpc.aio.ServicerContext) -> pb.CreateTaskResponse:
        spec = TaskSpec(request.name, request.template,
                        tuple(Label(lb.name, lb.word, lb.share if lb.HasField("share") else None)
                              for lb in request.labels), request.description,
                        objective=request.objective or "balanced_accuracy",
                        prior_correction=request.prior_correction if request.HasField("prior_correction")
                        else True, adapt_prior=request.adapt_prior)
        await self.worker.call(lambda e: e.create_task(spec))
        return pb.CreateTaskResponse(task=await self._task_message(request.name))

    async def DeleteRecords(self, request: pb.DeleteRecordsRequest,
                            context: grpc.aio.ServicerContext) -> pb.DeleteRecordsResponse:
        ids, texts, batch = list(request.ids), list(request.texts), request.batch or None
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
                prior_correction=info.spec.prior_correction, adapt_prior=info.spec.adapt_prior)
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


def _status(serving: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING


class RaeeServer:
    """A running service: gRPC server, health, reflection, model worker and metrics."""

    def __init__(self, settings: Settings, engine_factory: Callable[[], Engine] | None = None) -> None:
        self.settings = settings
        self.engine_factory = engine_factory or functools.partial(Engine.open_for_serving, settings)
        self.metrics = Metrics()
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # grpc-stubs lack health.aio
        self.worker = ModelWorker(settings.max_batch_size, settings.max_wait_ms / 1000, settings.queue_size,
                                  self.metrics)
        limits = settings.max_message_bytes
        keys = LiveKeys(settings.api_keys_file) if settings.api_keys_file else None
        self.accounting = Accounting(self.metrics, keys)
        interceptors = [*tracing.server_interceptors(), RequestDecoding(), ObservedCalls(SERVICE_NAME, self.accounting),
                        ObservedCalls(open_inference.SERVICE_NAME, self.accounting, open_inference.OPEN_METHODS)]
        self.server = grpc.aio.server(interceptors=interceptors, options=[
            ("grpc.max_receive_message_length", limits), ("grpc.max_send_message_length", limits)])
        self.servicer = RaeeServicer(self.worker, settings, self.accounting)
        pb_grpc.add_RaeeServiceServicer_to_server(self.servicer, self.server)
        v2_grpc.add_GRPCInferenceServiceServicer_to_server(open_inference.InferenceServicer(
            self.servicer.answer, lambda: self._serving, self._task_labels, settings.max_batch_texts), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, open_inference.SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        self.port = 0
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self.gateway: Gateway | None = None
        self._private: str | None = None  # a 0700 directory holding the gateway's Unix socket to gRPC
        self.load_error: BaseException | None = None  # the last failed attempt (retried if transient)
        self.failed = asyncio.Event()  # set when loading failed for good: the process should exit
        self._serving = False
        self._loading: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._retuner: asyncio.Task[None] | None = None

    async def _task_labels(self, name: str) -> tuple[Label, ...]:
        return await self.worker.call(lambda e: e.metadata.task(name).spec.labels)

    async def _set_health(self, serving: bool) -> None:
        """Readiness."""
        self._serving = serving
        for name in READINESS:
            await self.health.set(name, _status(serving))

    async def _set_live(self, live: bool) -> None:
        await self.health.set(LIVENESS, _status(live))

    async def start(self) -> int:
        """Listen at once (health NOT_SERVING), then load the model and stores in the background."""
        check_exposure(self.settings)
        await self._set_health(False)
        await self._set_live(True)  # loading the models is not a reason to restart the process
        self.port = self._listen()
        if self.port == 0:
            raise OSError(f"cannot listen on {self.settings.address}")
        private = None
        if self.settings.http_address:  # the gateway reaches gRPC on a socket only this user can open
            self._private = tempfile.mkdtemp(prefix="raee-gateway-")
            private = f"unix:{self._private}/grpc.sock"
            self.server.add_insecure_port(private)
        await self.server.start()
        if private is not None:
            s = self.settings
            self.gateway = Gateway(private, s.max_message_bytes, self.accounting, [open_inference_http.mount])
            tls = tls_context(s.tls_cert, s.tls_key, s.tls_client_ca) if s.tls_cert and s.tls_key else None
            self.http_port = await self.gateway.start(s.http_address, tls, s.grace_seconds)
        if self.settings.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(self.settings.metrics_port, self.settings.metrics_address)
        self.worker.start()
        self._loading = asyncio.create_task(self._load())
        log.info("listening on port %d (HTTP on %s, metrics on %s)", self.port, self.http_port, self.metrics_port)
        return self.port

    def _listen(self) -> int:
        s = self.settings
        if s.tls_cert is None:
            return self.server.add_insecure_port(s.address)
        if s.tls_key is None:
            raise InvalidInput("tls_key: a TLS certificate needs its private key (RAEE_TLS_KEY)")
        credentials = grpc.ssl_server_credentials(
            [(s.tls_key.read_bytes(), s.tls_cert.read_bytes())],
            root_certificates=s.tls_client_ca.read_bytes() if s.tls_client_ca else None,
            require_client_auth=s.tls_client_ca is not None)
        return self.server.add_secure_port(s.address, credentials)

    async def _load(self) -> None:
        """Load the model and stores; retry while a store is unreachable, give up on a broken setup."""
        while True:
            try:
                await self.worker.load(self.engine_factory)
                break
            except NotReady as exc:  # e.g. Qdrant not up yet: keep NOT_SERVING and retry
                self.load_error = exc
                log.warning("not ready, retrying in %.0f s: %s", self.settings.retry_seconds, exc)
                await asyncio.sleep(self.settings.retry_seconds)
            except BaseException as exc:  # a corrupt data dir, a wrong backbone: a clear error, then exit
                self.load_error = exc
                log.error("cannot start: %s", exc)
                self.failed.set()
                return
        self.load_error = None
        # Move everything loaded so far (models, tokenizers, stores: millions of objects) out of the
        # garbage collector's view: a full collection over them pauses every thread for hundreds of ms.
        gc.freeze()
        assert self.worker.engine is not None
        self.metrics.fit_depth(self.worker.engine.depth)
        await self.servicer.load_task_names()
        await self._set_health(True)
        self._monitor = asyncio.create_task(self._watch_stores())
        self._retuner = asyncio.create_task(self._retune())
        log.info("serving")

    async def _watch_stores(self) -> None:
        """Health follows the model worker and the vector store: NOT_SERVING while the store is
        unreachable (SERVING once it is back), and for good if the worker loop stopped (an
        orchestrator should restart the process)."""
        while True:
            await asyncio.sleep(self.settings.health_interval_seconds)
            engine = self.worker.engine
            if engine is None:
                continue
            if not self.worker.alive:
                log.error("the model worker loop is not running: health NOT_SERVING")
                await self._set_health(False)
                await self._set_live(False)
                return
            try:
                await asyncio.wait_for(asyncio.to_thread(engine.vectors.ping), self.settings.health_interval_seconds)
                healthy = True
            except Exception as exc:
                healthy = False
                if self._serving:
                    log.warning("vector store unreachable: %s", exc)
            if healthy != self._serving:
                await self._set_health(healthy)

    async def _retune(self) -> None:
        """Fit each task's exit heads and choose its `auto` policy in the background: when it has none
        yet or has grown by RAEE_RETUNE_GROWTH. Neither runs a backbone forward (heads are fit on the
        stored exit features), so no request waits for them. The fit runs in a low-priority child
        process (raee_server.serving.fitter), and not while the task is being ingested into (the records
        are still arriving); the engine switches to the new heads version at once."""
        while True:
            await asyncio.sleep(self.settings.retune_check_seconds)
            engine = self.worker.engine
            if engine is None:
                continue
            try:
                tasks = [i.spec.name for i in await asyncio.to_thread(engine.metadata.list_tasks)]
            except Exception:  # a store outage: try again next round
                log.warning("background tuning cannot list tasks; retrying in %.0f s",
                            self.settings.retune_check_seconds, exc_info=True)
                continue
            for task in tasks:  # one task's failure (e.g. deleted meanwhile) does not stop the others
                try:
                    await self._maintain(engine, task)
                except Exception:  # a store outage or the task deleted meanwhile: try again next round
                    log.warning("background tuning of %s failed; retrying in %.0f s", task,
                                self.settings.retune_check_seconds, exc_info=True)

    async def _maintain(self, engine: Engine, task: str) -> None:
        """One task's background refit and retune, each as an operation (queued behind any other)."""
        operations, jobs = self.servicer.operations, self.servicer.jobs
        if await asyncio.to_thread(auto.needs_heads, engine, task) and \
                not await asyncio.to_thread(engine.metadata.ingesting, task) and not operations.busy("fit-heads", task):
            op = await operations.wait(operations.start("fit-heads", task, jobs.fit_heads(task, then_tune=False)))
            if op.response is None:
                log.warning("background exit-head fit of %s: %s", task, op.error.message if op.error else "cancelled")
                return
            log.info("exit heads v%d for %s fitted (%.1f s, %d records)", op.response["version"], task,
                     op.response["seconds"], op.response["records"])
        if (await asyncio.to_thread(auto.needs_tuning, engine, task)
                or await asyncio.to_thread(auto.needs_tuning_after_heads, engine, task)) \
                and not operations.busy("tune", task):
            op = await operations.wait(operations.start("tune", task, jobs.tune(task)))
            if op.response is None:
                log.warning("background tuning of %s: %s", task, op.error.message if op.error else "cancelled")
                return
            choice = op.response["choice"]
            log.info("auto for %s: %s with k = %d (%.1f s, %d records)", task, choice["policy"], choice["k"],
                     choice["seconds"], choice["records"])

    async def wait_ready(self, timeout: float = 600) -> None:
        """Until serving; raises the error if loading failed for good."""
        assert self._loading is not None
        await asyncio.wait_for(asyncio.shield(self._loading), timeout)
        if self.failed.is_set() and self.load_error:
            raise self.load_error

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking work, finish what is queued within the grace period, then release the stores."""
        for task in (self._monitor, self._retuner, self._loading):
            if task and not task.done():
                task.cancel()
        await self.servicer.operations.close()
        await self._set_health(False)
        await self._set_live(False)
        if self.gateway is not None:  # stops listening; HTTP calls in flight finish (they need gRPC)
            await self.gateway.stop()
        await self.server.stop(self.settings.grace_seconds if grace is None else grace)
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
        try:
            await asyncio.wait_for(self.worker.drain(), timeout=1.0)
        except TimeoutError:
            log.warning("jobs still queued after the grace period were dropped")
        self.worker.close()


async def serve(settings: Settings) -> None:
    if tracing.configure():
        log.info("tracing on (OTEL_* variables)")
    server = RaeeServer(settings)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    if server.accounting.keys is not None:  # SIGHUP: read the API key file again now
        loop.add_signal_handler(signal.SIGHUP, server.accounting.keys.reload)
    waits = [asyncio.create_task(stopping.wait()), asyncio.create_task(server.failed.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if server.failed.is_set():
        await server.stop(0)
        raise SystemExit(f"raee-server: cannot start: {server.load_error}")
    log.info("shutting down (grace %.1f s)", settings.grace_seconds)
    await server.stop()
