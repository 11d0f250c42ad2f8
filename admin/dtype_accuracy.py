"""float32 records beside bfloat16 records of the same rows: the best exit head's and `auto`'s dev
accuracy on each, with 95 % paired bootstrap intervals of the difference (issue 27, item 3).
Numbers, not speed: on a CPU without bfloat16 units torch emulates it (slowly, the same arithmetic).
Usage (from the checkout):
    .venv/bin/python admin/dtype_accuracy.py OUT.json TASK:TRAIN:DEV_SKIP:DEV_ROWS ...
e.g. sst2:600:500:400 trec:600:0:400 (train rows from the start of train.tsv; dev rows after DEV_SKIP).
"""

from __future__ import annotations

import itertools
import json
import sys
import tempfile
from pathlib import Path

from raee_server.bench.harness import build
from raee_server.cli.assets import task_spec
from raee_server.core import auto, evaluation
from raee_server.core.datafile import read_rows
from raee_server.core.engine import Engine
from raee_server.settings import Settings
from raee_server.types import Row

DATA = Path("../shared/data")
out, found = Path(sys.argv[1]), []
for item in sys.argv[2:]:
    name, train, skip, dev = item.split(":")
    spec = task_spec(name)
    assert spec is not None, name
    rows = [r for r in itertools.islice(read_rows(DATA / name / "dev.tsv"), int(skip), int(skip) + int(dev))
            if isinstance(r, Row)]
    results = {}
    for dtype in ("float32", "bfloat16"):
        root = Path(tempfile.mkdtemp(prefix=f"dtype-{name}-{dtype}-"))
        engine = Engine.open(Settings(data_dir=root, dtype=dtype, model_cache=Settings().models_dir))
        engine.create_task(spec)
        build(engine, name, DATA / name / "train.tsv", int(train))
        auto.fit_task_heads(engine, name)
        auto.tune(engine, name)
        report = evaluation.evaluate(engine, name, rows, ["auto", "heads"])
        results[dtype] = report.results  # auto, heads, then the baselines full and knn-vote, in this order
        engine.close()
        print(f"{name} {dtype}: " + ", ".join(f"{r.name} {100 * r.accuracy:.1f}" for r in report.results), flush=True)
    for at, policy in enumerate(("auto", "heads", "full")):  # each dtype's auto may choose apart
        fp32, bf16 = results["float32"][at], results["bfloat16"][at]
        gap, low, high = bf16.accuracy_gap(fp32)
        found.append({"task": name, "policy": policy, "float32": fp32.name, "bfloat16": bf16.name,
                      "rows": fp32.rows, "float32_accuracy": fp32.accuracy, "bfloat16_accuracy": bf16.accuracy,
                      "gap": gap, "low": low, "high": high,
                      "answers_that_differ": sum(a != b for a, b in zip(fp32.predicted, bf16.predicted))})
        print(json.dumps(found[-1]), flush=True)
out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": found}, indent=2))
