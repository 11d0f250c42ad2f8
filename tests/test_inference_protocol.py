"""The Open Inference Protocol (v2), called by its own client package, tritonclient, over HTTP and gRPC.

tritonclient registers the protocol's messages under protobuf's default pool, as the server does, so
its calls run in a child process (a process that holds both would clash on the shared names).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.serving.auth import add_key
from raee_server.serving.http_errors import HttpFailure
from raee_server.serving.open_inference_http import infer_request

from .grpc_harness import ServerThread
from .test_engine import ROWS
from .test_grpc import ingest, make_settings, tiny_engine_factory
from .unicode_strategies import weird_strings

TEXTS = ["a wonderful film", "dull and far too long", "ÿ ünïcödé ✓ 😀"]

CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

http_url, grpc_url, key, texts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])


def headers():  # a new dict per call: tritonclient.http adds its binary header's length to the one it gets
    return {"x-api-key": key}


out = {}
data = np.array([t.encode() for t in texts], dtype=np.object_)


def failure(call):
    try:
        call()
    except InferenceServerException as exc:
        return str(exc)
    return None


h = th.InferenceServerClient(http_url)
out["http_live"] = h.is_server_live()
out["http_ready"] = h.is_server_ready()
out["http_model_ready"] = h.is_model_ready("sentiment", headers=headers())
out["http_metadata"] = h.get_model_metadata("sentiment", headers=headers())
out["http_server"] = h.get_server_metadata(headers=headers())
for binary in (True, False):
    tensor = th.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(data, binary_data=binary)
    outputs = [th.InferRequestedOutput(n, binary_data=binary) for n in ("label", "probabilities", "exit_layer")]
    result = h.infer("sentiment", [tensor], outputs=outputs, headers=headers(), parameters={"policy": "full"})
    out[f"http_binary_{binary}"] = {n: result.as_numpy(n).tolist() for n in ("label", "probabilities", "exit_layer")}
tensor = th.InferInput("text", [len(texts)], "BYTES")
tensor.set_data_from_numpy(data)
result = h.infer("sentiment", [tensor], headers=headers(), parameters={"policy": "full"})  # every output, binary
out["http_all"] = {n: result.as_numpy(n).tolist() for n in ("label", "answered_by")}
out["http_no_key"] = failure(lambda: h.infer("sentiment", [tensor]))
out["http_unknown_model"] = failure(lambda: h.infer("nope", [tensor], headers=headers()))
wrong = th.InferInput("sentence", [len(texts)], "BYTES")
wrong.set_data_from_numpy(data)
out["http_wrong_input"] = failure(lambda: h.infer("sentiment", [wrong], headers=headers()))

g = tg.InferenceServerClient(grpc_url)
out["grpc_live"] = g.is_server_live()
out["grpc_ready"] = g.is_server_ready()
out["grpc_model_ready"] = g.is_model_ready("sentiment", headers=headers())
meta = g.get_model_metadata("sentiment", headers=headers(), as_json=True)
out["grpc_metadata"] = meta
tensor = tg.InferInput("text", [len(texts), 1], "BYTES")
tensor.set_data_from_numpy(data.reshape(-1, 1))
result = g.infer("sentiment", [tensor], headers=headers(), parameters={"policy": "full"})
out["grpc"] = {n: result.as_numpy(n).tolist() for n in ("label", "probabilities", "exit_layer")}
out["grpc_labels"] = json.loads(result.get_response().parameters["labels"].string_param)
out["grpc_no_key"] = failure(lambda: g.infer("sentiment", [tensor]))
out["grpc_bad_k"] = failure(lambda: g.infer("sentiment", [tensor], headers=headers(), parameters={"k": "five"}))
print(json.dumps(out, default=lambda b: b.decode()))
"""


@pytest.fixture
def keyed(tmp_path: Path) -> Iterator[tuple[ServerThread, str]]:
    key_file = tmp_path / "keys.toml"
    key = add_key(key_file, "reader", ["sentiment"], scope="classify")
    admin = add_key(key_file, "ops", [], scope="admin")
    settings = make_settings(tmp_path, api_keys_file=key_file)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    server.wait_ready()
    metadata = (("x-api-key", admin),)  # the harness's engine holds the task `sentiment`

    class Keyed:  # the harness's stub, with the admin key on every call
        def __init__(self, stub: Any) -> None:
            self.stub = stub

        def Ingest(self, messages: Any) -> Any:
            return self.stub.Ingest(messages, metadata=metadata)

    ingest(Keyed(server.stub), "sentiment", ROWS)
    yield server, key
    server.stop()


