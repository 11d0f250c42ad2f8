"""The backbone's full forward in float32 and in bfloat16 on this machine, side by side in one run:
seconds per batch of SST-2 dev texts, and how far the bfloat16 label probabilities are from float32's.
Usage (from the checkout): .venv/bin/python admin/bf16_forward.py [ROWS] [BATCH]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from raee_server.cli.assets import task_spec
from raee_server.core.datafile import read_rows
from raee_server.models.hardware import bfloat16_units
from raee_server.models.loading import load_backbone
from raee_server.settings import Settings
from raee_server.types import Row

rows, batch = (int(sys.argv[1]) if len(sys.argv) > 1 else 16), (int(sys.argv[2]) if len(sys.argv) > 2 else 8)
spec = task_spec("sst2")
assert spec is not None
texts = [spec.prompt(r.text) for r in read_rows(Path("corpora/sst2/dev.tsv")) if isinstance(r, Row)][:rows]
settings = Settings()
probs, seconds = {}, {}
for dtype in ("float32", "bfloat16"):
    bb = load_backbone(settings.backbone, settings.models_dir, dtype=dtype)
    head = bb.label_head(bb.label_token_ids([label.word for label in spec.labels]))
    bb.all_exit_logits(texts[:1], head)  # warm up
    start = time.perf_counter()
    out = [bb.all_exit_logits(texts[i:i + batch], head) for i in range(0, len(texts), batch)]
    seconds[dtype] = time.perf_counter() - start
    probs[dtype] = torch.cat(out).softmax(-1)
    print(f"{dtype}: {rows} rows in batches of {batch}: {seconds[dtype]:.1f} s ({rows / seconds[dtype]:.2f} rows/s)",
          flush=True)
diff = (probs["bfloat16"] - probs["float32"]).abs()
same = (probs["bfloat16"].argmax(-1) == probs["float32"].argmax(-1)).float().mean()
print(f"bfloat16 / float32 time: {seconds['bfloat16'] / seconds['float32']:.1f}x; native bfloat16 units: "
      f"{', '.join(bfloat16_units()) or 'none'}")
print(f"label probabilities, every exit: max |difference| {diff.max():.4f}, mean {diff.mean():.4f}; "
      f"same label at {100 * same:.1f} % of (row, exit) pairs; last exit: same label "
      f"{100 * (probs['bfloat16'][:, -1].argmax(-1) == probs['float32'][:, -1].argmax(-1)).float().mean():.1f} %")
