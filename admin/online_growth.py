"""Grow sst2 online through a running server while a client classifies with `auto`; the server refits
the exit heads in the background. Usage (from the checkout):
    .venv/bin/python admin/online_growth.py HOST:PORT OUT.json [TRAIN.tsv]
TRAIN.tsv (default corpora/sst2/train.tsv) must hold 1,000 rows past the task's current record count
(the shared data's full SST-2 train file does). Reports errors, p50/p99 before the growth, and latency
during the ingest, while the background fit ran (from GetTask's heads), and after it."""
import json
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from raee_server.client import RaeeClient
from raee_server.core.datafile import read_rows
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.types import Row

address, out = sys.argv[1], Path(sys.argv[2])
client = RaeeClient(address, timeout=120)
dev = [r.text for r in read_rows(Path("corpora/sst2/dev.tsv")) if isinstance(r, Row)]
train_file = Path(sys.argv[3]) if len(sys.argv) > 3 else Path("corpora/sst2/train.tsv")
train = [r for r in read_rows(train_file) if isinstance(r, Row)]
samples, errors, stop = [], [], threading.Event()

def classify_loop():
    i = 0
    while not stop.is_set():
        t0 = time.time()
        try:
            client.classify("sst2", [dev[i % len(dev)]], policy="auto")
            samples.append((t0, time.time() - t0))
        except Exception as exc:  # noqa: BLE001
            errors.append((t0, repr(exc)))
        i += 1

def heads():
    return client.stub.GetTask(pb.GetTaskRequest(name="sst2")).task.heads

before = heads()
worker = threading.Thread(target=classify_loop)
worker.start()
time.sleep(30)
t_ingest = time.time()
start = before_records = client.stub.GetTask(pb.GetTaskRequest(name="sst2")).task.records
if len(train) < start + 1000:
    sys.exit(f"{train_file} has {len(train)} rows; growing from {start} records needs {start + 1000}")
report = client.ingest("sst2", train[start:start + 1000])
t_ingested = time.time()
while heads().version == before.version:
    time.sleep(1)
after = heads()
time.sleep(30)
stop.set()
worker.join()
fit_end = datetime.fromisoformat(after.fitted_at).timestamp()
fit_start = fit_end - after.fit_seconds
lat = np.array([l for _, l in samples])
base = np.array([l for t, l in samples if t < t_ingest])
during = np.array([l for t, l in samples if fit_start <= t <= fit_end])
ingesting = np.array([l for t, l in samples if t_ingest <= t <= t_ingested])
after_fit = np.array([l for t, l in samples if t > fit_end])  # includes the re-tune of `auto`
result = {"records_before": int(before_records), "added": report.added, "ingest_seconds": t_ingested - t_ingest,
          "errors": len(errors),
          "heads_before": {"version": before.version, "records": before.records},
          "heads_after": {"version": after.version, "records": after.records, "fit_seconds": after.fit_seconds},
          "requests": len(samples), "p50_before_ms": float(np.percentile(base, 50) * 1000),
          "p99_before_ms": float(np.percentile(base, 99) * 1000),
          "requests_during_fit": int(len(during)),
          "max_during_fit_ms": float(during.max() * 1000) if len(during) else None,
          "p99_during_fit_ms": float(np.percentile(during, 99) * 1000) if len(during) else None,
          "p99_during_ingest_ms": float(np.percentile(ingesting, 99) * 1000) if len(ingesting) else None,
          "max_during_ingest_ms": float(ingesting.max() * 1000) if len(ingesting) else None,
          "p99_after_fit_ms": float(np.percentile(after_fit, 99) * 1000) if len(after_fit) else None,
          "max_after_fit_ms": float(after_fit.max() * 1000) if len(after_fit) else None,
          "fit_started_after_ingest_s": fit_start - t_ingested,
          "max_overall_ms": float(lat.max() * 1000)}
out.write_text(json.dumps(result, indent=2))
print(json.dumps(result, indent=2))
