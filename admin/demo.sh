#!/usr/bin/env bash
# Install, build the sst2 demo database from the shipped sample if none exists, classify a few sentences.
set -euo pipefail
cd "$(dirname "$0")/.."
bash admin/setup.sh
exec .venv/bin/raee-admin demo "$@"
