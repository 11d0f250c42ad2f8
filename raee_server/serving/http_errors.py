"""HTTP's side of the service's failures: the status each gRPC code gets, and the failures the gateway
and the protocols mounted on it answer with (a google.rpc.Status with ErrorInfo, Retry-After)."""

from __future__ import annotations

from typing import Any

import grpc
from aiohttp import web
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from raee_server.serving.status import MAX_MESSAGE

REQUEST_ID = "x-request-id"

# google.rpc.Code -> HTTP status, as google/rpc/code.proto documents it.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
CODE_OF_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class HttpFailure(Exception):
    """A request the gateway answers itself, before or instead of a gRPC call. Its own failures carry
    an ErrorInfo as the gRPC path's do (`reason`; default the code's name); a failure of the gRPC call
    brings the servicer's details along instead."""

    def __init__(self, code: grpc.StatusCode, message: str, http_status: int | None = None,
                 details: status_pb2.Status | None = None, headers: dict[str, str] | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message)
        if details is None:
            details = status_pb2.Status(code=code.value[0], message=clip_message(message))
            details.details.add().Pack(error_details_pb2.ErrorInfo(reason=reason or code.name, domain="raee.v1"))
        self.status = details
        self.http_status = http_status or HTTP_STATUS.get(code, 500)
        self.headers = headers or {}


def clip_message(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


def invalid(message: str) -> HttpFailure:
    return HttpFailure(grpc.StatusCode.INVALID_ARGUMENT, message, reason="INVALID_INPUT")


def from_rpc_error(exc: grpc.aio.AioRpcError) -> HttpFailure:
    """The failure with the details the servicer attached (grpc-status-details-bin), or code and message."""
    status = None
    trailers: Any = exc.trailing_metadata() or ()  # grpc-stubs type it as one entry; it is a sequence
    for key, value in trailers:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
    code = exc.code()
    return HttpFailure(code, exc.details() or code.name, details=status)


def status_body(status: status_pb2.Status) -> dict[str, Any]:
    body = json_format.MessageToDict(status)
    body.setdefault("code", status.code)
    body.setdefault("message", status.message)
    return body


def failure_headers(failure: HttpFailure, request_id: str) -> dict[str, str]:
    headers = {REQUEST_ID: request_id, **failure.headers}
    for detail in failure.status.details:  # HTTP's own way to say when to retry (429, 503)
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            headers["Retry-After"] = str(max(1, round(info.retry_delay.ToNanoseconds() / 1e9)))
    return headers


def error_response(failure: HttpFailure, request_id: str) -> web.Response:
    return web.json_response(status_body(failure.status), status=failure.http_status,
                             headers=failure_headers(failure, request_id))

