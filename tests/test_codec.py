"""Compact exit features: the codec, heads fit on its coordinates served on raw features, and the
store that learns it, encodes rows in place and reads raw and coded rows alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from raee_server.core import auto
from raee_server.core.datafile import read_rows
from raee_server.core.engine import Engine
from raee_server.core.fitting import fit_heads
from raee_server.stores import feature_rows as feature_rows_module
from raee_server.stores.codec import CODED, RAW, learn_codec

from .conftest import SENTIMENT, write_tsv
from .test_concurrent_writers import corpus
from .test_heads import separable


def correlated(n: int, exits: int = 3, dim: int = 48, rank: int = 6, seed: int = 0) -> np.ndarray:
    """Features that vary in a few directions (as hidden states do), plus a little noise."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(exits, rank, dim))
    z = rng.normal(size=(n, exits, rank)) * np.linspace(5, 1, rank)
    return (np.einsum("ner,erh->neh", z, mix) + 0.01 * rng.normal(size=(n, exits, dim)) + 3.0).astype(np.float16)


def test_codes_keep_the_coordinates_to_int8_precision_in_a_tenth_of_the_bytes() -> None:
    x = correlated(400)
    codec = learn_codec(x[:300], dim=8)
    assert codec.basis.shape == (3, 48, 8) and codec.row_bytes == 3 * (8 + 2)
    rows = codec.encode(x[300:])
    assert {len(r) for r in rows} == {codec.row_bytes} and codec.row_bytes < x[0].nbytes / 9
    exact, decoded = codec.project(x[300:]), codec.decode(rows)
    # Whitened coordinates: unit variance on the rows it was learned from; codes within half a step.
    assert np.allclose(codec.project(x[:300])[:, :, :6].std(0), 1.0, atol=0.05)
    step = np.abs(exact).max(-1, keepdims=True) / 127
    assert np.all(np.abs(decoded - exact) <= step * 0.5 + 1e-3)
    again = type(codec).from_bytes(codec.to_bytes())
    np.testing.assert_array_equal(again.basis, codec.basis)
    with pytest.raises(ValueError, match="bytes"):
        codec.decode([rows[0][:-1]])


def test_a_codec_from_fewer_records_than_dimensions_keeps_only_what_they_span() -> None:
    codec = learn_codec(correlated(5, rank=6), dim=8)
    assert codec.dim == 4  # n - 1 directions at most
    assert np.isfinite(codec.project(correlated(10, seed=1))).all()


def test_heads_fit_on_coordinates_serve_raw_features_with_the_same_probabilities() -> None:
    x, y = separable(n=240, exits=3, dim=24)
    codec = learn_codec(x, dim=12)
    z = codec.project(x)
    heads = fit_heads(z, y, 3, [str(i) for i in range(len(y))], ["a", "b", "c"])
    raw = heads.in_raw_space(codec)
    assert raw.weight.shape == (3, 24, 3) and raw.mean.shape == (3, 24)
    np.testing.assert_allclose(raw.all_probs(x), heads.all_probs(z), atol=1e-6)
    np.testing.assert_allclose(raw.probs(2, x[:4, 2]), heads.probs(2, z[:4, 2]), atol=1e-6)
    assert raw.best_exit == heads.best_exit and raw.record_ids == heads.record_ids


@pytest.fixture
def small_codec(monkeypatch: pytest.MonkeyPatch) -> int:
    """Learn codecs from 40 records, not 1,000 (the tiny test backbone is as happy with either)."""
    monkeypatch.setattr(feature_rows_module, "LEARN_ROWS", 40)
    return 40


def feature_rows(engine: Engine) -> list[tuple[int, int]]:
    with engine.metadata.engine.connect() as conn:
        return [(int(r[0]), len(r[1])) for r in conn.execute(text("select codec, data from exit_features"))]


