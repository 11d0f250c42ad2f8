"""The Open Inference Protocol's REST form (`/v2/...`), transcoded onto its gRPC service
(open_inference.py) over the gateway's private channel, so keys, limits, metrics and logs are the gRPC
path's. Errors are the protocol's `{"error": "..."}` with the HTTP status of their gRPC code.

Triton's binary tensor data extension is supported both ways (tritonclient.http uses it by default):
the JSON header's length is the `Inference-Header-Content-Length` header, and each binary tensor
follows it, `binary_data_size` bytes long, in the order of the tensors that declare one.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from aiohttp import web

from raee_server.protos.inference import grpc_predict_v2_pb2 as v2
from raee_server.protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from raee_server.serving.gateway import Gateway
from raee_server.serving.http_errors import HttpFailure, failure_headers, from_rpc_error, invalid
from raee_server.serving.open_inference import decode_bytes, encode_bytes

HEADER_LENGTH = "Inference-Header-Content-Length"
NUMPY_TYPES = {"FP32": "<f4", "INT32": "<i4"}  # the numeric datatypes the outputs use


def mount(gateway: Gateway) -> None:
    """Add the protocol's routes to the gateway's application (a model is a task; `versions/1` optional)."""
    stub = v2_grpc.GRPCInferenceServiceStub(gateway.channel)
    handlers = _Handlers(gateway, stub)
    router = gateway.app.router
    router.add_get("/v2/health/live", handlers.live)
    router.add_get("/v2/health/ready", handlers.ready)
    router.add_get("/v2", handlers.server_metadata)
    for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        router.add_get(model, handlers.model_metadata)
        router.add_get(model + "/ready", handlers.model_ready)
        router.add_post(model + "/infer", handlers.infer)


def _parameter(name: str, value: Any, into: v2.InferParameter) -> None:
    if isinstance(value, bool):
        into.bool_param = value
    elif isinstance(value, int) and -2**63 <= value < 2**63:
        into.int64_param = value
    elif isinstance(value, float):
        into.double_param = value
    elif isinstance(value, str):
        into.string_param = value
    else:
        raise invalid(f"{name}: a parameter is a boolean, number or string, not {type(value).__name__}")


def _parameters(data: Any, where: str, into: Any) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise invalid(f"{where}: an object of parameters, not {type(data).__name__}")
    for key, value in data.items():
        _parameter(f"{where}.{key}", value, into[key])


def _flat(data: Any, where: str) -> list[Any]:
    """A tensor's `data`: a row-major array, flat or nested."""
    if not isinstance(data, list):
        raise invalid(f"{where}: an array, not {type(data).__name__}")
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:  # iterative: a hostile nesting depth must not overflow the stack
        item = next(stack[-1], StopIteration)
        if item is StopIteration:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            flat.append(item)
    return flat


def infer_request(name: str, version: str, header: Any, binary: bytes) -> tuple[v2.ModelInferRequest, set[str]]:
    """The gRPC request of a REST infer body, and the outputs the caller wants as binary data."""
    if not isinstance(header, dict):
        raise invalid(f"body: a JSON object, not {type(header).__name__}")
    request = v2.ModelInferRequest(model_name=name, model_version=version)
    if not isinstance(header.get("id", ""), str):
        raise invalid("id: a string")
    request.id = header.get("id", "")
    _parameters(header.get("parameters"), "parameters", request.parameters)
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        raise invalid("inputs: an array of input tensors")
    at = 0
    for i, tensor in enumerate(inputs):
        where = f"inputs[{i}]"
        if not isinstance(tensor, dict):
            raise invalid(f"{where}: an object, not {type(tensor).__name__}")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and 0 <= d < 2**63 for d in shape):
            raise invalid(f"{where}.shape: an array of sizes")
        if not isinstance(tensor.get("name"), str) or not isinstance(tensor.get("datatype"), str):
            raise invalid(f"{where}: name and datatype are strings")
        entry = request.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=shape)
        parameters = dict(tensor.get("parameters") or {})
        size = parameters.pop("binary_data_size", None)
        _parameters(parameters, f"{where}.parameters", entry.parameters)
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(binary) - at:
                raise invalid(f"{where}.parameters.binary_data_size: {size!r} is not the size of the binary "
                              f"data left ({len(binary) - at} bytes)")
            request.raw_input_contents.append(binary[at:at + size])
            at += size
        elif entry.datatype == "BYTES":
            items = _flat(tensor.get("data"), f"{where}.data")
            for j, item in enumerate(items):
                if not isinstance(item, str):
                    raise invalid(f"{where}.data[{j}]: a BYTES element in JSON is a string")
            request.raw_input_contents.append(encode_bytes([item.encode("utf-8", "surrogatepass")
                                                            for item in items]))
        else:
            request.raw_input_contents.append(b"")  # the service refuses a non-BYTES input by its datatype
    if at != len(binary):
        raise invalid(f"body: {len(binary) - at} bytes of binary data no input declares")
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list):
        raise invalid("outputs: an array of requested outputs")
    wanted_binary: set[str] = set()
    all_binary = (header.get("parameters") or {}).get("binary_data_output") is True
    for i, output in enumerate(outputs):
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise invalid(f"outputs[{i}]: an object with a name")
        request.outputs.add(name=output["name"])
        if (output.get("parameters") or {}).get("binary_data", all_binary) is True:
            wanted_binary.add(output["name"])
    if all_binary and not outputs:
        wanted_binary = {"*"}
    return request, wanted_binary


