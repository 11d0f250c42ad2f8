"""HTTP/JSON beside gRPC: every RPC at the route its `google.api.http` rule in the proto names.

The gateway transcodes and decides nothing. A request becomes the RPC's protobuf message (protobuf's
JSON mapping, path variables filled in), goes to this process's own gRPC server over a private Unix
socket, and the answer, or the google.rpc.Status of the failure with its details, comes back as
JSON. Auth (the API key header), limits, the model worker, metrics and the access log are the gRPC
path's: one place each. Streamed messages (ClassifyStream, Ingest) travel as newline-delimited JSON.

It also serves the web console at `/` and HTTP probes at `/healthz` (liveness) and `/readyz`
(readiness); other protocols' routes (the OpenAPI document, the Open Inference Protocol) are mounted
on it by the server, so this module depends on none of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import grpc
from aiohttp import web
from google.api import annotations_pb2, http_pb2
from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2  # noqa: F401  (registers the detail types for JSON)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from raee_server.errors import InvalidInput, Unauthenticated
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.serving import logs
from raee_server.serving.http_errors import (
    REQUEST_ID,
    HttpFailure,
    clip_message,
    error_response,
    from_rpc_error,
    invalid,
    status_body,
)
from raee_server.serving.interceptors import Accounting
from raee_server.types import METADATA_KEY

log = logging.getLogger(__name__)
SERVICE: ServiceDescriptor = pb.DESCRIPTOR.services_by_name["RaeeService"]
TIMEOUT_HEADER = "x-server-timeout"  # seconds, as Google's HTTP APIs take a deadline
NDJSON = "application/x-ndjson"
TRACE_HEADERS = ("traceparent", "tracestate")



def console_dir() -> Path:
    return Path(str(resources.files("raee_server.serving") / "console"))


# -- routes: read from the proto's google.api.http rules --------------------------------------------


@dataclass(frozen=True)
class Route:
    verb: str  # GET, POST, DELETE
    template: str  # e.g. /v1/tasks/{task}:classify
    pattern: re.Pattern[str]  # matches the raw (percent-encoded) path
    variables: tuple[str, ...]  # request fields bound by the path
    body: str  # "*": the body is the request message; "": no body (fields from the query)
    response_body: str  # "": the answer is the response message; else this field of it
    method: MethodDescriptor

    @property
    def name(self) -> str:
        return self.method.name

    def path(self, **values: str) -> str:
        """The path with its variables filled in (percent-encoded): what a client requests."""
        return re.sub(r"\{(\w+)\}", lambda m: quote(values[m.group(1)], safe=""), self.template)


def _rule(method: MethodDescriptor) -> http_pb2.HttpRule:
    return method.GetOptions().Extensions[annotations_pb2.http]


def routes(service: ServiceDescriptor = SERVICE) -> list[Route]:
    found = []
    for method in service.methods:
        rule = _rule(method)
        verb = rule.WhichOneof("pattern")
        if verb is None or verb == "custom":
            continue
        template: str = getattr(rule, verb)
        variables = tuple(re.findall(r"\{(\w+)\}", template))
        regex = "".join(f"(?P<{part[1:-1]}>[^/]*)" if part.startswith("{") else re.escape(part)
                        for part in re.split(r"(\{\w+\})", template))
        found.append(Route(verb.upper(), template, re.compile(regex + "$"), variables, rule.body, rule.response_body,
                           method))
    return found



def to_json(message: Message) -> dict[str, Any]:
    """protobuf's JSON mapping, with fields at their default value written out (0 is an exit layer),
    in the proto's field order (the mapping itself puts default-valued fields last)."""
    return _in_field_order(message, json_format.MessageToDict(message, always_print_fields_with_no_presence=True))


def _in_field_order(message: Message, data: dict[str, Any]) -> dict[str, Any]:
    ordered: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.json_name not in data:
            continue
        value = data[field.json_name]
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if field.message_type is not None and not is_map and field.message_type.full_name.startswith("raee."):
            items = getattr(message, field.name)
            value = [_in_field_order(m, v) for m, v in zip(items, value)] if field.is_repeated \
                else _in_field_order(items, value)
        ordered[field.json_name] = value
    return ordered


# -- the gateway ---------------------------------------------------------------------------------


