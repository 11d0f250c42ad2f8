"""A small synchronous client for the gRPC service (used by `raee-admin --server`)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from raee.errors import (
    InvalidInput,
    NotReady,
    Overloaded,
    PermissionDenied,
    RaeeError,
    TaskExists,
    TaskNotFound,
    Unauthenticated,
)
from raee.protos.raee.v1 import raee_pb2 as pb
from raee.protos.raee.v1 import raee_pb2_grpc as pb_grpc
from raee.types import METADATA_KEY, IngestReport, Neighbour, Prediction, Rejected, Row, TaskSpec

_ERRORS = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.UNAVAILABLE: NotReady,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
}


# Reads are safe to repeat, so the channel retries them when the server sheds load
# (RESOURCE_EXHAUSTED: its queue is full) or is briefly unavailable (loading, restarting), with
# jittered exponential back-off: a rejected burst spreads out instead of returning at once.
# Ingest is not retried here: a client stream cannot be replayed once sent (re-running it is
# harmless, rows are deduplicated). Other gRPC clients can use the same service config.
RETRY_SERVICE_CONFIG = {
    "methodConfig": [{
        "name": [{"service": "raee.v1.Raee", "method": m}
                 for m in ("Classify", "ClassifyBatch", "GetTask", "ListTasks")],
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.25s",
            "maxBackoff": "4s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["RESOURCE_EXHAUSTED", "UNAVAILABLE"],
        },
    }]
}
CHANNEL_OPTIONS = [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG))]


class _WithMetadata:
    """The stub with the caller's metadata (the API key) added to every call."""

    def __init__(self, stub: pb_grpc.RaeeStub, metadata: list[tuple[str, str]]) -> None:
        self._stub = stub
        self._metadata = metadata

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)
        return lambda *args, **kwargs: method(*args, metadata=self._metadata, **kwargs)


def _raise(exc: grpc.RpcError, task: str) -> None:
    code = exc.code()
    if code == grpc.StatusCode.NOT_FOUND:
        raise TaskNotFound(task) from None
    raise _ERRORS.get(code, RaeeError)(f"server: {code.name}: {exc.details()}") from None


class RaeeClient:
    """`api_key` goes in the x-api-key metadata of every call; `tls_ca` (PEM bytes) turns on TLS,
    `tls_cert`/`tls_key` add a client certificate for mutual TLS."""

    def __init__(self, address: str, timeout: float = 60.0, api_key: str | None = None,
                 tls_ca: bytes | None = None, tls_cert: bytes | None = None, tls_key: bytes | None = None) -> None:
        if tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(tls_ca, private_key=tls_key, certificate_chain=tls_cert)
            self.channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        raw = pb_grpc.RaeeStub(self.channel)
        self.stub = _WithMetadata(raw, [(METADATA_KEY, api_key)] if api_key else [])
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def classify(self, task: str, texts: list[str], policy: str | None = None, k: int | None = None,
                 neighbours: bool = False) -> list[Prediction]:
        options = pb.ClassifyOptions(policy=policy or "", k=k or 0, return_neighbours=neighbours)
        try:
            reply = self.stub.ClassifyBatch(pb.ClassifyBatchRequest(task=task, texts=texts, options=options),
                                            timeout=self.timeout)
        except grpc.RpcError as exc:
            _raise(exc, task)
        return [
            Prediction(
                label=r.label, scores=[s.score for s in r.scores], exit_layer=r.exit_layer, depth=r.depth,
                labels=[s.label for s in r.scores],
                neighbours=[Neighbour(n.id, n.similarity, n.label, tuple(zip(n.exit_layers, n.exit_probabilities)))
                            for n in r.neighbours],
                timings_us={"queue_us": r.timings.queue_us, "encode_us": r.timings.encode_us,
                            "retrieve_us": r.timings.retrieve_us, "forward_us": r.timings.forward_us,
                            "total_us": r.timings.total_us},
            )
            for r in reply.results
        ]

    def create_task(self, spec: TaskSpec) -> None:
        request = pb.CreateTaskRequest(name=spec.name, template=spec.template, description=spec.description,
                                       labels=[pb.Label(name=lb.name, word=lb.word) for lb in spec.labels])
        try:
            self.stub.CreateTask(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                raise TaskExists(spec.name) from None
            _raise(exc, spec.name)

    def delete_task(self, name: str) -> None:
        try:
            self.stub.DeleteTask(pb.DeleteTaskRequest(name=name), timeout=self.timeout)
        except grpc.RpcError as exc:
            _raise(exc, name)

    def labels(self, task: str) -> list[str]:
        try:
            return [lb.name for lb in self.stub.GetTask(pb.GetTaskRequest(name=task), timeout=self.timeout).labels]
        except grpc.RpcError as exc:
            _raise(exc, task)
        return []

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