def _output_data(tensor: v2.ModelInferResponse.InferOutputTensor, raw: bytes) -> list[Any]:
    if tensor.datatype == "BYTES":
        return [item.decode() for item in decode_bytes(raw, int(np.prod(tensor.shape)), tensor.name)]
    return np.frombuffer(raw, dtype=NUMPY_TYPES[tensor.datatype]).tolist()


def infer_body(response: v2.ModelInferResponse, wanted_binary: set[str]) -> tuple[bytes, int | None]:
    """The REST answer: JSON, or a JSON header followed by the binary outputs (and the header's length)."""
    outputs, tail = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if "*" in wanted_binary or tensor.name in wanted_binary:
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = _output_data(tensor, raw)
        outputs.append(entry)
    body: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        body["id"] = response.id
    if response.parameters:
        body["parameters"] = {k: getattr(v, v.WhichOneof("parameter_choice") or "string_param")
                              for k, v in response.parameters.items()}
    body["outputs"] = outputs
    header = json.dumps(body).encode()
    return (header + b"".join(tail), len(header)) if tail else (header, None)


class _Handlers:
    def __init__(self, gateway: Gateway, stub: v2_grpc.GRPCInferenceServiceStub) -> None:
        self.gateway = gateway
        self.stub = stub

    async def _answer(self, request: web.Request, call: Callable[..., Awaitable[Any]], message: Any,
                      answer: Callable[[Any], web.Response]) -> web.Response:
        from raee_server.serving import logs

        request_id = logs.request_id([("x-request-id", request.headers.get("x-request-id"))])
        try:
            metadata = self.gateway.call_metadata(request, request_id)
            try:
                reply = await call(message, metadata=metadata, timeout=self.gateway.call_timeout(request))
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from None
            response = answer(reply)
        except HttpFailure as failure:
            return web.json_response({"error": failure.status.message}, status=failure.http_status,
                                     headers=failure_headers(failure, request_id))
        response.headers["x-request-id"] = request_id
        return response

    @staticmethod
    def _health(ok: bool, field: str) -> web.Response:
        return web.json_response({field: ok}, status=200 if ok else 400)  # the protocol: 4xx means false

    async def live(self, request: web.Request) -> web.Response:
        return await self._answer(request, self.stub.ServerLive, v2.ServerLiveRequest(),
                                  lambda r: self._health(r.live, "live"))

    async def ready(self, request: web.Request) -> web.Response:
        return await self._answer(request, self.stub.ServerReady, v2.ServerReadyRequest(),
                                  lambda r: self._health(r.ready, "ready"))

    async def server_metadata(self, request: web.Request) -> web.Response:
        return await self._answer(request, self.stub.ServerMetadata, v2.ServerMetadataRequest(), lambda r: (
            web.json_response({"name": r.name, "version": r.version, "extensions": list(r.extensions)})))

    async def model_ready(self, request: web.Request) -> web.Response:
        message = v2.ModelReadyRequest(name=request.match_info["name"], version=request.match_info.get("version", ""))
        return await self._answer(request, self.stub.ModelReady, message, lambda r: self._health(r.ready, "ready"))

    async def model_metadata(self, request: web.Request) -> web.Response:
        message = v2.ModelMetadataRequest(name=request.match_info["name"],
                                          version=request.match_info.get("version", ""))
        return await self._answer(request, self.stub.ModelMetadata, message, lambda r: web.json_response({
            "name": r.name, "versions": list(r.versions), "platform": r.platform,
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in r.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in r.outputs]}))

    async def infer(self, request: web.Request) -> web.Response:
        try:
            body = await self.gateway.read_body(request)
            length = request.headers.get(HEADER_LENGTH)
            if length is not None and not (length.isdigit() and int(length) <= len(body)):
                raise invalid(f"{HEADER_LENGTH}: {length[:20]!r} is not a length within the body")
            split = len(body) if length is None else int(length)
            header = self.gateway.parse_json(body[:split], "body")
            message, wanted_binary = infer_request(request.match_info["name"], request.match_info.get("version", ""),
                                                   header, body[split:])
        except HttpFailure as failure:
            return web.json_response({"error": failure.status.message}, status=failure.http_status)

        def answer(reply: v2.ModelInferResponse) -> web.Response:
            data, header_length = infer_body(reply, wanted_binary)
            if header_length is None:
                return web.Response(body=data, content_type="application/json")
            return web.Response(body=data, content_type="application/octet-stream",
                                headers={HEADER_LENGTH: str(header_length)})

        return await self._answer(request, self.stub.ModelInfer, message, answer)