class Gateway:
    """An aiohttp application in front of the gRPC server at `target` (this process's private socket)."""

    def __init__(self, target: str, max_message_bytes: int, accounting: Accounting | None = None,
                 mounts: Sequence[Callable[[Gateway], None]] = ()) -> None:
        """`mounts` add routes of other protocols (open_inference_http.py) before the catch-all RPC route."""
        self.max_message_bytes = max_message_bytes
        self.accounting = accounting
        limits = [("grpc.max_receive_message_length", max_message_bytes),
                  ("grpc.max_send_message_length", max_message_bytes)]
        self.channel = grpc.aio.insecure_channel(target, options=limits)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.routes = routes()
        self.calls: dict[str, Any] = {}
        for route in self.routes:
            method = route.method
            path = f"/{SERVICE.full_name}/{method.name}"
            request_cls = message_factory.GetMessageClass(method.input_type)
            response_cls = message_factory.GetMessageClass(method.output_type)
            kind = {(False, False): self.channel.unary_unary, (True, False): self.channel.stream_unary,
                    (True, True): self.channel.stream_stream}[(method.client_streaming, method.server_streaming)]
            self.calls[method.name] = kind(path, request_serializer=request_cls.SerializeToString,
                                           response_deserializer=response_cls.FromString)
        self.app = web.Application(client_max_size=max_message_bytes)
        self.app.router.add_get("/", self._console_index)
        self.app.router.add_static("/console/", console_dir(), show_index=False)
        self.app.router.add_get("/healthz", self._probe("liveness"))
        self.app.router.add_get("/readyz", self._probe("readiness"))
        for mount in mounts:
            mount(self)
        self.app.router.add_route("*", r"/{tail:[\s\S]*}", self._rpc)  # every other path: RPC routes, or a JSON 404
        self._runner: web.AppRunner | None = None

    # -- serving -----------------------------------------------------------------------------

    async def start(self, address: str, tls: ssl.SSLContext | None = None, grace: float = 10.0) -> int:
        """Listen on host:port (port 0: any free one); returns the bound port. On stop, calls in
        flight get `grace` seconds to finish."""
        host, _, port = address.rpartition(":")
        if not port.isdigit():
            raise InvalidInput(f"http_address: {address!r} is not host:port (RAEE_HTTP_ADDRESS)")
        # A path carries request fields (task names) percent-encoded: let it be as long as a message may be.
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=grace,
                                     max_line_size=self.max_message_bytes)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host.strip("[]") or None, int(port), ssl_context=tls,
                           reuse_address=True)
        await site.start()
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        await self.channel.close(None)

    async def _console_index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(console_dir() / "index.html")

    def _probe(self, service: str) -> Callable[[web.Request], Any]:
        async def probe(request: web.Request) -> web.Response:
            try:
                reply = await self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as exc:
                status = exc.code().name
            return web.json_response({"status": status}, status=200 if status == "SERVING" else 503)

        return probe

    # -- one RPC ----------------------------------------------------------------------------------

    async def _rpc(self, request: web.Request) -> web.StreamResponse:
        request_id = logs.request_id([(REQUEST_ID, request.headers.get(REQUEST_ID))])  # a sane one, else new
        try:
            route, values = self._match(request)
            metadata = self.call_metadata(request, request_id)
            timeout = self.call_timeout(request)
            call = self.calls[route.name]
            if route.method.client_streaming:
                self._authenticate_stream(route, metadata)
            if route.method.server_streaming:
                return await self._stream(request, route, values, call, metadata, timeout, request_id)
            if route.method.client_streaming:
                bad_input: list[HttpFailure] = []
                try:
                    reply = await self._call(call, _guarded(self._messages(request, route, values), bad_input),
                                             metadata, timeout)
                except asyncio.CancelledError:
                    if not bad_input:
                        raise
                    raise bad_input[0] from None
            else:
                reply = await self._call(call, await self._unary(request, route, values), metadata, timeout)
        except HttpFailure as failure:
            return error_response(failure, request_id)
        if route.response_body:
            reply = getattr(reply, route.response_body)
        return web.json_response(to_json(reply), headers={REQUEST_ID: request_id})

    def _authenticate_stream(self, route: Route, metadata: tuple[tuple[str, str], ...]) -> None:
        """A stream without a valid key is refused here, by the server's own key ring: when a server
        refuses a stream while its messages are still being sent, grpc.aio's client may report
        INTERNAL ("Internal error from Core") instead of the server's UNAUTHENTICATED."""
        if self.accounting is None or self.accounting.keys is None:
            return
        try:
            self.accounting.keys.authenticate(dict(metadata).get(METADATA_KEY))
        except Unauthenticated as exc:
            self.accounting.count(route.name, None, grpc.StatusCode.UNAUTHENTICATED, 0.0)
            raise HttpFailure(grpc.StatusCode.UNAUTHENTICATED, str(exc), reason=exc.reason) from None

    @staticmethod
    async def _call(call: Any, argument: Any, metadata: tuple[tuple[str, str], ...], timeout: float | None) -> Any:
        try:
            return await call(argument, metadata=metadata, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    def _match(self, request: web.Request) -> tuple[Route, dict[str, str]]:
        path = request.raw_path.split("?", 1)[0]
        verbs = []
        for route in self.routes:
            found = route.pattern.match(path)
            if found is None:
                continue
            if route.verb != request.method:
                verbs.append(route.verb)
                continue
            if request.query_string and route.body:
                raise invalid(f"query parameters: {route.verb} {route.template} takes its fields in the body")
            try:
                values = {name: unquote(value, errors="strict") for name, value in found.groupdict().items()}
            except UnicodeDecodeError as exc:
                raise invalid(f"path: a percent-encoded variable is not UTF-8 ({exc.reason})") from None
            return route, values
        if verbs:
            raise HttpFailure(grpc.StatusCode.UNIMPLEMENTED,
                              f"{request.method} {clip_message(path)}: use {', '.join(verbs)}", http_status=405,
                              headers={"Allow": ", ".join(verbs)}, reason="METHOD_NOT_ALLOWED")
        raise HttpFailure(grpc.StatusCode.NOT_FOUND, f"no route {request.method} {clip_message(path)}; "
                          "see /openapi.json", reason="NO_ROUTE")

    @staticmethod
    def call_metadata(request: web.Request, request_id: str) -> tuple[tuple[str, str], ...]:
        metadata = [(REQUEST_ID, request_id)]
        for header in TRACE_HEADERS:  # the caller's W3C trace context, for the gRPC side's span and logs
            value = request.headers.get(header)
            if value and len(value) <= 512 and all(" " <= c <= "~" for c in value):
                metadata.append((header, value))
        key = request.headers.get(METADATA_KEY)
        authorization = request.headers.get("Authorization", "")
        if key is None and authorization.lower().startswith("bearer "):
            key = authorization[7:].strip()
        if key:
            if not all(" " <= c <= "~" for c in key):  # what gRPC metadata can carry
                raise invalid(f"{METADATA_KEY}: an API key is printable ASCII")
            metadata.append((METADATA_KEY, key))
        return tuple(metadata)

    @staticmethod
    def call_timeout(request: web.Request) -> float | None:
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is None:
            return None
        try:
            seconds = float(raw)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds < 1e6:
            raise invalid(f"{TIMEOUT_HEADER}: {raw[:40]!r} is not a number of seconds over 0")
        return seconds

    def _parse(self, data: Any, route: Route, values: dict[str, str], where: str) -> Message:
        """One request message from its JSON value, path variables filled in."""
        if not isinstance(data, dict):
            raise invalid(f"{where}: a JSON object is expected, not {type(data).__name__}")
        message = message_factory.GetMessageClass(route.method.input_type)()
        try:
            json_format.ParseDict(data, message)
        except json_format.ParseError as exc:
            raise invalid(f"{where}: {exc}") from None
        except RecursionError:
            raise invalid(f"{where}: JSON nested too deeply") from None
        for name, value in values.items():
            given = getattr(message, name)
            if given and given != value:
                raise invalid(f"{name}: the path names {clip_message(value)!r} and the body {clip_message(given)!r}")
            setattr(message, name, value)
        return message

    @staticmethod
    def parse_json(raw: bytes, where: str) -> Any:
        try:
            return json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise invalid(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise invalid(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
        except RecursionError:  # json's decoder recurses per level: a hostile body must not reach a 500
            raise invalid(f"{where}: JSON nested too deeply") from None

    async def read_body(self, request: web.Request) -> bytes:
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise HttpFailure(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"body: over {self.max_message_bytes} bytes (RAEE_MAX_MESSAGE_BYTES)",
                              http_status=413, reason="BODY_TOO_LARGE") from None

    async def _unary(self, request: web.Request, route: Route, values: dict[str, str]) -> Message:
        if not route.body:  # GET, DELETE: fields other than the path's come from the query
            return self._parse(self._query(request, route), route, values, "query")
        raw = await self.read_body(request)
        return self._parse(self.parse_json(raw, "body") if raw.strip() else {}, route, values, "body")

    @staticmethod
    def _query(request: web.Request, route: Route) -> dict[str, Any]:
        """Query parameters as the request's scalar fields (`?page_size=10&page_token=...`)."""
        fields = route.method.input_type.fields
        by_name = {f.name: f for f in fields} | {f.json_name: f for f in fields}
        data: dict[str, Any] = {}
        for key, value in request.query.items():
            field = by_name.get(key)
            if field is None or field.message_type is not None or field.is_repeated or key in route.variables:
                raise invalid(f"query parameter {clip_message(key)!r}: not a field {route.verb} {route.template} takes")
            if field.type == field.TYPE_BOOL:
                if value not in ("true", "false"):
                    raise invalid(f"query parameter {key!r}: true or false, not {clip_message(value)!r}")
                data[field.name] = value == "true"
            else:
                data[field.name] = value
        return data

    async def _messages(self, request: web.Request, route: Route, values: dict[str, str]) -> AsyncIterator[Message]:
        """A streamed call's messages: NDJSON, one message per line, parsed as lines arrive; with
        Content-Type application/json, one JSON object or an array of them. A bad line fails the call
        (what earlier lines sent stays, as when a gRPC stream is cancelled)."""
        if request.content_type == "application/json":
            data = self.parse_json(await self.read_body(request), "body")
            for i, item in enumerate(data if isinstance(data, list) else [data]):
                yield self._parse(item, route, values, f"body[{i}]")
            return
        number = 0
        async for line in self._lines(request):
            number += 1
            if line.strip():
                yield self._parse(self.parse_json(line, f"body line {number}"), route, values, f"body line {number}")

    async def _lines(self, request: web.Request) -> AsyncIterator[bytes]:
        pending = b""
        async for chunk in request.content.iter_any():
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line
            if len(pending) > self.max_message_bytes:
                raise HttpFailure(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"body: a line over {self.max_message_bytes} bytes (RAEE_MAX_MESSAGE_BYTES)",
                                  http_status=413, reason="BODY_TOO_LARGE")
        if pending:
            yield pending

    async def _stream(self, request: web.Request, route: Route, values: dict[str, str], call: Any,
                      metadata: tuple[tuple[str, str], ...], timeout: float | None,
                      request_id: str) -> web.StreamResponse:
        """A server-streamed answer as NDJSON, one message per line as it comes. A failure before the
        first line is an HTTP error; after it, the last line is {"error": <google.rpc.Status>}."""
        bad_input: list[HttpFailure] = []
        response = web.StreamResponse(headers={"Content-Type": NDJSON, REQUEST_ID: request_id})
        failure = None
        try:
            async for reply in call(_guarded(self._messages(request, route, values), bad_input),
                                    metadata=metadata, timeout=timeout):
                if not response.prepared:
                    await response.prepare(request)
                await response.write(json.dumps(to_json(reply)).encode() + b"\n")
        except grpc.aio.AioRpcError as exc:
            failure = from_rpc_error(exc)
        except asyncio.CancelledError:
            if not bad_input:
                raise
        failure = bad_input[0] if bad_input else failure
        if failure is not None:
            if not response.prepared:
                return error_response(failure, request_id)
            await response.write(json.dumps({"error": status_body(failure.status)}).encode() + b"\n")
        if not response.prepared:
            await response.prepare(request)
        await response.write_eof()
        return response


async def _guarded(messages: AsyncIterator[Message], bad_input: list[HttpFailure]) -> AsyncIterator[Message]:
    """A streamed call's request messages; a bad one is kept for the answer and cancels the call (gRPC
    cancels a call whose request iterator raises): what earlier messages sent stays, as with a
    cancelled gRPC stream, and nothing is committed as if the input had ended there."""
    try:
        async for message in messages:
            yield message
    except HttpFailure as failure:
        bad_input.append(failure)
        raise


def tls_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """The gRPC port's TLS for the HTTP port: same certificate, same client-certificate rule."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
