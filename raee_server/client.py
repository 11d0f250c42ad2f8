"""A small synchronous client for the gRPC service (used by `raee-admin --server`)."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2

from raee_server.errors import (
    DeadlineExpired,
    InvalidInput,
    NotReady,
    Overloaded,
    PermissionDenied,
    RaeeError,
    StoreMismatch,
    TaskExists,
    TaskNotFound,
    Unauthenticated,
)
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.protos.raee.v1 import raee_pb2_grpc as pb_grpc
from raee_server.types import (
    METADATA_KEY,
    TEXT_INPUT,
    Example,
    IngestReport,
    Neighbour,
    Prediction,
    Rejected,
    Row,
    TaskSpec,
)

T = TypeVar("T")

_ERRORS = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.UNAVAILABLE: NotReady,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExpired,
    grpc.StatusCode.FAILED_PRECONDITION: StoreMismatch,
}


# Reads are safe to repeat, so the channel retries them when the server is briefly unavailable
# (loading, restarting), with jittered exponential back-off. RESOURCE_EXHAUSTED is not retried
# by the channel: it means both "queue full, retry" and "message over the size limit, never
# retry", and only the server's RetryInfo tells them apart (the client reads it: `_retrying`).
# Ingest is not retried: a client stream cannot be replayed once sent (re-running it is
# harmless, rows are deduplicated). Other gRPC clients can use the same service config.
# round_robin: a name that resolves to several replicas (DNS) gets its calls spread over all of them
# (gRPC's default, pick_first, pins a channel to one); with one address it is the same as pick_first.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{
        "name": [{"service": "raee.v1.RaeeService", "method": m}
                 for m in ("Classify", "ClassifyBatch", "GetTask", "ListTasks")],
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.25s",
            "maxBackoff": "4s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]
}
CHANNEL_OPTIONS = [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(SERVICE_CONFIG))]


class _WithMetadata:
    """The stub with the caller's metadata (the API key) added to every call."""

    def __init__(self, stub: pb_grpc.RaeeServiceStub, metadata: list[tuple[str, str]]) -> None:
        self._stub = stub
        self._metadata = metadata

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        return lambda *args, **kwargs: method(*args, metadata=self._metadata, **kwargs)


class _ApiKey(grpc.AuthMetadataPlugin):
    """The API key as gRPC call credentials (TLS channels)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        callback(((METADATA_KEY, self.key),), None)


@dataclass
class ErrorDetails:
    """The standard google.rpc details a failed call carried (empty when it carried none)."""

    reason: str = ""  # ErrorInfo.reason: a stable name of the failure, e.g. OVERLOADED
    fields: dict[str, str] = field(default_factory=dict)  # BadRequest: request field path -> what is wrong
    retry_after: float | None = None  # RetryInfo: retry after this many seconds; None: retrying cannot help


def error_details(exc: grpc.RpcError) -> ErrorDetails:
    """Decode a failed call's `grpc-status-details-bin` trailer."""
    out = ErrorDetails()
    trailers: Any = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    raw = next((value for key, value in trailers or () if key == "grpc-status-details-bin"), None)
    if not isinstance(raw, bytes):
        return out
    for detail in status_pb2.Status.FromString(raw).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out.reason = info.reason
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out.fields.update({v.field: v.description for v in bad.field_violations})
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            out.retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    return out


def _raise(exc: grpc.RpcError, task: str) -> NoReturn:
    """The typed exception of a failed call, with the details the server sent."""
    code, details = exc.code(), error_details(exc)
    error: RaeeError
    if code == grpc.StatusCode.NOT_FOUND:
        error = TaskNotFound(task)
    elif code == grpc.StatusCode.ALREADY_EXISTS:
        error = TaskExists(task)
    elif code == grpc.StatusCode.INVALID_ARGUMENT:
        error = InvalidInput(f"server: {code.name}: {exc.details()}", next(iter(details.fields), None))
    else:
        error = _ERRORS.get(code, RaeeError)(f"server: {code.name}: {exc.details()}")
    if details.reason:
        error.reason = details.reason
    error.retry_after = details.retry_after
    raise error from None


