#!/usr/bin/env bash
# Served speed of the key-first cascade (issue 32), in one run, on a task's database built by
# `raee-admin bench` (records, exit features and heads):
#   bash admin/serve_keyfirst.sh DATA_DIR TASK DEV_FILE OUT
# Chooses the task's `auto` policy (`raee-admin tune`), starts this checkout's raee-server alone on the
# database, and runs `raee-admin loadtest` against it: `auto`, `full`, the heads-only cascades and the
# key-first cascades, each sequentially (p50) and with 16 concurrent clients for 30 s, side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
data=$(realpath "$1") task=$2 dev=$(realpath "$3") out=$(realpath -m "$4")
mkdir -p "$out"
admin=(.venv/bin/raee-admin --data-dir "$data")
"${admin[@]}" tune --task "$task" --json >"$out/tune.json"
RAEE_DATA_DIR="$data" RAEE_METRICS_PORT=-1 RAEE_HTTP_ADDRESS= RAEE_RETUNE_CHECK_SECONDS=3600 \
  .venv/bin/raee-server --address 127.0.0.1:50072 >"$out/server.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  .venv/bin/raee-admin health --server 127.0.0.1:50072 >/dev/null 2>&1 && break
  sleep 1
done
.venv/bin/raee-admin loadtest --server 127.0.0.1:50072 --task "$task" "$dev" --policy auto --policy full \
  --policy cascade:0.02 --policy cascade:0.05 --policy key-cascade:0.02 --policy key-cascade:0.05 \
  --clients 16 --seconds 30 --sequential 50 --json-out "$out/serving.json" | tee "$out/serving.txt"
# the figures side by side, drawn
.venv/bin/python - "$out" <<'PY'
import json, sys
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
out = Path(sys.argv[1])
runs = json.loads((out / "serving.json").read_text())
names = list(runs)
fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
a.bar(names, [runs[n]["sequential_p50_ms"] for n in names])
a.set_ylabel("sequential p50 (ms)")
b.bar(names, [runs[n]["throughput_rps"] for n in names])
b.set_ylabel("16 clients: requests / s")
for ax in (a, b):
    ax.tick_params(axis="x", rotation=30, labelsize=8)
fig.tight_layout()
fig.savefig(out / "serving.png", dpi=120)
PY
