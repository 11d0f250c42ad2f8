#!/usr/bin/env bash
# Install, build the sst2 demo database from the shipped sample if none exists, classify a few sentences,
# then serve it over gRPC on 127.0.0.1:50051, HTTP/JSON and the web console on http://127.0.0.1:8080
# (metrics on 9464) until Ctrl-C / SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
bash admin/setup.sh
.venv/bin/raee-admin demo
echo "serving sst2 on 127.0.0.1:50051 (gRPC) and http://127.0.0.1:8080 (HTTP/JSON, web console); try:" >&2
echo "  .venv/bin/raee-admin classify --server 127.0.0.1:50051 --task sst2 \"a gorgeous film\"" >&2
echo "  curl -s -d '{\"text\": \"a gorgeous film\"}' http://127.0.0.1:8080/v1/tasks/sst2:classify" >&2
exec .venv/bin/raee-server --address 127.0.0.1:50051 --http-address 127.0.0.1:8080
