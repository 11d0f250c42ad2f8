#!/usr/bin/env bash
# buf lint (STANDARD) and buf breaking (against proto/baseline.binpb, the contract as issue 16 left it)
# on proto/raee/v1/raee.proto. buf comes from npm (@bufbuild/buf, pinned) into .tools/.
# `bash admin/buf.sh --new-baseline` rewrites the baseline after an intended breaking change.
set -euo pipefail
cd "$(dirname "$0")/.."
version=1.75.0
buf=.tools/node_modules/.bin/buf
if [ ! -x "$buf" ] || [ "$("$buf" --version)" != "$version" ]; then
  npm install --silent --no-audit --no-fund --prefix .tools "@bufbuild/buf@$version" >/dev/null
fi
python="${PYTHON:-.venv/bin/python}"
googleapis="$("$python" -c 'import google.rpc, pathlib; print(pathlib.Path(google.rpc.__path__[0]).parents[1])')"
image="$(mktemp --suffix=.binpb)"
trap 'rm -f "$image"' EXIT
"$python" -m grpc_tools.protoc -Iproto -I"$googleapis" --include_imports --include_source_info \
  -o "$image" proto/raee/v1/raee.proto
if [ "${1:-}" = "--new-baseline" ]; then
  "$python" -m grpc_tools.protoc -Iproto -I"$googleapis" --include_imports -o proto/baseline.binpb \
    proto/raee/v1/raee.proto
  echo "wrote proto/baseline.binpb"
fi
"$buf" lint "$image" --config buf.yaml --path raee/v1/raee.proto
"$buf" breaking "$image" --config buf.yaml --against proto/baseline.binpb --path raee/v1/raee.proto
echo "buf lint and buf breaking: ok"
