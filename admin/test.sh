#!/usr/bin/env bash
# Install, lint (ruff), type-check (mypy), check the proto (buf lint, buf breaking), then run the whole
# test suite (tiny random-weight models, plus the real Gemma 3 270M and MiniLM, and the web console in
# headless Chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
bash admin/setup.sh
# The web console's browser tests drive Debian's Chromium and ChromeDriver: install them where apt-get can
# (as root); where it cannot, tests/test_console.py skips and says why.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium chromium-driver >/dev/null \
      || { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; }
  fi
fi
.venv/bin/ruff check raee_server migrations tests
.venv/bin/mypy
bash admin/buf.sh  # buf lint and buf breaking on the proto
# The real Postgres this machine (and CI) runs on 127.0.0.1:5432; tests create and drop their own databases.
export RAEE_TEST_DATABASE_URL="${RAEE_TEST_DATABASE_URL:-postgresql+psycopg://postgres@127.0.0.1:5432/test}"
exec .venv/bin/python -m pytest "$@"
