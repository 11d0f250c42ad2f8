#!/usr/bin/env bash
# Create .venv and install the project with its test extras (idempotent; fast when already installed).
# torch is pinned to 2.13.0 in pyproject.toml: the CPU build; an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
fi
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e '.[test]'
# The client's dependencies as wheels, at the versions installed here: tests/test_wheel.py installs the built
# wheel into a fresh virtual environment from these alone (no index), as `pip install raee-serve` would.
client_deps="$(.venv/bin/python -c 'from importlib.metadata import version as v
print(" ".join(f"{n}=={v(n)}" for n in ("grpcio", "protobuf", "googleapis-common-protos")))')"
# shellcheck disable=SC2086
.venv/bin/pip download --quiet --only-binary :all: --dest .tools/wheelhouse $client_deps
