"""RAEE_DEVICE=cuda with bfloat16, the supported GPU configuration: run where a GPU is present,
skipped elsewhere (these machines have none; docs/performance.md says which figures exist)."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from raee_server.core.datafile import read_rows
from raee_server.core.engine import Engine
from raee_server.models.encoders import SentenceTransformerEncoder, load_encoder
from raee_server.settings import Settings
from raee_server.types import TaskSpec

from .conftest import CORPORA, SENTIMENT, write_tsv
from .test_engine import ROWS
from .tiny_models import save_tiny_backbone

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

SST2 = Path(__file__).resolve().parents[1] / "raee_server" / "cli" / "tasks" / "sst2.toml"


def test_a_bfloat16_engine_on_cuda_ingests_and_answers_as_its_own_backbone(tmp_path: Path) -> None:
    model = save_tiny_backbone(tmp_path / "tiny")
    settings = Settings(data_dir=tmp_path / "data", backbone=str(model), encoder="hashing:32", device="cuda",
                        dtype="bfloat16")
    engine = Engine.open(settings)
    try:
        assert engine.backbone.device.type == "cuda" and engine.backbone.model_id.endswith("@bfloat16")
        engine.create_task(SENTIMENT)
        report = engine.ingest(SENTIMENT.name, read_rows(write_tsv(tmp_path / "d.tsv", ROWS)))
        assert report.added == len(ROWS) and not report.rejected
        texts = [t for t, _ in ROWS]
        full = engine.all_exits(SENTIMENT.name, texts)[0]
        for policy in ("paper", "full", "knn-agree", "static:2"):
            for p, logits in zip(engine.classify(SENTIMENT.name, texts, policy=policy), full):
                assert p.label == SENTIMENT.labels[int(logits[p.exit_layer].argmax())].name or policy == "knn-agree"
                assert abs(sum(p.scores) - 1) < 1e-3
    finally:
        engine.close()


def test_the_key_runs_on_torch_on_cuda(tmp_path: Path) -> None:
    encoder = load_encoder("minilm", device="cuda", runtime="onnx", cache=tmp_path)
    assert isinstance(encoder, SentenceTransformerEncoder)  # ONNX Runtime is the CPU's runtime here
    on_cpu = load_encoder("minilm", device="cpu", runtime="torch")
    texts = ["a great movie", "the worst plot", ""]
    assert np.abs(encoder.encode(texts) - on_cpu.encode(texts)).max() < 1e-3


@pytest.mark.real_model
def test_gemma_in_bfloat16_on_cuda_agrees_with_float32_on_the_cpu(tmp_path: Path) -> None:
    texts = [r.text for r in itertools.islice(read_rows(CORPORA / "sst2" / "dev.tsv"), 64)]
    labels = []
    for device, dtype in (("cpu", "float32"), ("cuda", "bfloat16")):
        engine = Engine.open(Settings(data_dir=tmp_path / device, model_cache=Settings().models_dir,
                                      device=device, dtype=dtype))
        engine.create_task(TaskSpec.from_toml(SST2))
        labels.append(engine.all_exits("sst2", texts)[0].argmax(-1))
        engine.close()
    last = (labels[0][:, -1] == labels[1][:, -1]).mean()
    assert last >= 0.9, f"the full model's answer agrees on {last:.0%} of 64 dev rows"
