"""Server logs: plain text or one JSON object per line, an access line per RPC, quiet libraries.

`RAEE_LOG_FORMAT=json` makes every line a JSON object (time, level, logger, message, and the
structured fields a record carries), what log shippers (Loki, Elastic, Cloud Logging) parse
without rules. Each RPC writes one access line (logger `raee.access`) with its method, task,
status code, duration, exit layer and request id: the `x-request-id` the client sent, else a
new one, which the reply's trailing metadata carries back. Every line written while a call runs
carries that call's request id, and its trace id when the caller sent a W3C `traceparent` (over
gRPC metadata or, through the gateway, an HTTP header), with tracing on or off.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import uuid
from datetime import UTC, datetime
from typing import Any

REQUEST_ID_KEY = "x-request-id"
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, bounded: it is echoed into logs
NOISY = ("alembic", "httpx", "httpcore", "urllib3", "sentence_transformers", "filelock", "huggingface_hub")
access = logging.getLogger("raee.access")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")
# The ids of the call being served: (request id, trace id or ""), set around each call (Accounting.observe).
CALL: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("raee_call", default=None)


class CallIds(logging.Filter):
    """Gives every record the ids of the call it was written in (none outside a call), as `ids` for
    the text format and in `fields` for JSON."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = dict(getattr(record, "fields", {}))
        ids = CALL.get()
        if ids is not None:
            fields.setdefault("request_id", ids[0])
            if ids[1]:
                fields.setdefault("trace_id", ids[1])
        record.fields = fields
        record.ids = "".join(f" {k}={fields[k]}" for k in ("request_id", "trace_id") if fields.get(k))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record; a record's `fields` (passed as `extra={"fields": {...}}`) are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: str, fmt: str) -> None:
    """Root logging for the server process (the libraries' INFO chatter quiet unless DEBUG)."""
    handler = logging.StreamHandler()
    handler.addFilter(CallIds())
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s%(ids)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if level.upper() != "DEBUG":
        for name in NOISY:
            logging.getLogger(name).setLevel(logging.WARNING)


def request_id(metadata: Any) -> str:
    """The client's x-request-id when it is a sane one, else a new id."""
    for key, value in metadata or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def trace_id(metadata: Any) -> str:
    """The trace id of a W3C `traceparent` among the metadata (32 hex digits), or ""."""
    for key, value in metadata or ():
        if key == "traceparent" and isinstance(value, str):
            found = _TRACEPARENT.fullmatch(value.strip())
            if found and found.group(1) != "0" * 32:
                return found.group(1)
    return ""


def log_access(method: str, task: str | None, code: str, seconds: float, rid: str, exit_layer: int | None,
               trace: str = "") -> None:
    fields = {"method": method, "task": task or "", "code": code, "duration_ms": round(1000 * seconds, 3),
              "request_id": rid, **({"trace_id": trace} if trace else {}),
              **({} if exit_layer is None else {"exit_layer": exit_layer})}
    access.info("%s %s %s %.1f ms", method, task or "-", code, 1000 * seconds, extra={"fields": fields})
