"""Grow sst2 to the full SST-2 train file through a running server's online Ingest while a client
classifies, then add 1,000 more rows and time the background refit that follows (issue 25).
Usage (from the checkout, against a server whose sst2 task exists):
    .venv/bin/python admin/grow_full_online.py HOST:PORT OUT.json TRAIN.tsv EXTRA.tsv
TRAIN.tsv is ingested in slices of 5,000 rows; then the last 1,000 rows of EXTRA.tsv (rows not in
TRAIN.tsv). The report is rewritten after every step, so a run cut short still leaves its figures."""
import json
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from raee_server.client import RaeeClient
from raee_server.core.datafile import read_rows
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.types import Row

address, out = sys.argv[1], Path(sys.argv[2])
train = [r for r in read_rows(Path(sys.argv[3])) if isinstance(r, Row)]
seen = {r.text for r in train}
extra = [r for r in read_rows(Path(sys.argv[4])) if isinstance(r, Row) and r.text not in seen][-1000:]
client = RaeeClient(address, timeout=3600)
probe = [r.text for r in extra[:50]]
samples: list[tuple[float, float]] = []
errors: list[tuple[float, str]] = []
stop = threading.Event()
report: dict[str, Any] = {"address": address, "train_rows": len(train), "extra_rows": len(extra), "slices": [],
                          "heads_seen": []}


def classify_loop() -> None:
    """About two requests a second with the task's default policy, for the whole run."""
    i = 0
    while not stop.is_set():
        t0 = time.time()
        try:
            client.classify("sst2", [probe[i % len(probe)]])
            samples.append((t0, time.time() - t0))
        except Exception as exc:  # noqa: BLE001 (every failure is counted, none stops the loop)
            errors.append((t0, repr(exc)))
        i += 1
        stop.wait(0.5)


def task() -> pb.Task:
    return client.stub.GetTask(pb.GetTaskRequest(name="sst2"), timeout=60).task


def note_heads() -> pb.Task:
    t = task()
    h = t.heads
    if h.version and (not report["heads_seen"] or report["heads_seen"][-1]["version"] != h.version):
        report["heads_seen"].append({"version": h.version, "records": h.records, "fit_seconds": h.fit_seconds,
                                     "fitted_at": h.fitted_at, "seen_at": time.time(), "task_records": t.records})
    return t


def latency(lo: float, hi: float) -> dict[str, float | int | None]:
    lat = np.array([s for t, s in samples if lo <= t <= hi])
    return {"requests": int(len(lat)),
            "p50_ms": float(np.percentile(lat, 50) * 1000) if len(lat) else None,
            "p99_ms": float(np.percentile(lat, 99) * 1000) if len(lat) else None,
            "max_ms": float(lat.max() * 1000) if len(lat) else None}


def save() -> None:
    report["errors"] = len(errors)
    report["first_errors"] = [e for _, e in errors[:5]]
    out.write_text(json.dumps(report, indent=2))


worker = threading.Thread(target=classify_loop, daemon=True)
worker.start()
t_start = time.time()
for at in range(0, len(train), 5000):
    t0 = time.time()
    got = client.ingest("sst2", train[at:at + 5000])
    t1 = time.time()
    records = note_heads().records
    report["slices"].append({"rows": min(5000, len(train) - at), "added": got.added, "present": got.present,
                             "rejected": len(got.rejected), "seconds": t1 - t0,
                             "rows_per_s": min(5000, len(train) - at) / (t1 - t0), "records": records,
                             "classify_during": latency(t0, t1)})
    print(f"{records} records, {report['slices'][-1]['rows_per_s']:.1f} rows/s", flush=True)
    save()
t_ingested = time.time()
report["ingest_seconds"] = t_ingested - t_start
# The background refit after the growth: wait for a heads version that covers every record.
total = task().records
while note_heads().heads.records < total:
    time.sleep(5)
t_fitted = time.time()
report["after_full_ingest"] = {"records": total, "heads_version_visible_after_s": t_fitted - t_ingested,
                               "fit_seconds": task().heads.fit_seconds,
                               "classify_while_waiting": latency(t_ingested, t_fitted)}
save()
time.sleep(60)  # let the re-tune of `auto` settle before the next step
before = task().heads.version
t0 = time.time()
got = client.ingest("sst2", extra)
t1 = time.time()
while note_heads().heads.version == before:
    time.sleep(2)
t2 = time.time()
h = task().heads
fit_end = datetime.fromisoformat(h.fitted_at).timestamp()
report["plus_1000"] = {"added": got.added, "ingest_seconds": t1 - t0, "heads_version": h.version,
                       "heads_records": h.records, "fit_seconds": h.fit_seconds,
                       "wall_from_last_row_to_served_s": t2 - t1,
                       "fit_started_after_last_row_s": fit_end - h.fit_seconds - t1,
                       "classify_during_fit": latency(fit_end - h.fit_seconds, fit_end)}
time.sleep(20)
stop.set()
worker.join()
report["classify_overall"] = latency(t_start, time.time())
save()
print(json.dumps(report, indent=2))