def _retrying(call: Callable[[], T], attempts: int = 5) -> T:
    """`call`, again after the delay the server's RetryInfo asks for (doubling, with jitter), for
    as long as it asks and `attempts` allow; a failure without RetryInfo is never retried."""
    for attempt in range(attempts):
        try:
            return call()
        except grpc.RpcError as exc:
            delay = error_details(exc).retry_after
            if delay is None or attempt == attempts - 1:
                raise
            time.sleep(delay * 2**attempt * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")


class RaeeClient:
    """`api_key` goes in the x-api-key metadata of every call; `tls_ca` (PEM bytes) turns on TLS,
    `tls_cert`/`tls_key` add a client certificate for mutual TLS."""

    def __init__(self, address: str, timeout: float = 60.0, api_key: str | None = None,
                 tls_ca: bytes | None = None, tls_cert: bytes | None = None, tls_key: bytes | None = None) -> None:
        metadata = [(METADATA_KEY, api_key)] if api_key else []
        if tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(tls_ca, private_key=tls_key, certificate_chain=tls_cert)
            if api_key:  # gRPC's call credentials: the key goes with every call on this channel
                credentials = grpc.composite_channel_credentials(
                    credentials, grpc.metadata_call_credentials(_ApiKey(api_key), name="raee-api-key"))
                metadata = []
            self.channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        else:  # gRPC sends call credentials only over a secure channel: the key goes as call metadata
            self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = _WithMetadata(pb_grpc.RaeeServiceStub(self.channel), metadata)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def classify(self, task: str, texts: Sequence[Example], policy: str | None = None, k: int | None = None,
                 neighbours: bool = False) -> list[Prediction]:
        """Answers for texts, or (a task with several inputs) each example's inputs by name."""
        options = pb.ClassifyOptions(policy=policy or "", k=k or 0, return_neighbours=neighbours)
        plain = [t for t in texts if isinstance(t, str)]
        if len(plain) == len(texts):
            request = pb.ClassifyBatchRequest(task=task, texts=plain, options=options)
        else:
            request = pb.ClassifyBatchRequest(task=task, options=options, inputs=[
                pb.Inputs(values={TEXT_INPUT: t} if isinstance(t, str) else t) for t in texts])
        try:
            reply = _retrying(lambda: self.stub.ClassifyBatch(request, timeout=self.timeout))
        except grpc.RpcError as exc:
            _raise(exc, task)
        return [
            Prediction(
                label=r.label, scores=[s.score for s in r.scores], exit_layer=r.exit_layer, depth=r.depth,
                labels=[s.label for s in r.scores], policy=r.policy, answered_by=r.answered_by or "backbone",
                covered=None if not r.coverage else r.coverage == "inside",
                neighbours=[Neighbour(n.id, n.similarity, n.label, tuple(zip(n.exit_layers, n.exit_probabilities)))
                            for n in r.neighbours],
                timings_us={"queue_us": r.timings.queue_us, "encode_us": r.timings.encode_us,
                            "retrieve_us": r.timings.retrieve_us, "forward_us": r.timings.forward_us,
                            "total_us": r.timings.total_us},
            )
            for r in reply.results
        ]

    def create_task(self, spec: TaskSpec) -> None:
        """The task as `spec` declares it, every field the wire carries: the same task as one
        created locally."""
        request = pb.CreateTaskRequest(
            name=spec.name, template=spec.template, description=spec.description,
            labels=[pb.Label(name=lb.name, word=lb.word, share=lb.share) for lb in spec.labels],
            objective=spec.objective, prior_correction=spec.prior_correction, adapt_prior=spec.adapt_prior,
            inputs=list(spec.inputs) if spec.several else [],
            retrieval_key=spec.retrieval_key if spec.several else "")
        try:
            self.stub.CreateTask(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            _raise(exc, spec.name)

    def delete_task(self, name: str) -> None:
        try:
            self.stub.DeleteTask(pb.DeleteTaskRequest(name=name), timeout=self.timeout)
        except grpc.RpcError as exc:
            _raise(exc, name)

    def delete_records(self, task: str, ids: Sequence[str] = (), texts: Sequence[Example] = (),
                       batch: int | None = None) -> list[str]:
        """Delete records by id, exact text (or inputs) or ingest batch; returns the ids deleted."""
        request = pb.DeleteRecordsRequest(task=task, ids=list(ids), texts=[t for t in texts if isinstance(t, str)],
                                          inputs=[pb.Inputs(values=t) for t in texts if not isinstance(t, str)],
                                          batch=batch or 0)
        try:
            return list(self.stub.DeleteRecords(request, timeout=self.timeout).deleted_ids)
        except grpc.RpcError as exc:
            _raise(exc, task)

    def relabel(self, task: str, records: Sequence[tuple[str | None, str | None, str]]) -> tuple[int, list[str]]:
        """New labels for records given as (id, text, label) with one of id and text; returns how many
        were relabelled and, for those not found, their id or text."""
        request = pb.RelabelRecordsRequest(task=task, records=[pb.Relabel(id=i or "", text=t or "", label=label)
                                                               for i, t, label in records])
        try:
            reply = self.stub.RelabelRecords(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            _raise(exc, task)
        return reply.relabelled, [records[r.index][0] or records[r.index][1] or "" for r in reply.rejections]

    def tasks(self) -> Iterator[pb.Task]:
        """Every task the server has (admin key), fetched a page at a time."""
        token = ""
        while True:
            try:
                request = pb.ListTasksRequest(page_token=token)
                page = _retrying(lambda: self.stub.ListTasks(request, timeout=self.timeout))  # noqa: B023 (called here)
            except grpc.RpcError as exc:
                _raise(exc, "")
                return
            yield from page.tasks
            if not page.next_page_token:
                return
            token = page.next_page_token

    def task(self, name: str) -> pb.Task:
        try:
            return _retrying(lambda: self.stub.GetTask(pb.GetTaskRequest(name=name), timeout=self.timeout)).task
        except grpc.RpcError as exc:
            _raise(exc, name)

    def labels(self, task: str) -> list[str]:
        return [lb.name for lb in self.task(task).labels]

    def inputs(self, task: str) -> list[str]:
        """The task's named inputs (`text` alone for a single-text task, and from servers before inputs)."""
        return list(self.task(task).inputs) or [TEXT_INPUT]

    def ingest(self, task: str, rows: Iterable[Row | Rejected], chunk: int = 256) -> IngestReport:
        """Stream rows to the server; rejections come back with the file's line numbers."""
        report = IngestReport()
        lines: list[int] = []

        def messages() -> Iterator[pb.IngestRequest]:
            batch: list[pb.Example] = []
            first = True
            for row in rows:
                if isinstance(row, Rejected):
                    report.rejected.append(row)
                    continue
                lines.append(row.line)
                batch.append(pb.Example(text=row.text, label=row.label))
                if len(batch) >= chunk:
                    yield pb.IngestRequest(task=task if first else "", examples=batch)
                    first, batch = False, []
            yield pb.IngestRequest(task=task if first else "", examples=batch)

        try:
            reply = self.stub.Ingest(messages())
        except grpc.RpcError as exc:
            _raise(exc, task)
        report.added, report.present = reply.added, reply.already_present
        report.rejected += [Rejected(lines[r.index], r.reason) for r in reply.rejections]
        report.rejected.sort(key=lambda r: r.line)
        return report

    # -- long-running operations ------------------------------------------------------------------

    def start(self, method: str, request: Any, task: str = "") -> pb.Operation:
        """Start an operation (`method` is its RPC: FitHeads, Tune, Evaluate, BackfillFeatures,
        CheckRecords, BuildIndex); the Operation as the server queued it."""
        try:
            reply = getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            _raise(exc, task)
        operation: pb.Operation = reply.operation
        return operation

    def operation(self, name: str) -> pb.Operation:
        try:
            return _retrying(lambda: self.stub.GetOperation(pb.GetOperationRequest(name=name),
                                                            timeout=self.timeout)).operation
        except grpc.RpcError as exc:
            _raise(exc, "")

    def operations(self, task: str = "") -> list[pb.Operation]:
        try:
            return list(self.stub.ListOperations(pb.ListOperationsRequest(task=task), timeout=self.timeout).operations)
        except grpc.RpcError as exc:
            _raise(exc, task)

    def cancel(self, name: str) -> pb.Operation:
        try:
            return self.stub.CancelOperation(pb.CancelOperationRequest(name=name), timeout=self.timeout).operation
        except grpc.RpcError as exc:
            _raise(exc, "")

    def wait(self, operation: pb.Operation, progress: Callable[[pb.Operation], None] | None = None,
             poll: float = 0.5) -> dict[str, Any]:
        """Poll until the operation is done; its report, or its failure raised as the error type the
        same call would have raised (a cancelled one: RaeeError with reason CANCELLED)."""
        while True:
            if progress is not None:
                progress(operation)
            if operation.done:
                return operation_result(operation)
            time.sleep(poll)
            operation = self.operation(operation.name)


def operation_result(operation: pb.Operation) -> dict[str, Any]:
    """A finished operation's report (Struct numbers that are whole come back as ints, as the same
    report made locally has them), or its failure as the service's error type."""
    from google.protobuf import json_format

    if operation.state == pb.Operation.STATE_SUCCEEDED:
        return dict(_whole(json_format.MessageToDict(operation.response)))
    code = CODE_OF_NUMBER.get(operation.error.code, grpc.StatusCode.UNKNOWN)
    message = f"operation {operation.name} ({operation.kind} {operation.task}): {operation.error.message}"
    error: RaeeError
    if code == grpc.StatusCode.CANCELLED:
        error = RaeeError(message)
        error.reason = "CANCELLED"
    elif code == grpc.StatusCode.NOT_FOUND:
        error = TaskNotFound(operation.task)
    else:
        error = _ERRORS.get(code, RaeeError)(message)
    raise error


def _whole(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole(v) for v in value]
    return value


CODE_OF_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
