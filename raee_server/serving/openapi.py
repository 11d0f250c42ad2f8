"""The OpenAPI 3.1 document of the HTTP/JSON API, generated from the proto: its routes are the
`google.api.http` rules, its schemas protobuf's JSON mapping of the messages, its descriptions the
proto's comments (read from the descriptor set that admin/gen_proto.sh writes with source info).

`raee-admin openapi` prints it; the gateway serves it at /openapi.json; docs/openapi.json is a copy
that tests/test_gateway.py keeps equal to it.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from aiohttp import web
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from raee_server.serving.gateway import NDJSON, REQUEST_ID, SERVICE, TIMEOUT_HEADER, Gateway, routes
from raee_server.types import METADATA_KEY

INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
         FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}
INT32 = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_SINT32,
         FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32}
STATUS = "google.rpc.Status"


@cache
def _comments() -> dict[str, str]:
    """Leading comments by element: "Message", "Message.field", "Service.Method"."""
    raw = (resources.files("raee_server.protos.raee.v1") / "raee.desc").read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(raw)
    found: dict[str, str] = {}
    for f in files.file:
        if f.package != "raee.v1":
            continue
        names: dict[tuple[int, ...], str] = {}
        for i, message in enumerate(f.message_type):
            names[(4, i)] = message.name
            for j, field in enumerate(message.field):
                names[(4, i, 2, j)] = f"{message.name}.{field.name}"
        for i, service in enumerate(f.service):
            names[(6, i)] = service.name
            for j, method in enumerate(service.method):
                names[(6, i, 2, j)] = f"{service.name}.{method.name}"
        for location in f.source_code_info.location:
            name = names.get(tuple(location.path))
            if name and location.leading_comments.strip():
                found[name] = " ".join(line.strip() for line in location.leading_comments.strip().splitlines())
    return found


def _ref(message: Descriptor) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{message.full_name}"}


def _scalar(field: FieldDescriptor, wanted: dict[str, Descriptor]) -> dict[str, Any]:
    t = field.type
    if field.message_type is not None:
        wanted[field.message_type.full_name] = field.message_type
        return _ref(field.message_type)
    if t == FieldDescriptor.TYPE_STRING:
        return {"type": "string"}
    if t == FieldDescriptor.TYPE_BOOL:
        return {"type": "boolean"}
    if t in INT64:  # protobuf's JSON mapping writes 64-bit integers as strings
        return {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
    if t in INT32:
        unsigned = t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32)
        return {"type": "integer", "format": "int32", **({"minimum": 0} if unsigned else {})}
    if t in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return {"type": "number", "format": "float" if t == FieldDescriptor.TYPE_FLOAT else "double"}
    if t == FieldDescriptor.TYPE_BYTES:
        return {"type": "string", "format": "byte"}
    if field.enum_type is not None:
        return {"type": "string", "enum": [v.name for v in field.enum_type.values]}
    raise ValueError(f"{field.full_name}: no JSON schema for type {t}")


def _schema(message: Descriptor, wanted: dict[str, Descriptor]) -> dict[str, Any]:
    if message.full_name == "google.protobuf.Any":
        return {"type": "object", "properties": {"@type": {"type": "string"}}, "additionalProperties": True,
                "description": "A detail message; `@type` names it (e.g. type.googleapis.com/google.rpc.ErrorInfo)."}
    comments = _comments()
    properties: dict[str, Any] = {}
    for field in message.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            schema: dict[str, Any] = {"type": "object", "additionalProperties": _scalar(value, wanted)}
        elif field.is_repeated:
            schema = {"type": "array", "items": _scalar(field, wanted)}
        else:
            schema = _scalar(field, wanted)
        text = comments.get(f"{message.name}.{field.name}")
        if text:
            schema = {**schema, "description": text} if "$ref" not in schema else {"allOf": [schema],
                                                                                   "description": text}
        properties[field.json_name] = schema
    result: dict[str, Any] = {"type": "object", "properties": properties}
    if comments.get(message.name):
        result["description"] = comments[message.name]
    return result


@cache
def openapi() -> dict[str, Any]:
    comments = _comments()
    wanted: dict[str, Descriptor] = {}
    paths: dict[str, dict[str, Any]] = {}
    error = {"description": "The failure as a google.rpc.Status; the HTTP status is its code's, as "
                            "google/rpc/code.proto maps them (413 for a body over the size limit)",
             "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{STATUS}"}}}}
    for route in routes():
        method = route.method
        wanted[method.input_type.full_name] = method.input_type
        wanted[method.output_type.full_name] = method.output_type
        operation: dict[str, Any] = {
            "operationId": method.name,
            "summary": comments.get(f"{SERVICE.name}.{method.name}", method.name).split(". ")[0].rstrip("."),
            "description": comments.get(f"{SERVICE.name}.{method.name}", ""),
            "parameters": [{"name": v, "in": "path", "required": True, "schema": {"type": "string"},
                            "description": f"the request's `{v}` field"} for v in route.variables] + [
                {"name": REQUEST_ID, "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "echoed in the answer's header and the server's access log; one is made if absent"},
                {"name": TIMEOUT_HEADER, "in": "header", "required": False,
                 "schema": {"type": "number", "exclusiveMinimum": 0},
                 "description": "the call's deadline in seconds (gRPC's deadline)"}] + [
                {"name": f.name, "in": "query", "required": False, "schema": _scalar(f, wanted),
                 "description": comments.get(f"{method.input_type.name}.{f.name}", "")}
                for f in method.input_type.fields if not route.body and f.name not in route.variables],
            "responses": {"default": error},
        }
        request_schema = _ref(method.input_type)
        if route.body == "*":
            if method.client_streaming:
                content = {NDJSON: {"schema": request_schema},
                           "application/json": {"schema": {"oneOf": [request_schema,
                                                                     {"type": "array", "items": request_schema}]}}}
                text = "one message per line (application/x-ndjson), or one object or an array of them"
            else:
                content = {"application/json": {"schema": request_schema}}
                text = "the request message; fields in the path may be left out"
            operation["requestBody"] = {"required": True, "description": text, "content": content}
        response_schema = _ref(method.output_type)
        if route.response_body:  # the answer is one field of the response message
            response_schema = _scalar(method.output_type.fields_by_name[route.response_body], wanted)
        if method.server_streaming:
            line = {"oneOf": [response_schema, {"type": "object", "properties": {
                "error": {"$ref": f"#/components/schemas/{STATUS}"}}, "required": ["error"]}]}
            operation["responses"]["200"] = {"description": "one answer per line, as they come; a failure of "
                                                            "the whole call after the first line ends it as "
                                                            "{\"error\": google.rpc.Status}",
                                             "content": {NDJSON: {"schema": line}}}
        else:
            operation["responses"]["200"] = {"description": "OK",
                                             "content": {"application/json": {"schema": response_schema}}}
        paths.setdefault(route.template, {})[route.verb.lower()] = operation
    from google.rpc import status_pb2

    wanted[STATUS] = status_pb2.Status.DESCRIPTOR
    schemas: dict[str, Any] = {}
    while len(schemas) < len(wanted):
        for name, message in sorted(wanted.items()):
            if name not in schemas:
                schemas[name] = _schema(message, wanted)
    return {
        "openapi": "3.1.0",
        "info": {"title": "RAEE Serve", "version": SERVICE.file.package,
                 "description": " ".join([
                     "Retrieval-augmented early-exit classification over HTTP/JSON, one to one with the gRPC "
                     f"service {SERVICE.full_name}: generated from proto/raee/v1/raee.proto.",
                     "Bodies and answers use protobuf's JSON mapping (lowerCamelCase names; proto names are "
                     "accepted too; 64-bit integers are strings)."])},
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {
                "apiKey": {"type": "apiKey", "in": "header", "name": METADATA_KEY},
                "bearer": {"type": "http", "scheme": "bearer", "description": "the API key as a bearer token"},
            },
        },
        "security": [{}, {"apiKey": []}, {"bearer": []}],
    }


def mount(gateway: Gateway) -> None:
    """Serve the document at /openapi.json (the gateway mounts it; it does not import this module)."""

    async def document(request: web.Request) -> web.Response:
        return web.json_response(openapi())

    gateway.app.router.add_get("/openapi.json", document)
