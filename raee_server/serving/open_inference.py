"""The Open Inference Protocol (KServe / Triton "v2") over gRPC: a model is a task, its input a BYTES
tensor of texts. The servicer converts tensors to and from the RaeeService's own classify path, so keys,
limits, batching, metrics and the access log are that path's (ObservedCalls wraps this service too);
open_inference_http.py transcodes the protocol's REST form onto it.

Inputs, outputs and parameters are listed in docs/inference-protocol.md; MODEL_INPUT and OUTPUTS below
are the one place that names them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import numpy as np

from raee_server import __version__
from raee_server.errors import InvalidInput, clip
from raee_server.protos.inference import grpc_predict_v2_pb2 as v2
from raee_server.protos.inference import grpc_predict_v2_pb2_grpc as v2_grpc
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.types import Example, TaskSpec

SERVICE_NAME = v2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})  # probes: no key, as grpc.health's
PLATFORM = "raee"
VERSION = "1"  # a task has one version: the records and heads it serves now
MODEL_INPUT = "text"
# name -> (datatype, shape per row): -1 is the row count; `L` the task's label count.
OUTPUTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "label": ("BYTES", ()),
    "probabilities": ("FP32", ("L",)),  # in the task's label order (the answer's `labels` parameter)
    "exit_layer": ("INT32", ()),
    "answered_by": ("BYTES", ()),  # "backbone", or "key" when the key cascade answered without the model
}
# Request parameters: ClassifyOptions' fields. Triton's clients may send `priority` and `timeout`:
# accepted and not used (the deadline is the call's own).
PARAMETERS = {"policy": "string_param", "k": "int64_param", "truncate": "bool_param"}
IGNORED_PARAMETERS = frozenset({"priority", "timeout", "binary_data_output"})
MAX_K = 2**32 - 1  # ClassifyOptions.k is a uint32; the classify path checks the task's own range


def encode_bytes(items: Sequence[bytes]) -> bytes:
    """A BYTES tensor's raw form: each element a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def decode_bytes(raw: bytes, count: int, where: str) -> list[bytes]:
    items, at = [], 0
    for i in range(count):
        if at + 4 > len(raw):
            raise InvalidInput(f"{where}: holds {i} of its {count} elements", where)
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise InvalidInput(f"{where}: element {i} runs past the end of the data", where)
        items.append(raw[at:at + size])
        at += size
    if at != len(raw):
        raise InvalidInput(f"{where}: {len(raw) - at} bytes after its {count} elements", where)
    return items


def parameter(value: v2.InferParameter) -> Any:
    kind = value.WhichOneof("parameter_choice")
    return None if kind is None else getattr(value, kind)


def classify_options(request: v2.ModelInferRequest) -> pb.ClassifyOptions:
    options = pb.ClassifyOptions()
    for name, value in request.parameters.items():
        if name in IGNORED_PARAMETERS:
            continue
        kind = PARAMETERS.get(name)
        if kind is None:
            raise InvalidInput(f"parameters: {clip(name, 40)} is not a parameter of this model; it takes "
                               f"{', '.join(PARAMETERS)}", "parameters")
        if value.WhichOneof("parameter_choice") != kind:
            raise InvalidInput(f"parameters.{name}: a {kind.removesuffix('_param')}, "
                               f"not {value.WhichOneof('parameter_choice') or 'nothing'}", f"parameters.{name}")
        given = parameter(value)
        if name == "k" and not 0 <= given <= MAX_K:
            raise InvalidInput(f"parameters.k: {given} is out of range", "parameters.k")
        setattr(options, name, given)
    return options


def input_examples(request: v2.ModelInferRequest, max_texts: int, inputs: Sequence[str] = (MODEL_INPUT,)
                   ) -> list[Example]:
    """The examples of a request: one BYTES tensor per input of the task (`text`, or a sentence pair's
    two), each of shape [N] or [N, 1] with UTF-8 elements, all of the same N. A single-text task's
    examples are its texts; a task with several inputs gets each row's inputs by name."""
    names = ", ".join(repr(n) for n in inputs)
    if len(request.inputs) != len(inputs):
        raise InvalidInput(f"inputs: this model takes {'one input' if len(inputs) == 1 else f'{len(inputs)} inputs'}"
                           f", {names}; got {len(request.inputs)}", "inputs")
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise InvalidInput("raw_input_contents: one entry per input", "raw_input_contents")
    columns: dict[str, list[str]] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name not in inputs or tensor.name in columns:
            raise InvalidInput(f"inputs[{i}].name: the input{' is' if len(inputs) == 1 else 's are'} {names}, "
                               f"not {clip(tensor.name, 40)}", f"inputs[{i}].name")
        raw = request.raw_input_contents[i] if request.raw_input_contents else None
        columns[tensor.name] = tensor_texts(tensor, i, raw, max_texts)
        if len(columns[tensor.name]) != len(columns[request.inputs[0].name]):
            raise InvalidInput(f"inputs[{i}].shape: {len(columns[tensor.name])} texts; inputs[0] has "
                               f"{len(columns[request.inputs[0].name])}", f"inputs[{i}].shape")
    if list(inputs) == [MODEL_INPUT]:
        return list(columns[MODEL_INPUT])
    return [{name: columns[name][row] for name in inputs} for row in range(len(columns[inputs[0]]))]


