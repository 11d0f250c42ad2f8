"""The server's background heads refit, end to end through SQL, on synthetic coded records: a full fit
of N records, then the warm refit after 1,000 more, each in the child process the server uses
(`fit_heads_in_child`, at nice 19), reading the codes from SQLite. No backbone: records carry synthetic
codes (as `raee-admin bench-fit` makes them) under a synthetic codec.

    .venv/bin/python admin/refit_through_sql.py /tmp/refit 60614
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import numpy as np

from raee_server.bench.fit import synthetic
from raee_server.serving.fitter import fit_heads_in_child
from raee_server.stores.codec import CODED, FeatureCodec
from raee_server.stores.metadata import MetadataStore
from raee_server.stores.records import ExitRecord, StoredFeatures, record_id
from raee_server.types import Label, TaskSpec

EXITS, DIM, HIDDEN, ADDED = 19, 152, 640, 1000


def write(store: MetadataStore, codes: np.ndarray, scales: np.ndarray, gold: np.ndarray, start: int, stop: int) -> None:
    for i in range(start, stop, 2000):
        records = []
        for j in range(i, min(i + 2000, stop)):
            text = f"synthetic record {j}"
            data = codes[j].tobytes() + scales[j].tobytes()
            records.append(ExitRecord(record_id("t", text), "t", text, "ab"[gold[j]], int(gold[j]), (),
                                      StoredFeatures(CODED, EXITS, HIDDEN, data)))
        store.write_pending("t", records, None)
        store.mark_committed([r.id for r in records])


def main() -> None:
    root, n = Path(sys.argv[1]), int(sys.argv[2])
    root.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{root / 'metadata.sqlite'}"
    store = MetadataStore(url)
    store.create_task(TaskSpec("t", "{text} :", (Label("a", " a"), Label("b", " b"))), "synthetic", "synthetic")
    rng = np.random.default_rng(0)
    store.adopt_codec("t", FeatureCodec(np.zeros((EXITS, HIDDEN), np.float32),
                                        rng.normal(size=(EXITS, HIDDEN, DIM)).astype(np.float32)))
    features, gold = synthetic(n + ADDED, EXITS, DIM, 2, seed=1)
    assert features.scales is not None
    write(store, features.values, features.scales, gold, 0, n)
    t0 = time.perf_counter()
    full = asyncio.run(fit_heads_in_child(url, "t", niceness=19))
    first = time.perf_counter() - t0
    write(store, features.values, features.scales, gold, n, n + ADDED)
    t0 = time.perf_counter()
    warm = asyncio.run(fit_heads_in_child(url, "t", niceness=19))
    second = time.perf_counter() - t0
    print(f"{n:,} records: full fit {first:.1f} s wall (version {full['version']}, "
          f"full-fit records {full['full_fit_records']:,}); +{ADDED:,} records: warm refit {second:.1f} s wall "
          f"(version {warm['version']}, full-fit records {warm['full_fit_records']:,}); both at nice 19 "
          "through SQLite")


if __name__ == "__main__":
    main()
