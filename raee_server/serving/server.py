"""The server: the RaeeService servicer (servicer.py) and the Open Inference Protocol's
(open_inference.py) behind the interceptors, with health, reflection, metrics, the HTTP/JSON gateway,
and the background refits and retunes (as operations, operations.py).

Health (`grpc.health.v1`) is NOT_SERVING until the model and stores are loaded
and again during shutdown; reflection is on; metrics are served on their own port.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import ipaddress
import logging
import shutil
import signal
import tempfile
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from raee_server import tracing
from raee_server.core import auto
from raee_server.core.engine import Engine
from raee_server.errors import InvalidInput, NotReady, RunningElsewhere
from raee_server.protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.protos.raee.v1 import raee_pb2_grpc as pb_grpc
from raee_server.serving import open_inference, open_inference_http, openapi
from raee_server.serving.auth import LiveKeys
from raee_server.serving.gateway import Gateway, tls_context
from raee_server.serving.interceptors import (
    Accounting,
    ObservedCalls,
    RequestDecoding,
)
from raee_server.serving.metrics import Metrics
from raee_server.serving.servicer import RaeeServicer
from raee_server.serving.worker import ModelWorker
from raee_server.settings import Settings
from raee_server.types import TaskSpec

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
            self.servicer.answer, lambda: self._serving, self._task_spec, settings.max_batch_texts), self.server)
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

    async def _task_spec(self, name: str) -> TaskSpec:
        return await self.worker.call(lambda e: e.spec(name))

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
            self.gateway = Gateway(private, s.max_message_bytes, self.accounting,
                                   [openapi.mount, open_inference_http.mount])
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
        """One task's background refit and retune (auto.maintenance's rule), each as an operation
        queued behind any other; none is started while a twin is queued or running. Replicas over one
        database take turns: this one works on the task only while it holds the task's lease, and
        judges what is due after taking it, on fresh reads (another replica may have just done it)."""
        if not await asyncio.to_thread(auto.due, engine, task):
            return
        try:
            async with self.servicer.jobs.claims.hold(task):
                engine.forget_heads(task)
                engine.forget_choice(task)
                await self._steps(engine, task)
        except RunningElsewhere as exc:
            log.debug("background work on %s: %s", task, exc)

    async def _steps(self, engine: Engine, task: str) -> None:
        operations, jobs = self.servicer.operations, self.servicer.jobs
        steps = auto.maintenance(engine, task)
        while (step := await asyncio.to_thread(next, steps, None)) is not None:
            if operations.busy(step, task):
                continue
            body = jobs.fit_heads(task, then_tune=False) if step == "fit-heads" else jobs.tune(task)
            op = await operations.wait(operations.start(step, task, body))
            if op.response is None:
                log.warning("background %s of %s: %s", step, task, op.error.message if op.error else "cancelled")
                return
            if step == "fit-heads":
                log.info("exit heads v%d for %s fitted (%.1f s, %d records)", op.response["version"], task,
                         op.response["seconds"], op.response["records"])
            else:
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