def tensor_texts(tensor: v2.ModelInferRequest.InferInputTensor, i: int, raw: bytes | None, max_texts: int
                 ) -> list[str]:
    """The UTF-8 texts of input tensor `i` (its raw contents, where the request sent them so)."""
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"inputs[{i}].datatype: {clip(tensor.name, 40)!r} is BYTES (UTF-8 texts), not "
                           f"{clip(tensor.datatype, 20)}", f"inputs[{i}].datatype")
    shape = list(tensor.shape)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1) or shape[0] < 1:
        raise InvalidInput(f"inputs[{i}].shape: [N] or [N, 1] with N >= 1, not {shape}", f"inputs[{i}].shape")
    count = shape[0]
    if count > max_texts:
        raise InvalidInput(f"inputs[{i}].shape: {count} texts, over the limit of {max_texts} per request "
                           "(RAEE_MAX_BATCH_TEXTS)", f"inputs[{i}].shape")
    if raw is not None:
        if tensor.contents.bytes_contents:
            raise InvalidInput("raw_input_contents: one entry per input, and no input's contents beside it",
                               "raw_input_contents")
        items = decode_bytes(raw, count, f"raw_input_contents[{i}]")
    else:
        items = list(tensor.contents.bytes_contents)
        if len(items) != count:
            raise InvalidInput(f"inputs[{i}].contents: {len(items)} elements for shape {shape}",
                               f"inputs[{i}].contents")
    texts = []
    for j, item in enumerate(items):
        try:
            texts.append(item.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"inputs[{i}] element {j}: not UTF-8 ({exc.reason} at byte {exc.start})",
                               f"inputs[{i}].contents") from None
    return texts


def requested_outputs(request: v2.ModelInferRequest) -> list[str]:
    names = [o.name for o in request.outputs] or list(OUTPUTS)
    for i, name in enumerate(names):
        if name not in OUTPUTS:
            raise InvalidInput(f"outputs[{i}].name: {clip(name, 40)} is not an output of this model; it has "
                               f"{', '.join(OUTPUTS)}", f"outputs[{i}].name")
    return names


def output_tensor(name: str, results: Sequence[pb.ClassifyResponse]) -> tuple[list[int], np.ndarray | bytes]:
    """An output's shape and data: a numpy array, or a BYTES tensor already in its raw form."""
    if name == "label":
        return [len(results)], encode_bytes([r.label.encode() for r in results])
    if name == "answered_by":
        return [len(results)], encode_bytes([(r.answered_by or "backbone").encode() for r in results])
    if name == "exit_layer":
        return [len(results)], np.array([r.exit_layer for r in results], dtype="<i4")
    scores = np.array([[s.score for s in r.scores] for r in results], dtype="<f4")
    return list(scores.shape), scores


def infer_response(request: v2.ModelInferRequest, names: Sequence[str],
                   results: Sequence[pb.ClassifyResponse]) -> v2.ModelInferResponse:
    """The answer with every output's data in raw_output_contents, as Triton answers (its clients read
    numeric outputs only from there)."""
    response = v2.ModelInferResponse(model_name=request.model_name, model_version=VERSION, id=request.id)
    if results:
        response.parameters["labels"].string_param = json.dumps([s.label for s in results[0].scores])
    for name in names:
        shape, data = output_tensor(name, results)
        response.outputs.add(name=name, datatype=OUTPUTS[name][0], shape=shape)
        response.raw_output_contents.append(data if isinstance(data, bytes) else data.tobytes())
    return response


Classify = Callable[[str, list[Example], pb.ClassifyOptions, grpc.aio.ServicerContext], Any]


class InferenceServicer(v2_grpc.GRPCInferenceServiceServicer):
    """The protocol's RPCs. `classify` is RaeeServicer's own path; `ready` says whether models and
    stores are loaded; `task_spec(name)` reads a task's spec (TaskNotFound when there is none)."""

    def __init__(self, classify: Classify, ready: Callable[[], bool],
                 task_spec: Callable[[str], Awaitable[TaskSpec]], max_texts: int) -> None:
        self.classify = classify
        self.ready = ready
        self.task_spec = task_spec
        self.max_texts = max_texts

    @staticmethod
    def _version(version: str) -> None:
        if version not in ("", VERSION):
            raise InvalidInput(f"version: a task has one version, {VERSION!r}; not {clip(version, 20)}", "version")

    async def ServerLive(self, request: v2.ServerLiveRequest, context: Any) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: v2.ServerReadyRequest, context: Any) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self.ready())

    async def ServerMetadata(self, request: v2.ServerMetadataRequest, context: Any) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(name="raee-serve", version=__version__, extensions=["binary_tensor_data"])

    async def ModelReady(self, request: v2.ModelReadyRequest, context: Any) -> v2.ModelReadyResponse:
        self._version(request.version)
        await self.task_spec(request.name)  # an unknown task is NOT_FOUND, as the protocol's servers answer
        return v2.ModelReadyResponse(ready=self.ready())

    async def ModelMetadata(self, request: v2.ModelMetadataRequest, context: Any) -> v2.ModelMetadataResponse:
        self._version(request.version)
        spec = await self.task_spec(request.name)
        tensor = v2.ModelMetadataResponse.TensorMetadata
        return v2.ModelMetadataResponse(
            name=request.name, versions=[VERSION], platform=PLATFORM,
            inputs=[tensor(name=name, datatype="BYTES", shape=[-1]) for name in spec.inputs],
            outputs=[tensor(name=name, datatype=datatype, shape=[-1, *(len(spec.labels) for _ in per_row)])
                     for name, (datatype, per_row) in OUTPUTS.items()])

    async def ModelInfer(self, request: v2.ModelInferRequest, context: Any) -> v2.ModelInferResponse:
        if request.model_version not in ("", VERSION):
            raise InvalidInput(f"model_version: a task has one version, {VERSION!r}; not "
                               f"{clip(request.model_version, 20)}", "model_version")
        options = classify_options(request)
        texts = input_examples(request, self.max_texts, (await self.task_spec(request.model_name)).inputs)
        names = requested_outputs(request)
        results = await self.classify(request.model_name, texts, options, context)
        return infer_response(request, names, results)
