"""The service's error types: one place that says what kind of failure a caller sees.

The gRPC layer maps each class to one status code; the CLI prints the message.
Messages name the field, line or object at fault, never a traceback.
"""


def clip(value: str, limit: int = 80) -> str:
    """repr() of a caller's value, cut to `limit` characters: an error message names what was
    sent, but must not echo 10 KB back (gRPC caps a status message's size)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 12]}...' ({len(value)} chars)"


class RaeeError(Exception):
    """Base class for failures a caller can act on.

    `reason`: a stable UPPER_SNAKE name of the failure (the ErrorInfo reason on the wire);
    `retry_after`: seconds after which the same call may succeed (the RetryInfo on the wire), None
    when retrying cannot help."""

    reason = "ERROR"
    retry_after: float | None = None


class InvalidInput(RaeeError, ValueError):
    """The request or file is malformed; the message names the field or line, and `field` the
    request field's path where there is one (e.g. `options.k`): a BadRequest field violation."""

    reason = "INVALID_INPUT"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class TaskNotFound(RaeeError, LookupError):
    reason = "TASK_NOT_FOUND"

    def __init__(self, task: str) -> None:
        super().__init__(f"task {clip(task)} does not exist (create it with `raee-admin task create`)")
        self.task = task


class OperationNotFound(RaeeError, LookupError):
    reason = "OPERATION_NOT_FOUND"

    def __init__(self, name: str) -> None:
        super().__init__(f"operation {clip(name)} does not exist on this server (operations are kept in memory: "
                         "a restart forgets them)")


class TaskExists(RaeeError):
    reason = "TASK_EXISTS"

    def __init__(self, task: str) -> None:
        super().__init__(f"task {clip(task)} already exists")
        self.task = task


class NotReady(RaeeError):
    """A store or the model cannot serve right now (starting, stopping, unreachable)."""

    reason = "NOT_READY"
    retry_after = 1.0


class StoreMismatch(RaeeError):
    """The data directory was built for another backbone, encoder or format."""

    reason = "STORE_MISMATCH"


class RunningElsewhere(RaeeError):
    """Another replica holds the task's lease on background work (a fit or tune) now; retry after it
    ends or lapses."""

    reason = "RUNNING_ELSEWHERE"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Overloaded(RaeeError):
    """The request queue is full; retry with backoff."""

    reason = "OVERLOADED"
    retry_after = 0.25


class DeadlineExpired(RaeeError):
    """The caller's deadline passed before its compute started; it was dropped, not computed."""

    reason = "DEADLINE_EXPIRED"


class Unauthenticated(RaeeError):
    """No key, or a key the service does not know."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(RaeeError):
    """A known key used outside what it grants."""

    reason = "PERMISSION_DENIED"
