#!/usr/bin/env bash
# Regenerate the Python code for proto/raee/v1/raee.proto (tests/test_proto.py fails when it is stale).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
.venv/bin/python -m grpc_tools.protoc -Iraee_server/protos=proto \
  --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" proto/raee/v1/raee.proto