def test_a_task_learns_its_codec_once_it_has_enough_records_and_encodes_every_row(
        engine: Engine, tmp_path: Path, small_codec: int) -> None:
    engine.create_task(SENTIMENT)
    engine.ingest(SENTIMENT.name, read_rows(write_tsv(tmp_path / "a.tsv", corpus(30))))
    assert engine.metadata.codec(SENTIMENT.name) is None
    assert {codec for codec, _ in feature_rows(engine)} == {RAW}
    before_ids, _, before, _ = engine.metadata.features(SENTIMENT.name)
    raw_before = before.values

    engine.ingest(SENTIMENT.name, read_rows(write_tsv(tmp_path / "b.tsv", corpus(60)[30:])))
    codec = engine.metadata.codec(SENTIMENT.name)
    assert codec is not None
    assert feature_rows(engine) == [(CODED, codec.row_bytes)] * 60  # the first 30 converted in place
    ids, _, coded, same = engine.metadata.features(SENTIMENT.name)
    assert same is not None and coded.shape == (60, engine.depth + 1, codec.dim) and coded.values.dtype == np.int8

    # A raw row beside the codec (written by an ingest that raced its creation) is read, projected.
    rid, at = before_ids[0], ids.index(before_ids[0])
    with engine.metadata.engine.begin() as conn:
        conn.execute(text("update exit_features set codec = 0, data = :d where record_id = :id"),
                     {"id": rid, "d": raw_before[0].tobytes()})
    _, _, mixed, _ = engine.metadata.features(SENTIMENT.name)
    every = np.arange(60)
    np.testing.assert_array_equal(mixed.values[every != at], coded.values[every != at])
    row = mixed.rows(np.array([at]))[0]
    exact = codec.project(raw_before[:1])[0]
    assert np.all(np.abs(row - exact) <= np.abs(exact).max(-1, keepdims=True) / 127 * 0.51 + 1e-4)
    assert engine.metadata.compact_features(SENTIMENT.name) == 1
    assert {c for c, _ in feature_rows(engine)} == {CODED}


def test_heads_of_a_coded_task_serve_live_features_as_fit(engine: Engine, tmp_path: Path, small_codec: int) -> None:
    engine.create_task(SENTIMENT)
    engine.ingest(SENTIMENT.name, read_rows(write_tsv(tmp_path / "a.tsv", corpus(60))))
    assert engine.metadata.codec(SENTIMENT.name) is not None
    heads = auto.fit_task_heads(engine, SENTIMENT.name)
    texts = ["a great movie", "the worst plot"]
    answers = engine.classify(SENTIMENT.name, texts, policy="heads:2")
    live = engine.backbone.exit_features([engine._prompt(SENTIMENT, t) for t in texts], 2).float().numpy()
    for answer, p in zip(answers, heads.probs(2, live)):
        np.testing.assert_allclose(answer.scores, p, atol=1e-5)


def test_the_migration_encodes_the_raw_features_of_tasks_made_before_codecs(
        engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from raee_server.stores import codec as codec_module
    from raee_server.stores import migrate

    engine.create_task(SENTIMENT)
    engine.ingest(SENTIMENT.name, read_rows(write_tsv(tmp_path / "a.tsv", corpus(60))))
    ids, _, raw, _ = engine.metadata.features(SENTIMENT.name)  # 60 < 1,000: raw
    migrate.downgrade(engine.metadata.engine, "0004")  # the schema before codecs: the raw rows stay
    with engine.metadata.engine.connect() as conn:
        assert conn.execute(text("select count(*) from exit_features")).scalar() == 60
    monkeypatch.setattr(codec_module, "LEARN_ROWS", 40)
    migrate.upgrade(engine.metadata.engine)
    assert feature_rows(engine) == [(CODED, feature_rows(engine)[0][1])] * 60
    again, _, coded, codec = engine.metadata.features(SENTIMENT.name)
    assert again == ids and codec is not None
    exact = codec.project(raw.values)
    assert np.all(np.abs(coded.rows(np.arange(60)) - exact) <= np.abs(exact).max(-1, keepdims=True) / 127 * 0.51 + 1e-4)
    migrate.downgrade(engine.metadata.engine, "0004")  # codes cannot become raw features again: they go
    with engine.metadata.engine.connect() as conn:
        assert conn.execute(text("select count(*) from exit_features")).scalar() == 0
    migrate.upgrade(engine.metadata.engine)
