"""The one place that decides which status code, message and details a failure gets, on every
transport: the gRPC servicer and interceptors use it, and the HTTP gateway passes its result on."""

from __future__ import annotations

import grpc

from raee_server.errors import (
    DeadlineExpired,
    InvalidInput,
    NotReady,
    OperationNotFound,
    Overloaded,
    PermissionDenied,
    RaeeError,
    RunningElsewhere,
    StoreMismatch,
    TaskExists,
    TaskNotFound,
    Unauthenticated,
)

MAX_MESSAGE = 2048  # characters of an error message sent to a caller

# The one place that decides which status code a failure gets. Anything else is
# INTERNAL with a generic message (the traceback goes to the log, never to the caller).
STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    TaskNotFound: grpc.StatusCode.NOT_FOUND,
    OperationNotFound: grpc.StatusCode.NOT_FOUND,
    TaskExists: grpc.StatusCode.ALREADY_EXISTS,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    StoreMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    RunningElsewhere: grpc.StatusCode.ABORTED,
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for kind, code in STATUS_CODES.items():
        if isinstance(exc, kind):
            message = str(exc)  # gRPC drops a status whose message overflows its 8 KB metadata limit
            return code, message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"


def error_details(exc: BaseException, code: grpc.StatusCode, message: str) -> tuple[tuple[str, str | bytes], ...]:
    """The failure as a google.rpc.Status with standard details, in the `grpc-status-details-bin`
    trailer: ErrorInfo (a stable reason), BadRequest (the request field at fault), RetryInfo (when
    a retry can help, after how long). Clients that do not read details still get code and message."""
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    details = []
    if isinstance(exc, RaeeError):
        details.append(error_details_pb2.ErrorInfo(reason=exc.reason, domain="raee.v1"))
        if isinstance(exc, InvalidInput) and exc.field:
            details.append(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=message)]))
        if exc.retry_after is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(exc.retry_after * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        wrapper = any_pb2.Any()
        wrapper.Pack(detail)
        packed.append(wrapper)
    status = rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=packed))
    return tuple(status.trailing_metadata)
