#!/usr/bin/env bash
# Install, then run the whole test suite (tiny random-weight models, plus the real Gemma 3 270M and MiniLM).
set -euo pipefail
cd "$(dirname "$0")/.."
bash admin/setup.sh
exec .venv/bin/python -m pytest "$@"
