"""Is the codec's loss information or geometry? (docs/results.md, "Where the codec loses").

Heads fit, as `fit-heads` fits them, on each exit's features projected onto the top D principal
directions of the first 1,000 records' standardised features and mapped back to feature space
(unquantised, each direction keeping its spread), so a head's L2 penalty weighs directions as on the
float16 features; dev accuracy on the raw features, as a folded head serves. Reads bench-features'
cache (first 2,000 train rows, first 500 dev rows: design rows), e.g.:

    .venv/bin/python admin/codec_geometry.py /tmp/fb/feature-cache sst2 6,9,10,11,12,14 float16,gain-152,gain-304,gain-448
"""
import sys
import time

import numpy as np

from raee_server.core.fitting import fit_heads
from raee_server.core.groups import near_duplicate_groups

cache, task, exits, forms = sys.argv[1], sys.argv[2], [int(e) for e in sys.argv[3].split(",")], sys.argv[4].split(",")


def load(split):
    z = np.load(f"{cache}/{task}-{split}.npz")
    return z["features"][:, exits].astype(np.float32), z["labels"], [str(t) for t in z["texts"]]


def projected(x, learn, d):
    """x's projection onto each exit's top-d principal directions of `learn`'s standardised features."""
    out = np.empty_like(x)
    for j in range(x.shape[1]):
        mean, unit = learn[:, j].mean(0), learn[:, j].std(0)
        unit[unit < 1e-6] = 1.0
        _, _, vt = np.linalg.svd((learn[:, j] - mean) / unit, full_matrices=False)
        out[:, j] = ((x[:, j] - mean) / unit) @ vt[:d].T @ vt[:d] * unit + mean
    return out


xtr, ytr, ttr = load("train-2000")
xdv, ydv, _ = load("dev-0-500")
n_labels = int(max(ytr.max(), ydv.max()) + 1)
for form in forms:
    t = time.time()
    train = xtr if form == "float16" else projected(xtr, xtr[:1000], int(form.split("-")[1]))
    heads = fit_heads(train, ytr, n_labels, [str(i) for i in range(len(ytr))], [str(i) for i in range(n_labels)],
                      groups=near_duplicate_groups(ttr))
    acc = (heads.all_probs(xdv).argmax(-1) == ydv[:, None]).mean(0)
    print(task, form, "exits", exits, "dev", " ".join(f"{a:.3f}" for a in acc), "best exit (out of fold)",
          exits[heads.best_exit], f"{acc[heads.best_exit]:.3f}", "mean", f"{acc.mean():.4f}",
          f"{time.time() - t:.0f}s", flush=True)
