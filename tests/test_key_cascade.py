"""The key-first cascade (issue 32): the key head, its certified threshold, the records' coverage gate,
and a served path on which an answer from the key never waits for the backbone."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from raee_server.core import auto
from raee_server.core.cascade import cascade_exits
from raee_server.core.fitting import fit_with_key
from raee_server.core.heads import Coverage, ExitHeads
from raee_server.core.policies import Decision, KeyCascadePolicy, bind, parse_policy, settle
from raee_server.errors import InvalidInput
from raee_server.protos.raee.v1 import raee_pb2 as pb
from raee_server.stores.codec import learn_codec

from .grpc_harness import ServerThread
from .test_grpc import ingest, make_settings, tiny_engine_factory


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_coverage_learns_how_near_and_how_long_the_records_are() -> None:
    rng = np.random.default_rng(0)
    centres = unit(rng.normal(size=(3, 32)))
    keys = unit(centres[rng.integers(0, 3, 600)] + 0.1 * rng.normal(size=(600, 32)))
    lengths = rng.integers(3, 12, 600)
    coverage = Coverage.learn(keys, np.arange(600), lengths)
    inside = unit(centres[1] + 0.1 * rng.normal(size=32))
    far = unit(rng.normal(size=32))  # no cluster: as near as a random direction
    assert coverage.covers(5, float((keys @ inside).max()))
    assert not coverage.covers(5, float((keys @ far).max()))
    assert not coverage.covers(int(lengths.max()) + 1, float((keys @ inside).max()))  # longer than every record
    assert not coverage.covers(5, None)  # nothing retrieved: nothing vouches for it
    # about COVERAGE_QUANTILE of the records' own nearest similarities fall under the floor
    assert 0.0 < coverage.similarity < 1.0 and lengths.min() <= coverage.words <= lengths.max()


def test_own_group_is_not_the_nearest_record() -> None:
    """A record's near-duplicates (its group) do not count as its nearest record: traffic has no near-copy."""
    rng = np.random.default_rng(1)
    base = unit(rng.normal(size=(200, 16)))
    keys = np.concatenate([base, base + 1e-4])  # every record twice
    groups = np.concatenate([np.arange(200), np.arange(200)])
    assert Coverage.learn(keys, groups, np.full(400, 5)).similarity < 0.9
    assert Coverage.learn(keys, np.arange(400), np.full(400, 5)).similarity > 0.99


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features [n, 4, 8] that only the last exit can read; keys [n, 16] that give the label away on the
    70 % of rows that are easy and say nothing on the rest."""
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 2, n)
    features = rng.normal(size=(n, 4, 8)).astype(np.float32)
    features[:, 3, 0] += 3.0 * (2 * gold - 1)
    keys = rng.normal(size=(n, 16)).astype(np.float32)
    easy = rng.random(n) < 0.7
    keys[easy, 0] += 6.0 * (2 * gold[easy] - 1)
    return features, keys, gold


def test_the_key_stage_is_certified_with_the_exits_and_keeps_its_promise_on_new_rows() -> None:
    # 2,500 records: 750 calibration rows, 375 a label; the bound needs about ln(labels / delta) / m rows a
    # label to certify m even where the key never disagrees with the best head (cascade.betting_upper)
    features, keys, gold = synthetic(2500, 0)
    ids = [f"r{i}" for i in range(len(gold))]
    heads = fit_with_key(features, keys, gold, 2, ids, ["a", "b"], np.arange(len(gold)), np.full(len(gold), 5))
    assert heads.key is not None and heads.coverage is not None
    assert np.array_equal(heads.key.calibration, heads.calibration)  # one split: nothing certifies on its own fit
    assert heads.best_exit == 3
    margin = 0.02
    thresholds = heads.cascade_thresholds(margin, key_first=True)
    assert thresholds.shape == (1 + heads.exits,) and np.isfinite(thresholds[0])  # the key may stop rows
    assert np.isinf(heads.cascade_thresholds(margin)[:3]).all()  # the noise exits never do
    # new rows from the same distribution: the key answers most of them, and loses at most the margin
    new_features, new_keys, new_gold = synthetic(4000, 1)
    stages = np.concatenate([heads.key_probs(new_keys)[:, None, :], heads.all_probs(new_features)], axis=1)
    stopped = cascade_exits(stages, thresholds, 1 + heads.best_exit)
    answered = stages[np.arange(len(new_gold)), stopped].argmax(-1)
    best = stages[:, 1 + heads.best_exit].argmax(-1)
    assert np.mean(stopped == 0) > 0.5
    assert np.mean(best == new_gold) - np.mean(answered == new_gold) <= margin


def test_the_key_head_and_coverage_are_stored_with_the_heads() -> None:
    features, keys, gold = synthetic(300, 2)
    heads = fit_with_key(features, keys, gold, 2, [f"r{i}" for i in range(300)], ["a", "b"], np.arange(300),
                         np.full(300, 5))
    back = ExitHeads.from_bytes(heads.to_bytes(), 3, "2026-12-05T00:00:00+00:00", 1.0)
    assert back.key is not None and back.coverage == heads.coverage
    np.testing.assert_allclose(back.key_probs(keys[:5]), heads.key_probs(keys[:5]), atol=1e-5)
    assert np.array_equal(back.key.oof, heads.key.oof)
    assert heads.in_raw_space(learn_codec(features, dim=8)).key is heads.key  # serving's heads keep it
    summary = heads.summary()
    assert summary["key_head"]["accuracy"] > 0.6 and summary["coverage"]["words"] == 5


def test_settle_stops_at_the_key_only_inside_the_coverage() -> None:
    sure = np.array([0.97, 0.03])
    decision = Decision(7, stop=lambda *_: True, reader="heads", key_threshold=0.9, gated=True)
    keyed = settle(decision, sure, covered=True)
    assert keyed.answered_by == "key" and keyed.max_layer == 0 and keyed.answer is sure
    outside = settle(decision, sure, covered=False)  # the records do not vouch: the bound's head, no early stop
    assert outside.answer is None and outside.stop is None and outside.max_layer == 7
    unsure = settle(decision, np.array([0.6, 0.4]), covered=True)
    assert unsure is decision
    ungated = settle(Decision(7, key_threshold=0.9), sure, covered=False)
    assert ungated.answered_by == "key"


def test_key_cascade_names_and_binding() -> None:
    assert parse_policy("key-cascade").name == "key-cascade:0.01"
    assert parse_policy("key-cascade:0.02:9").name == "key-cascade:0.02:9"
    assert parse_policy("key-cascade-ungated:0.03").name == "key-cascade-ungated:0.03"
    with pytest.raises(InvalidInput, match="key-cascade"):
        parse_policy("key-cascade:abc")
    features, _, gold = synthetic(200, 3)
    from raee_server.core.fitting import fit_heads

    plain = fit_heads(features, gold, 2, [f"r{i}" for i in range(200)], ["a", "b"])
    with pytest.raises(InvalidInput, match="key head"):  # heads fit before key heads existed
        bind(parse_policy("key-cascade:0.02"), plain)


def test_auto_considers_key_first_cascades_only_with_a_key_head() -> None:
    features, keys, gold = synthetic(200, 4)
    ids = [f"r{i}" for i in range(200)]
    heads = fit_with_key(features, keys, gold, 2, ids, ["a", "b"], np.arange(200), np.full(200, 5))
    assert "key-cascade:0.02" in auto.candidate_policies(3, heads)
    heads.key = None
    assert not any(name.startswith("key-cascade") for name in auto.candidate_policies(3, heads))


# -- served --------------------------------------------------------------------------------------


def good_or_bad(n: int) -> list[tuple[str, str]]:
    """Rows whose label one word gives away, to the key (the hashing encoder keeps "great" and "awful"
    apart) as to the heads."""
    return [(f"{'great' if i % 2 else 'awful'} film number {i}", "positive" if i % 2 else "negative") for i in range(n)]


@pytest.fixture
def served_with_heads(tmp_path: Path):  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, metrics_port=0)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    server.wait_ready()
    ingest(server.stub, "sentiment", good_or_bad(160), chunk=40)
    server.run(server.server.worker.call(lambda e: auto.fit_task_heads(e, "sentiment")))
    yield server
    server.stop()


def test_a_key_answer_does_not_wait_for_a_busy_backbone(served_with_heads: ServerThread) -> None:
    server, worker = served_with_heads, served_with_heads.server.worker
    engine = worker.engine
    heads = engine.heads("sentiment")
    # a cascade whose key stage stops every row (threshold 0), ungated: the test isolates the scheduling
    always = KeyCascadePolicy(0.02, gated=False, thresholds=(0.0, *[np.inf] * heads.exits), last=heads.best_exit)
    busy, release = threading.Event(), threading.Event()
    blocker = server.submit(worker.call(lambda e: (busy.set(), release.wait(60))))  # holds the model thread
    assert busy.wait(30)
    try:
        waiting = server.submit(worker.classify("sentiment", ["great film number 3"], "full", None))
        answers, _ = server.run(worker.classify("sentiment", ["great film number 3", "awful film 8"], always, None),
                                timeout=30)
        assert not release.is_set() and not waiting.done()  # answered while the backbone was held
        assert [a.answered_by for a in answers] == ["key", "key"] and [a.exit_layer for a in answers] == [0, 0]
        assert [a.label for a in answers] == ["positive", "negative"]
    finally:
        release.set()
    blocker.result(30)
    full, _ = waiting.result(30)
    assert full[0].answered_by == "backbone" and full[0].exit_layer == engine.depth


def test_the_response_and_task_stats_say_what_answered(served_with_heads: ServerThread) -> None:
    stub = served_with_heads.stub

    def ask(policy: str, text: str = "great film number 5") -> pb.ClassifyResponse:
        return stub.Classify(pb.ClassifyRequest(task="sentiment", text=text,
                                                options=pb.ClassifyOptions(policy=policy)), timeout=60)

    keyed = ask("key-cascade-ungated:1")  # a margin of 1 certifies the boldest key threshold proposed
    assert (keyed.answered_by, keyed.exit_layer, keyed.label) == ("key", 0, "positive")
    assert keyed.coverage == "inside"  # a record's own text: its nearest record is itself
    assert ask("full").answered_by == "backbone" and ask("full").coverage == ""  # no retrieval, no check
    assert ask("knn-vote").answered_by == "retrieval"
    long_text = " ".join(["great"] * 20)  # longer than every record (4 words)
    outside = ask("key-cascade:1", long_text)
    assert outside.coverage == "outside" and outside.answered_by == "backbone"
    assert outside.exit_layer == served_with_heads.server.worker.engine.heads("sentiment").best_exit
    stats = stub.GetTaskStats(pb.GetTaskStatsRequest(name="sentiment"))
    assert stats.key_answers == 1 and stats.coverage_checked == 3 and stats.outside_coverage == 1
    # the client package carries both fields
    from raee_server.client import RaeeClient

    client = RaeeClient(f"127.0.0.1:{served_with_heads.port}", timeout=60)
    try:
        keyed, far = client.classify("sentiment", ["great film number 5", long_text], "key-cascade-ungated:1")
        assert (keyed.answered_by, keyed.covered) == ("key", True) and far.covered is False
    finally:
        client.close()


def test_the_betting_bound_covers_the_mean_and_adapts_to_low_variance() -> None:
    from raee_server.core.cascade import betting_upper

    rng = np.random.default_rng(5)
    # d in {-1, 0, 1} as a cascade against its bound: 4 % lost, 3 % gained, the rest tied; true mean 0.505
    draws = [rng.choice([0.0, 0.5, 1.0], size=300, p=[0.03, 0.93, 0.04]) for _ in range(300)]
    bounds = np.array([betting_upper(x, 0.1) for x in draws])
    assert np.mean(bounds < 0.505) <= 0.1  # covers at least 1 - delta of the time (0 misses expected here)
    assert np.all(bounds <= 1.0) and np.median(2 * bounds - 1) < 0.06  # a bound on d of a few points, not ~1
    assert betting_upper(np.full(300, 0.5), 0.1) > 0.5  # never certain from finite rows
    assert betting_upper(np.array([]), 0.1) == 1.0
