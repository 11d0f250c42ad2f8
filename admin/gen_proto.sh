#!/usr/bin/env bash
# Regenerate the Python code for proto/raee/v1/raee.proto and proto/inference/grpc_predict_v2.proto (the
# Open Inference Protocol's service); tests/test_proto.py fails when it is stale.
# google/rpc/status.proto comes from the googleapis-common-protos wheel (a grpcio-status dependency).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
python="${PYTHON:-.venv/bin/python}"
googleapis="$("$python" -c 'import google.rpc, pathlib; print(pathlib.Path(google.rpc.__path__[0]).parents[1])')"
"$python" -m grpc_tools.protoc -Iraee_server/protos=proto -I"$googleapis" \
  --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" proto/raee/v1/raee.proto \
  proto/inference/grpc_predict_v2.proto
# The descriptor with its comments (source info): the OpenAPI document's descriptions come from it.
"$python" -m grpc_tools.protoc -Iraee_server/protos=proto -I"$googleapis" --include_source_info \
  --descriptor_set_out="$out/raee_server/protos/raee/v1/raee.desc" proto/raee/v1/raee.proto
