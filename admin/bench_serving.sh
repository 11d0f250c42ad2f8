#!/usr/bin/env bash
# Serving speed of this checkout against earlier commits, in one run, on the sst2 demo database:
#   bash admin/bench_serving.sh OUT [REV ...]
# For each REV (a git worktree of it, sharing this checkout's .venv) and then this checkout: build
# the demo database with that code, start its raee-server alone on the machine, run its own
# `raee-admin loadtest` (sequential p50, then 16 clients for 30 s per policy), stop it. Policies a
# REV does not know (cascades before exit heads) are left out of its run. JSON per code path goes to OUT/<name>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "$1"); shift
mkdir -p "$out"
root=$(pwd)
py="$root/.venv/bin/python"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; for w in "$work"/src-*; do git -C "$root" worktree remove --force "$w" 2>/dev/null || true; done; rm -rf "$work"' EXIT
POLICIES=(paper full knn-agree cascade:0.01)

modules() {  # a checkout's server and CLI modules, by its package layout
  if [ -f "$1/raee_server/serving/server.py" ]; then echo "raee_server.serving.server raee_server.cli.main"
  elif [ -d "$1/raee" ]; then echo "raee.serving.server raee.cli.main"
  else echo "raee_server.grpc_server admin.cli"; fi  # the first layout, before exit heads
}

run_one() {  # name src
  local name=$1 src=$2 data="$work/data-$1" server_module cli
  read -r server_module cli < <(modules "$src")
  echo "== $name ($src)" >&2
  (cd "$src" && PYTHONPATH="$src" RAEE_MODEL_CACHE="$work/models-$name" \
    "$py" -m "$cli" --data-dir "$data" demo >"$out/$name-demo.log" 2>&1)
  (cd "$src" && PYTHONPATH="$src" RAEE_MODEL_CACHE="$work/models-$name" RAEE_DATA_DIR="$data" \
    RAEE_METRICS_PORT=-1 RAEE_HTTP_ADDRESS= exec "$py" -c "from $server_module import main; main()" \
    --address 127.0.0.1:50071 \
    >"$out/$name-server.log" 2>&1) &
  local server=$!
  for _ in $(seq 300); do
    (cd "$src" && PYTHONPATH="$src" "$py" -m "$cli" health --server 127.0.0.1:50071 >/dev/null 2>&1) && break
    sleep 1
  done
  local known=()
  for p in "${POLICIES[@]}"; do
    # cascades (exit heads) came after the first layout
    [[ $cli == admin.cli && $p == cascade* ]] || known+=(--policy "$p")
  done
  (cd "$src" && PYTHONPATH="$src" "$py" -m "$cli" loadtest --server 127.0.0.1:50071 --task sst2 \
    "$root/corpora/sst2/dev.tsv" "${known[@]}" --clients 16 --seconds 30 --sequential 50 \
    --json-out "$out/$name.json" >"$out/$name-loadtest.log" 2>&1)
  kill -TERM "$server"; wait "$server" || true
  cat "$out/$name-loadtest.log" >&2
}

for rev in "$@"; do
  src="$work/src-$rev"
  git worktree add --detach "$src" "$rev" >/dev/null 2>&1
  run_one "$rev" "$src"
done
run_one now "$root"

# One table and one plot over every code path measured.
"$py" - "$out" now "$@" <<'PY'
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

out, names = Path(sys.argv[1]), sys.argv[3:] + [sys.argv[2]]
runs = {name: json.loads((out / f"{name}.json").read_text()) for name in names}
lines = ["| code | policy | sequential p50 | vs full | 16 clients: requests/s | vs full | p99 |", "|---|---|---|---|---|---|---|"]
for name, run in runs.items():
    full = run["full"]
    for policy, r in run.items():
        lines.append(f"| {name} | `{policy}` | {r['sequential_p50_ms']:.1f} ms | "
                     f"{r['sequential_p50_ms'] / full['sequential_p50_ms']:.2f}x | {r['throughput_rps']:.2f} | "
                     f"{r['throughput_rps'] / full['throughput_rps']:.2f}x | {r['p99_ms']:.0f} ms |")
(out / "serving.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
policies = list(dict.fromkeys(p for run in runs.values() for p in run))
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
width = 0.8 / len(runs)
for j, (name, run) in enumerate(runs.items()):
    xs = [i + j * width for i, p in enumerate(policies) if p in run]
    left.bar(xs, [run[p]["sequential_p50_ms"] for p in policies if p in run], width, label=name)
    right.bar(xs, [run[p]["throughput_rps"] for p in policies if p in run], width, label=name)
for ax, title in ((left, "one request at a time: p50 (ms)"), (right, "16 clients: requests/s")):
    ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(policies))], policies)
    ax.set_title(title)
    ax.legend()
fig.tight_layout()
fig.savefig(out / "serving.png", dpi=110)
PY
