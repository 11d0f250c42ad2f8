#!/usr/bin/env bash
# Install, lint (ruff), type-check (mypy), then run the whole test suite (tiny random-weight models,
# plus the real Gemma 3 270M and MiniLM).
set -euo pipefail
cd "$(dirname "$0")/.."
bash admin/setup.sh
.venv/bin/ruff check raee tests
.venv/bin/mypy
# The real Postgres this machine (and CI) runs on 127.0.0.1:5432; tests create and drop their own databases.
export RAEE_TEST_DATABASE_URL="${RAEE_TEST_DATABASE_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/test}"
exec .venv/bin/python -m pytest "$@"
