"""The design study behind the feature codec (docs/results.md, "Compact exit features"): heads fit on
float16 features against other stored forms, on the first 2,000 train rows and the first 500 dev rows
of each task (design rows), dev accuracy at the best exit and averaged over exits.

Reads the features `raee-admin bench-features` caches (run it first with --train-rows 2000
--dev-rows 500), e.g.:

    .venv/bin/python admin/codec_study.py /tmp/fb/feature-cache sst2 float16,spca-152-int8,pca-128-int8

Forms: float16; {pca,spca}-D[-int8|-int4|-lm2|-lm3|-lm4] (principal basis of the raw or standardised
features, D coordinates, quantised per vector or with fixed Lloyd-Max levels); rp-D-int8 (a random
orthogonal projection). A "2k" after pca/spca learns the basis from 2,000 records instead of 1,000.
"""
import json
import sys
import time

import numpy as np

from raee_server.core.fitting import fit_heads
from raee_server.core.groups import near_duplicate_groups
from raee_server.stores.codec import FeatureCodec, learn_codec

CACHE = sys.argv[1]


def load(task, split):
    z = np.load(f"{CACHE}/{task}-{split}.npz")
    return z["features"], z["labels"], [str(t) for t in z["texts"]]

def rp_codec(train, d, seed=0):
    e, h = train.shape[1:]
    rng = np.random.default_rng(seed)
    mean = train.astype(np.float32).mean(0)
    basis = np.zeros((e, h, d), np.float32)
    for j in range(e):
        q, _ = np.linalg.qr(rng.standard_normal((h, d)))
        sd = ((train[:, j].astype(np.float32) - mean[j]) @ q).std(0) + 1e-6
        basis[j] = q / sd
    return FeatureCodec(mean, basis)

LM = {2: ([-0.9816, 0, 0.9816], [-1.510, -0.4528, 0.4528, 1.510]),
      3: ([-1.748, -1.050, -0.5006, 0, 0.5006, 1.050, 1.748],
          [-2.152, -1.344, -0.7560, -0.2451, 0.2451, 0.7560, 1.344, 2.152])}

def lloyd_max(codec, x, bits):
    z = codec.project(x)
    if bits in LM:
        t, r = LM[bits]
        return np.asarray(r, np.float32)[np.searchsorted(np.asarray(t), z)]
    step = 8.0 / 2**bits  # uniform over +-4 sd
    return np.clip(np.floor(z / step) + 0.5, -2**(bits-1) + 0.5, 2**(bits-1) - 0.5) * step

def quantised(codec, x, levels=127):
    z = codec.project(x)
    scale = np.maximum(np.abs(z).max(-1) / levels, 2.0**-14).astype(np.float16).astype(np.float32)
    return np.clip(np.rint(z / scale[..., None]), -levels, levels) * scale[..., None]

def evaluate(task, variants):
    xtr, ytr, ttr = load(task, "train-2000")
    xdv, ydv, _ = load(task, "dev-0-500")
    n_labels = int(max(ytr.max(), ydv.max()) + 1)
    groups = near_duplicate_groups(ttr)
    ids = [str(i) for i in range(len(ytr))]
    out = {}
    for name in variants:
        t = time.time()
        if name == "float16":
            tr, dv = xtr, xdv.astype(np.float32)
        else:
            kind, d, *q = name.split("-")
            learn = 2000 if kind.endswith("2k") else 1000
            kind = kind.removesuffix("2k")
            codec = (learn_codec(xtr[:learn], dim=int(d), standardise=kind == "spca") if kind.endswith("pca")
                     else rp_codec(xtr[:learn], int(d)))
            if q and q[0].startswith("lm"):
                tr = lloyd_max(codec, xtr, int(q[0][2:]))
            else:
                tr = quantised(codec, xtr, {"int8": 127, "int4": 7, "int5": 15}[q[0]]) if q else codec.project(xtr)
            dv = codec.project(xdv)
        heads = fit_heads(tr, ytr, n_labels, ids, [str(i) for i in range(n_labels)], groups=groups)
        probs = heads.all_probs(dv)
        acc = (probs.argmax(-1) == ydv[:, None]).mean(0)
        best = heads.best_exit
        size = xtr.shape[1] * xtr.shape[2] * 2 if name == "float16" else codec.row_bytes
        out[name] = dict(best_exit=best, dev_at_best=float(acc[best]), dev=[float(a) for a in acc],
                         seconds=time.time() - t, row_bytes=size)
        print(task, name, "best", best, f"{acc[best]:.4f}", "mean over exits", f"{acc.mean():.4f}",
              f"{time.time() - t:.0f}s", file=sys.stderr, flush=True)
    return out

tasks, variants = sys.argv[2].split(","), sys.argv[3].split(",")
print(json.dumps({t: evaluate(t, variants) for t in tasks}, indent=1))