def test_triton_clients_call_the_service_over_http_and_grpc(keyed: tuple[ServerThread, str]) -> None:
    server, key = keyed
    expected = server.stub.ClassifyBatch(pb.ClassifyBatchRequest(
        task="sentiment", texts=TEXTS, options=pb.ClassifyOptions(policy="full")), metadata=(("x-api-key", key),))
    child = subprocess.run([sys.executable, "-c", CLIENT, f"127.0.0.1:{server.server.http_port}",
                            f"127.0.0.1:{server.port}", key, json.dumps(TEXTS)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout)
    assert out["http_live"] and out["http_ready"] and out["http_model_ready"]
    assert out["grpc_live"] and out["grpc_ready"] and out["grpc_model_ready"]
    labels = [r.label for r in expected.results]
    probabilities = [[s.score for s in r.scores] for r in expected.results]
    for name in ("http_binary_True", "http_binary_False", "grpc"):
        answer = out[name]
        assert answer["label"] in (labels, [[label] for label in labels]), name
        assert answer["exit_layer"] == [r.exit_layer for r in expected.results], name
        assert np.allclose(answer["probabilities"], probabilities, atol=1e-6), name
    assert out["grpc_labels"] == ["negative", "positive"]
    assert out["http_all"]["answered_by"] == ["backbone"] * len(TEXTS)
    for metadata in (out["http_metadata"], out["grpc_metadata"]):
        assert metadata["name"] == "sentiment" and metadata["platform"] == "raee"
        assert metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}] or \
            metadata["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": ["-1"]}]
        shapes = {o["name"]: [int(d) for d in o["shape"]] for o in metadata["outputs"]}
        assert shapes["probabilities"] == [-1, 2] and shapes["label"] == [-1]
    assert out["http_server"]["name"] == "raee-serve"
    assert "API key" in out["http_no_key"] and "API key" in out["grpc_no_key"]
    assert out["http_unknown_model"].startswith("[403]") and "'nope'" in out["http_unknown_model"]
    assert "inputs[0].name" in out["http_wrong_input"] and "'text'" in out["http_wrong_input"]
    assert "parameters.k" in out["grpc_bad_k"]


def _post(port: int, path: str, body: bytes, key: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST",
                                     headers={"x-api-key": key, "Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_bad_infer_bodies_are_400s_that_name_the_field(keyed: tuple[ServerThread, str]) -> None:
    server, key = keyed
    port = server.server.http_port
    assert port is not None
    path = "/v2/models/sentiment/infer"
    cases = {
        b"{": "not valid JSON",
        b"[]": "a JSON object",
        b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [7]}]}': "inputs[0].data[0]",
        b'{"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["one"]}]}': "raw_input_contents[0]",
        b'{"inputs": [{"name": "text", "shape": [1], "datatype": "FP32", "data": [1.0]}]}': "inputs[0].datatype",
        b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["\\ud800"]}]}': "not UTF-8",
        b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}], '
        b'"outputs": [{"name": "logits"}]}': "outputs[0].name",
        b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}], '
        b'"parameters": {"polcy": "full"}}': "parameters: 'polcy'",
        b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ' + b"[" * 5000 + b"]" * 5000
        + b"}]}": "JSON nested too deeply",
    }
    for body, named in cases.items():
        status, answer = _post(port, path, body, key)
        assert status == 400 and named in answer["error"], (body[:80], answer)
    header = b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 9}}]}'
    status, answer = _post(port, path, header + b"abc", key, {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "binary_data_size" in answer["error"], answer
    one = b'{"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}'
    status, answer = _post(port, "/v2/models/sentiment/versions/7/infer", one, key)
    assert status == 400 and "model_version" in answer["error"]
    status, answer = _post(port, path, json.dumps({"id": "req-1", "inputs": [
        {"name": "text", "shape": [1], "datatype": "BYTES", "data": [["fine"]]}]}).encode(), key)
    assert status == 200 and answer["id"] == "req-1" and answer["model_name"] == "sentiment"
    assert [o["name"] for o in answer["outputs"]] == ["label", "probabilities", "exit_layer", "answered_by"]


# JSON's own strings may hold lone surrogates ("\ud800"), which the wire (UTF-8) cannot.
json_strings = weird_strings(max_size=12, long=False) | st.text(st.characters(categories=("Cs",)), max_size=2)
json_keys = st.sampled_from(["inputs", "outputs", "name", "shape", "datatype", "data", "parameters", "id",
                             "binary_data_size", "binary_data", "binary_data_output", "policy", "k"]) | json_strings
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | json_strings | st.sampled_from(["text", "BYTES"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_keys, inner, max_size=5), max_leaves=24)


@settings(max_examples=300, deadline=None)
@given(json_values, st.binary(max_size=16))
def test_any_json_body_is_a_request_or_a_clear_refusal(body: Any, binary: bytes) -> None:
    """Whatever JSON arrives, the REST layer builds a gRPC request or refuses it with HttpFailure."""
    try:
        request, _ = infer_request("sentiment", "", body, binary)
    except HttpFailure as failure:
        assert failure.http_status == 400 and failure.status.message
    else:
        assert request.model_name == "sentiment"
        request.SerializeToString()
