"""gRPC server interceptors: request decoding (a malformed body is INVALID_ARGUMENT, not UNKNOWN) and
the accounting around every call (the caller's key, metrics, the access log, failures to status codes).

Order in the server: tracing (when on), RequestDecoding, ObservedCalls; the servicer then holds only
what each RPC does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from raee_server.errors import InvalidInput
from raee_server.serving import logs
from raee_server.serving.auth import LiveKeys, Principal
from raee_server.serving.metrics import Metrics
from raee_server.serving.status import error_details, status_of
from raee_server.types import METADATA_KEY

log = logging.getLogger(__name__)
R = TypeVar("R")
OPERATION_REQUESTS = frozenset({"GetOperationRequest", "CancelOperationRequest"})
OTHER_TASK = "_other"  # the metrics label of every task name that does not exist (task names start alphanumeric)


def expired(context: grpc.aio.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def ended_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The code of a call whose handler was cancelled: its deadline passed, or the client went away."""
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired(context) else grpc.StatusCode.CANCELLED


class Undecodable:
    """A stream message that is not valid protobuf (or holds invalid UTF-8): answered, never raised."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def error(self, method: str) -> InvalidInput:
        return InvalidInput(f"request: not a valid {method} message ({self.reason})")


class RequestDecoding(grpc.aio.ServerInterceptor):
    """Decode request messages inside the servicer's reach, so a malformed body is INVALID_ARGUMENT
    with a one-line log (gRPC's own decoding answers UNKNOWN and logs a traceback each time).

    Unary calls are aborted; a stream's undecodable message reaches the servicer as an `Undecodable`.
    """

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer
        method = str(details.method).rsplit("/", 1)[-1]

        def parse(raw: bytes) -> Any:
            try:
                return decode(raw)
            except (DecodeError, UnicodeDecodeError, ValueError) as exc:
                log.warning("%s: undecodable request message: %s", method, exc)
                return Undecodable(str(exc) or type(exc).__name__)

        async def messages(raw_iterator: AsyncIterator[bytes]) -> AsyncIterator[Any]:
            async for raw in raw_iterator:
                yield parse(raw)

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
                request = parse(raw)
                if isinstance(request, Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error(method)))
                return await inner_uu(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, None, handler.response_serializer)
        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def stream_unary(raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
                return await inner_su(messages(raw), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, None, handler.response_serializer)
        if handler.stream_stream:
            inner_ss = handler.stream_stream

            async def stream_stream(raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> Any:
                async for response in inner_ss(messages(raw), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(stream_stream, None, handler.response_serializer)
        return handler  # unary-stream: this service has none


class Accounting:
    """What every call goes through: its key checked against the task it names, a count and a
    latency by method, task and code (task labels only for tasks that exist), and one access-log
    line. ObservedCalls applies it around whole calls; ClassifyStream per message."""

    def __init__(self, metrics: Metrics, keys: LiveKeys | None) -> None:
        self.metrics = metrics
        self.keys = keys
        self.known_tasks: set[str] = set()  # filled when the engine loads; grows with answers and CreateTask

    def authorize(self, context: grpc.aio.ServicerContext, method: str, task: str | None) -> Principal | None:
        """With keys configured: the caller's key must exist, and grant `task` (or admin for admin RPCs)."""
        if self.keys is None:
            return None
        return self.keys.authorize(key_of(context), method, task)

    def task_label(self, method: str, task: str | None, code: grpc.StatusCode) -> str:
        """Metric labels name only tasks that exist: a made-up name must not grow the exposition."""
        if not task:
            return "-"
        if code is grpc.StatusCode.OK:  # an answer proves the task exists (a deletion, that it did)
            if method == "DeleteTask":
                self.known_tasks.discard(task)
            else:
                self.known_tasks.add(task)
            return task
        return task if task in self.known_tasks else OTHER_TASK

    def count(self, method: str, task: str | None, code: grpc.StatusCode, seconds: float) -> None:
        self.metrics.requests.labels(method, self.task_label(method, task, code), code.name).inc()
        self.metrics.latency.labels(method).observe(seconds)

    async def observe(self, method: str, task: str | None, context: grpc.aio.ServicerContext,
                      work: Callable[[], Awaitable[R]]) -> R:
        """Run one call: check its key, count it by code, time it, log it, and turn a failure into its
        status code with details (the request id goes back in the trailing metadata)."""
        start = time.monotonic()
        code = grpc.StatusCode.UNKNOWN
        rid = logs.request_id(context.invocation_metadata())
        trace = logs.trace_id(context.invocation_metadata())
        ids = logs.CALL.set((rid, trace))
        trailer = ((logs.REQUEST_ID_KEY, rid),)
        context.set_trailing_metadata(trailer)
        exit_layer = None
        try:
            self.authorize(context, method, task)
            result = await work()
            exit_layer = getattr(result, "exit_layer", None)
            # An answer that comes after the caller's deadline never reaches it: count what it sees.
            code = grpc.StatusCode.DEADLINE_EXCEEDED if expired(context) else grpc.StatusCode.OK
            return result
        except asyncio.CancelledError:  # the client cancelled or its deadline passed: count it as that
            code = ended_code(context)
            raise
        except Exception as exc:
            code, message = failure(exc, method)
            await context.abort(code, message, trailer + error_details(exc, code, message))
            raise  # unreachable: abort raises
        finally:
            elapsed = time.monotonic() - start
            self.count(method, task, code, elapsed)
            logs.log_access(method, task, code.name, elapsed, rid, exit_layer, trace)
            logs.CALL.reset(ids)


def key_of(context: grpc.aio.ServicerContext) -> str | None:
    key = dict(context.invocation_metadata() or ()).get(METADATA_KEY)
    return key if isinstance(key, str) else None


def failure(exc: Exception, what: str) -> tuple[grpc.StatusCode, str]:
    """The status a failure gets; an unexpected one (INTERNAL) is logged with its traceback."""
    code, message = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed", what)
    return code, message


def task_of(request: Any) -> str | None:
    """The task a unary request names (`task`; `name` for the task RPCs and the inference protocol's
    model RPCs; `model_name` for its ModelInfer); None for the others and for an empty name. An
    operation's `name` is no task: the servicer checks the key against the operation's task."""
    if request.DESCRIPTOR.name in OPERATION_REQUESTS:
        return None
    fields = request.DESCRIPTOR.fields_by_name
    for field in ("task", "name", "model_name"):
        if field in fields:
            return str(getattr(request, field)) or None
    return None


class ObservedCalls(grpc.aio.ServerInterceptor):
    """Accounting around each unary and client-streaming call of `service`. A unary call's key is
    checked against the task its request names; Ingest's task comes with its first message, so the
    servicer checks it then. ClassifyStream is accounted per message by the servicer (each message
    names its own task and gets its own outcome). `open_methods` are probes: neither keyed nor counted."""

    def __init__(self, service: str, accounting: Accounting, open_methods: frozenset[str] = frozenset()) -> None:
        self.prefix = f"/{service}/"
        self.accounting = accounting
        self.open_methods = open_methods

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or not str(details.method).startswith(self.prefix):
            return handler
        method = str(details.method)[len(self.prefix):]
        if method in self.open_methods:
            return handler
        observe = self.accounting.observe
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await observe(method, task_of(request), context, lambda: inner_uu(request, context))

            return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.stream_unary:
            inner_su = handler.stream_unary

            async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                return await observe(method, None, context, lambda: inner_su(requests, context))

            return grpc.stream_unary_rpc_method_handler(stream_unary, handler.request_deserializer,
                                                        handler.response_serializer)
        return handler
