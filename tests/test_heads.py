"""Exit heads: features kept at ingest, heads fit off the request path, policies that read them."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

from raee_server.core import auto
from raee_server.core.cascade import cascade_exits, risk_bound
from raee_server.core.datafile import read_rows
from raee_server.core.engine import Engine
from raee_server.core.fitting import _fit, fit_heads
from raee_server.core.heads import C_GRID, ExitHeads
from raee_server.core.policies import CascadePolicy, HeadsPolicy, KnnHeadsPolicy, mix
from raee_server.errors import InvalidInput
from raee_server.serving.fitter import fit_heads_in_child

from .conftest import SENTIMENT, write_tsv
from .test_concurrent_writers import corpus


def separable(n: int = 300, exits: int = 4, dim: int = 16, labels: int = 3, seed: int = 0,
              draw_seed: int | None = None):  # type: ignore[no-untyped-def]
    """Features whose class signal grows with the exit: exit 0 carries none, the last a lot. The class
    centres come from `seed`; `draw_seed` draws other rows from the same distribution."""
    rng = np.random.default_rng(seed)
    strength = np.linspace(0.0, 2.0, exits)
    centres = rng.normal(size=(exits, labels, dim)) * strength[:, None, None]
    if draw_seed is not None:
        rng = np.random.default_rng(draw_seed)
    y = rng.integers(0, labels, n)
    x = centres[:, y].transpose(1, 0, 2) + rng.normal(size=(n, exits, dim))
    return x.astype(np.float16), y


def test_heads_learn_where_the_signal_is_and_judge_records_out_of_fold() -> None:
    x, y = separable()
    heads = fit_heads(x, y, 3, [f"r{i}" for i in range(len(y))], ["a", "b", "c"])
    assert heads.accuracy[0] < 0.5 < 0.9 < heads.accuracy[-1]  # chance at exit 0, near perfect at the last
    assert heads.best_exit >= 2 and set(heads.c) <= set(C_GRID)
    # 30 % of the records are held out for the cascade; the rest train the heads.
    assert heads.calibration is not None and heads.calibration.sum() == 90
    # Out-of-fold judgments are not the in-sample fit: they agree with its accuracy figure, per exit.
    fit = heads.fit_rows
    oof_accuracy = (heads.oof[fit].astype(np.float64).argmax(-1) == y[fit, None]).mean(0)
    np.testing.assert_allclose(oof_accuracy, heads.accuracy, atol=1e-9)
    # Calibration records are judged by the served heads (which never saw them).
    cal = np.flatnonzero(heads.calibration)[:5]
    np.testing.assert_allclose(heads.oof[cal, 2].astype(np.float64), heads.probs(2, x[cal, 2]), atol=2e-3)
    assert heads.judged("r0").shape == (4, 3) and heads.judged("unknown") is None
    # The stored form serves the same probabilities.
    again = ExitHeads.from_bytes(heads.to_bytes(), 7, "t", 1.0)
    np.testing.assert_allclose(again.probs(2, x[:5, 2]), heads.probs(2, x[:5, 2]), atol=1e-6)
    np.testing.assert_allclose(heads.all_probs(x[:5])[:, 2], heads.probs(2, x[:5, 2]), atol=1e-9)


def test_class_weights_keep_a_rare_label_from_vanishing() -> None:
    x, y = separable(n=400, exits=2, labels=2, seed=1)
    keep = np.flatnonzero((y == 0) | (np.arange(len(y)) % 8 == 0))  # label 1 is ~1 in 9
    heads = fit_heads(x[keep], y[keep], 2, [str(i) for i in keep], ["a", "b"])
    predicted = heads.oof[:, -1].astype(np.float64).argmax(-1)
    rare = y[keep] == 1
    assert (predicted[rare] == 1).mean() > 0.7  # recall of the rare label, out of fold


def test_too_few_records_are_refused() -> None:
    x, y = separable(n=10)
    with pytest.raises(InvalidInput, match="at least 20 records"):
        fit_heads(x, y, 3, [str(i) for i in range(10)], ["a", "b", "c"])


@pytest.fixture
def grown(engine: Engine, tmp_path: Path) -> Engine:
    engine.settings = engine.settings.model_copy(update={"retune_check_seconds": 0.0})
    engine.create_task(SENTIMENT)
    engine.ingest(SENTIMENT.name, read_rows(write_tsv(tmp_path / "a.tsv", corpus(60))))
    return engine


def test_ingest_keeps_exit_features_and_heads_serve_every_policy(grown: Engine) -> None:
    engine = grown
    ids, labels, features, codec = engine.metadata.features(SENTIMENT.name)
    assert len(ids) == 60 and features.shape[:2] == (60, engine.depth + 1) and features.values.dtype == np.float16
    assert codec is None  # fewer records than a codec is learned from: raw
    with pytest.raises(InvalidInput, match="fit-heads"):
        engine.classify(SENTIMENT.name, ["a great movie"], policy="heads:2")
    assert auto.needs_heads(engine, SENTIMENT.name)
    heads = auto.fit_task_heads(engine, SENTIMENT.name)
    assert heads.version == 1 and not auto.needs_heads(engine, SENTIMENT.name)

    texts = ["a great movie", "the worst plot", "i loved it"]
    answers = engine.classify(SENTIMENT.name, texts, policy="heads:2")
    expected = heads.probs(2, engine.backbone.exit_features(
        [engine._prompt(SENTIMENT, t) for t in texts], 2).float().numpy())
    for answer, p in zip(answers, expected):
        assert answer.exit_layer == 2
        np.testing.assert_allclose(answer.scores, p, atol=1e-5)
    best = engine.classify(SENTIMENT.name, texts, policy="heads")
    assert {a.exit_layer for a in best} == {heads.best_exit}
    for name in ("paper-heads", "knn-heads:0.6", "knn-heads:0.99:2"):
        for answer in engine.classify(SENTIMENT.name, texts, policy=name):
            assert answer.label in SENTIMENT.label_names and abs(sum(answer.scores) - 1) < 1e-6
            assert answer.exit_layer <= (2 if name.endswith(":2") else engine.depth)


def test_knn_heads_stops_where_the_combined_answer_is_sure(grown: Engine) -> None:
    engine = grown
    heads = auto.fit_task_heads(engine, SENTIMENT.name)
    spec, head = engine._task(SENTIMENT.name)
    found, _ = engine.neighbours(SENTIMENT.name, ["a great movie"], 12)
    decision = KnnHeadsPolicy(0.8).decide(found[0], engine.depth, spec.label_names)
    probs, layer = engine.forward_at(spec, head, ["a great movie"], [decision], heads)
    prompt = engine._prompt(spec, "a great movie")
    per_exit = [mix(heads.probs(l, engine.backbone.exit_features([prompt], l).float().numpy())[0], decision.prior)
                for l in range(engine.depth + 1)]
    first = next((l for l, p in enumerate(per_exit) if p.max() >= 0.8), engine.depth)
    assert layer == [first]
    np.testing.assert_allclose(probs[0], per_exit[first], atol=1e-5)


def test_a_new_fit_replaces_the_served_heads_and_deleting_the_task_removes_them(grown: Engine,
                                                                               tmp_path: Path) -> None:
    engine = grown
    first = auto.fit_task_heads(engine, SENTIMENT.name)
    assert engine.heads(SENTIMENT.name).version == first.version  # type: ignore[union-attr]
    engine.ingest(SENTIMENT.name, read_rows(write_tsv(tmp_path / "b.tsv", corpus(100)[60:])))
    assert auto.needs_heads(engine, SENTIMENT.name)  # grew by 67 % > RAEE_RETUNE_GROWTH (50 %)
    second = auto.fit_task_heads(engine, SENTIMENT.name)
    served = engine.heads(SENTIMENT.name)
    assert served is not None and served.version == second.version == first.version + 1
    assert len(served.record_ids) == 100
    engine.delete_task(SENTIMENT.name)
    with engine.metadata.engine.connect() as conn:
        assert conn.execute(text("select count(*) from exit_features")).scalar() == 0
        assert conn.execute(text("select count(*) from task_heads")).scalar() == 0


def test_backfill_gives_old_records_the_features_ingest_would_have(grown: Engine) -> None:
    engine = grown
    ids, _, before, _ = engine.metadata.features(SENTIMENT.name)
    with engine.metadata.engine.begin() as conn:  # records from before exit heads: no features
        conn.execute(text("delete from exit_features"))
    assert len(engine.metadata.without_features(SENTIMENT.name)) == 60
    assert engine.backfill_features(SENTIMENT.name) == 60
    again_ids, _, after, _ = engine.metadata.features(SENTIMENT.name)
    assert again_ids == ids
    np.testing.assert_allclose(after.values.astype(np.float32), before.values.astype(np.float32), atol=1e-2)


def test_auto_can_choose_a_heads_policy_once_heads_exist(grown: Engine) -> None:
    engine = grown
    heads = auto.fit_task_heads(engine, SENTIMENT.name)
    # Untuned, with heads: no policy named answers with the best head, and says so.
    [untuned] = engine.classify(SENTIMENT.name, ["a fine film"])
    assert untuned.policy == f"auto=heads:{heads.best_exit} (no auto choice yet)"
    assert untuned.exit_layer == heads.best_exit
    names = auto.candidate_policies(engine.depth, engine.heads(SENTIMENT.name))
    assert {"paper-heads", "heads:0", f"heads:{engine.depth}"} <= set(names)
    assert any(n.startswith("cascade:") for n in names) and not any(n.startswith("knn-heads") for n in names)
    choice = auto.tune(engine, SENTIMENT.name)
    assert choice.policy in names and choice.heads_version == 1
    assert not auto.needs_tuning_after_heads(engine, SENTIMENT.name)
    auto.fit_task_heads(engine, SENTIMENT.name)  # version 2: the choice was made among older heads
    assert auto.needs_tuning_after_heads(engine, SENTIMENT.name)
    policy, _, served = engine.resolve_policy(SENTIMENT.name, "auto", None)
    assert served == f"auto={policy.name}"
    assert policy.name == choice.policy or (isinstance(policy, HeadsPolicy) and choice.policy.startswith("heads"))


def test_a_server_fits_heads_in_the_background_and_serves_them(tmp_path: Path) -> None:
    """Grown online through gRPC, the task gets exit heads without any request waiting for a fit;
    GetTask shows them, a heads policy answers with the head's scores, its exit and timings."""
    from raee_server.protos.raee.v1 import raee_pb2 as pb

    from .grpc_harness import ServerThread
    from .test_grpc import ingest, make_settings, tiny_engine_factory

    # any growth: refit; niceness 0: a busy machine must not starve the test's fit (nice 19 is the default)
    settings = make_settings(tmp_path, retune_check_seconds=0.2, retune_growth=0.0, fit_niceness=0)
    server = ServerThread(settings, tiny_engine_factory(tmp_path, settings))
    server.wait_ready()
    try:
        assert not server.stub.GetTask(pb.GetTaskRequest(name="sentiment")).task.HasField("heads")
        ingest(server.stub, "sentiment", corpus(60), chunk=16)
        deadline = time.monotonic() + 300
        # Fit once the task has 20 records (maybe mid-ingest), refit whenever it grew since (growth 0).
        while (task := server.stub.GetTask(pb.GetTaskRequest(name="sentiment")).task).heads.records != 60:
            assert server.stub.Classify(pb.ClassifyRequest(task="sentiment", text="a fine film"), timeout=60).label
            assert time.monotonic() < deadline, "no heads were fit in the background"
            time.sleep(0.2)
        assert task.heads.version >= 1
        assert len(task.heads.validation_accuracy) == task.depth + 1 and task.heads.best_exit <= task.depth
        reply = server.stub.Classify(pb.ClassifyRequest(task="sentiment", text="a great movie",
                                                        options=pb.ClassifyOptions(policy="heads:3")), timeout=60)
        assert reply.exit_layer == 3 and abs(sum(s.score for s in reply.scores) - 1) < 1e-5
        assert reply.timings.forward_us > 0
    finally:
        server.stop()


def test_doctor_reports_records_without_features_and_repair_backfills_them(grown: Engine) -> None:
    from raee_server.core import doctor

    engine = grown
    assert doctor.diagnose(engine, SENTIMENT.name).healthy
    with engine.metadata.engine.begin() as conn:
        conn.execute(text("delete from exit_features"))
    found = doctor.diagnose(engine, SENTIMENT.name)
    assert not found.healthy and found.without_features == 60 and "60 without exit features" in found.summary()
    assert doctor.repair(engine, found).healthy


def test_a_fit_stops_when_asked() -> None:
    """A server on SIGTERM must not wait minutes for a background fit: the fit checks a flag."""
    from raee_server.core.fitting import FitCancelled

    x, y = separable(n=60)
    with pytest.raises(FitCancelled):
        fit_heads(x, y, 3, [str(i) for i in range(60)], ["a", "b", "c"], cancelled=lambda: True)


def balanced_loss(probs: np.ndarray, gold: np.ndarray, thresholds: np.ndarray, bound: int) -> tuple[float, float]:
    """Balanced accuracy lost by the cascade against the bound head on these rows, and its mean exit."""
    exits = cascade_exits(probs, thresholds, bound)
    cascade = probs[np.arange(len(gold)), exits].argmax(-1) == gold
    best = probs[:, bound].argmax(-1) == gold
    labels = np.unique(gold)
    lost = np.mean([best[gold == c].mean() - cascade[gold == c].mean() for c in labels])
    return float(lost), float(exits.mean())


def test_the_cascade_keeps_its_promise_on_new_rows_and_buys_depth_with_the_margin() -> None:
    """Learn-then-Test: thresholds certified on the calibration split hold on rows the fit never saw."""
    x, y = separable(n=3000, exits=6, labels=3)
    heads = fit_heads(x, y, 3, [f"r{i}" for i in range(len(y))], ["a", "b", "c"])
    bound = heads.best_exit
    new_x, new_y = separable(n=6000, exits=6, labels=3, draw_seed=99)  # the same distribution, new rows
    new_probs = heads.all_probs(new_x)
    cal = heads.calibration
    assert cal is not None
    depths = []
    for margin in (0.0, 0.01, 0.02, 0.05):
        t = heads.cascade_thresholds(margin)
        assert np.isinf(t[bound:]).all()  # never stops at or past the bound by threshold
        # certified on the calibration split, which neither fit the heads nor proposed the thresholds
        certified = risk_bound(heads.oof[cal].astype(np.float64), y[cal], t, bound, 3)
        assert certified <= margin or np.isinf(t).all()
        lost, mean_exit = balanced_loss(new_probs, new_y, t, bound)
        assert lost <= margin  # the promise, on new rows
        depths.append(mean_exit)
    assert depths[0] == bound  # nothing can be certified at a margin of 0: the best head answers
    assert depths[-1] < 0.8 * bound and depths == sorted(depths, reverse=True)  # a larger margin buys depth
    # Kept with the stored heads; heads without a calibration split (stored before it) never stop early.
    again = ExitHeads.from_bytes(heads.to_bytes(), 1, "t", 1.0)
    np.testing.assert_array_equal(again.cascade_thresholds(0.02), heads.cascade_thresholds(0.02))
    again.calibration = None
    again._cascades.clear()
    assert np.isinf(again.cascade_thresholds(0.05)).all()
    # A bound at exit 0 leaves nothing to stop at: every row answers there.
    assert np.isinf(heads.cascade_thresholds(0.05, bound=0)).all()
    assert (cascade_exits(new_probs, heads.cascade_thresholds(0.05, bound=0), 0) == 0).all()


def test_the_batched_fit_is_scikit_learns_logistic_regression() -> None:
    """Same objective (class-weighted cross-entropy + ||W||^2 / 2C, unpenalised intercept), same optimum."""
    import torch
    from sklearn.linear_model import LogisticRegression

    x, y = separable(n=400, exits=2, dim=8, labels=3, seed=3)
    z = x[:, 1].astype(np.float64)
    z = (z - z.mean(0)) / z.std(0)
    double = torch.float64
    x_all, y_all, w_all = torch.tensor(z[None], dtype=double), torch.tensor(y), torch.ones(len(y), dtype=double)
    whole = lambda: [(x_all, y_all, w_all)]  # noqa: E731
    # The same rows in three chunks of unequal size: the gradient is summed chunk by chunk, same optimum.
    cuts = [(0, 150), (150, 170), (170, 400)]
    chunked = lambda: [(x_all[:, a:b], y_all[a:b], w_all[a:b]) for a, b in cuts]  # noqa: E731
    for c in (0.01, 1.0):
        theirs = LogisticRegression(C=c, tol=1e-10, max_iter=5000).fit(z, y)
        for batches in (whole, chunked):
            ours = _fit(batches, float(len(y)), 1, 8, torch.tensor([c], dtype=double), 3, max_iter=500, dtype=double)
            np.testing.assert_allclose(ours[0][0].numpy().T, theirs.coef_, atol=2e-4)
            np.testing.assert_allclose(ours[1][0].numpy() - ours[1][0].numpy().mean(),
                                       theirs.intercept_ - theirs.intercept_.mean(), atol=2e-4)


def stored_heads(oof: np.ndarray, gold: np.ndarray, calibration: np.ndarray) -> ExitHeads:
    """Heads whose judgments are exactly `oof` [N, E, C] (the weights play no part)."""
    n, exits, labels = oof.shape
    accuracy = (oof.argmax(-1) == gold[:, None]).mean(0)
    return ExitHeads([f"l{c}" for c in range(labels)], np.zeros((exits, 1)), np.ones((exits, 1)),
                     np.zeros((exits, 1, labels)), np.zeros((exits, labels)), np.ones(exits), accuracy,
                     [f"r{i}" for i in range(n)], oof.astype(np.float16), gold, calibration)


def test_cascades_and_the_best_exit_are_judged_by_balanced_accuracy() -> None:
    # 900 records of label 0, 100 of label 1, twice (a fit half, a calibration half). Exit 0 answers 0
    # for every record, sure of it for all of label 0 and for 40 of label 1; exit 1 is right on every
    # record but less sure.
    gold = np.array([0] * 900 + [1] * 100)
    oof = np.zeros((1000, 2, 2))
    oof[:, 0] = [0.6, 0.4]
    oof[:940, 0] = [0.95, 0.05]
    oof[np.arange(1000), 1, gold] = 0.8
    oof[np.arange(1000), 1, 1 - gold] = 0.2
    heads = stored_heads(np.concatenate([oof, oof]), np.concatenate([gold, gold]),
                         np.repeat([False, True], 1000))
    # Plain accuracy: stopping the 940 sure rows at exit 0 costs 4 % (within a 5 % margin); balanced
    # accuracy: it costs 20 points (40 % of label 1's recall). The cascade must not stop them.
    assert heads.best_exit == 1
    thresholds = heads.cascade_thresholds(0.05)
    lost, _ = balanced_loss(heads.oof.astype(np.float64), heads.gold, thresholds, 1)
    assert lost <= 0.05
    # Exit 0 is 90 % accurate and 50 % balanced (it never answers label 1); on a balanced set of
    # records the two measures agree.
    assert heads.accuracy[0] == pytest.approx(0.9) and heads.balanced_accuracy[0] == pytest.approx(0.5)
    even = np.concatenate([np.flatnonzero(gold == 0)[:100], np.flatnonzero(gold == 1)])
    plain = stored_heads(oof[even], gold[even], np.zeros(len(even), dtype=bool))
    np.testing.assert_allclose(plain.balanced_accuracy, plain.accuracy)


def test_cascade_serves_the_first_exit_whose_head_is_sure(grown: Engine) -> None:
    engine = grown
    heads = auto.fit_task_heads(engine, SENTIMENT.name)
    policy, _, _ = engine.resolve_policy(SENTIMENT.name, "cascade:0.05", None)
    assert isinstance(policy, CascadePolicy) and policy.last == heads.best_exit and policy.name == "cascade:0.05"
    np.testing.assert_array_equal(policy.thresholds, heads.cascade_thresholds(0.05))
    texts = ["a great movie", "the worst plot", "i loved it", "dull and slow", "fine", "not for me"]
    per_text = [np.stack([heads.probs(l, engine.backbone.exit_features([engine._prompt(SENTIMENT, t)], l)
                                      .float().numpy())[0] for l in range(engine.depth + 1)]) for t in texts]
    # Served as calibrated (60 records: too few to certify anything, so the best head answers), and with
    # thresholds set between these texts' own confidences, so that some stop early and some do not.
    sure = np.stack([p.max(-1) for p in per_text])  # [texts, exits]
    middle = np.median(sure, 0)
    middle[np.ptp(sure, 0) < 1e-6] = np.inf  # only exits whose heads tell these texts apart (exit 0 cannot)
    for served in (policy, replace(policy, thresholds=tuple(float(t) for t in middle))):
        answers = engine.classify(SENTIMENT.name, texts, policy=served)
        for probs, answer in zip(per_text, answers):
            first = int(cascade_exits(probs[None], np.array(served.thresholds), heads.best_exit)[0])
            assert answer.exit_layer == first
            np.testing.assert_allclose(answer.scores, probs[first], atol=1e-5)
    assert len({a.exit_layer for a in answers}) > 1 or heads.best_exit == 0
    bounded, _, _ = engine.resolve_policy(SENTIMENT.name, "cascade:0.05:1", None)
    assert bounded.name == "cascade:0.05:1"
    assert all(a.exit_layer <= 1 for a in engine.classify(SENTIMENT.name, texts, policy="cascade:0.05:1"))
    with pytest.raises(InvalidInput, match="cascade"):
        engine.classify(SENTIMENT.name, texts, policy="cascade:２")


def test_a_child_process_fits_and_stores_heads_the_engine_then_serves(grown: Engine) -> None:
    engine = grown
    summary = asyncio.run(fit_heads_in_child(engine.settings.sql_url, SENTIMENT.name, niceness=0))
    assert summary["version"] == 1 and summary["records"] == 60
    served = engine.heads(SENTIMENT.name)
    assert served is not None and served.version == 1 and served.gold is not None
    with pytest.raises(RuntimeError, match="no-such-task"):
        asyncio.run(fit_heads_in_child(engine.settings.sql_url, "no-such-task"))


def test_a_running_ingest_holds_back_the_background_fit(grown: Engine) -> None:
    metadata = grown.metadata
    assert not metadata.ingesting(SENTIMENT.name)
    batch = metadata.begin_batch(SENTIMENT.name, "stream")
    assert metadata.ingesting(SENTIMENT.name)
    assert not metadata.ingesting(SENTIMENT.name, within=timedelta(seconds=-1))  # a stale `running` row
    metadata.finish_batch(batch, 1, 0, 0, "done")
    assert not metadata.ingesting(SENTIMENT.name)


def test_a_warm_refit_keeps_what_the_served_version_knew_and_judges_new_records_by_it() -> None:
    x, y = separable(n=700, exits=3, dim=12, seed=5)
    ids = [f"r{i:03d}" for i in range(700)]
    names = ["a", "b", "c"]
    served = fit_heads(x[:300], y[:300], 3, ids[:300], names)
    assert served.space is not None and served.space.full_fit_records == 300
    grown = fit_heads(x[:400], y[:400], 3, ids[:400], names, previous=served)
    space = grown.space
    assert space is not None and space.full_fit_records == 300  # warm: C and standardisation kept
    np.testing.assert_array_equal(grown.c, served.c)
    np.testing.assert_array_equal(space.mean, served.space.mean)
    assert not np.allclose(space.weight, served.space.weight)  # it learned from the new records
    assert served.calibration is not None and grown.calibration is not None
    np.testing.assert_array_equal(grown.calibration[:300], served.calibration)  # known records keep their side
    assert 0 < grown.calibration[300:].sum() < 100
    known_fit = np.flatnonzero(~served.calibration)
    np.testing.assert_array_equal(grown.oof[known_fit], served.oof[known_fit])  # judgments made before stay
    new_fit = 300 + np.flatnonzero(~grown.calibration[300:])
    np.testing.assert_allclose(grown.oof[new_fit].astype(np.float64), served.all_probs(x[new_fit]), atol=2e-3)
    cal = np.flatnonzero(grown.calibration)  # the calibration split, by the new heads that never saw it
    np.testing.assert_allclose(grown.oof[cal].astype(np.float64), grown.all_probs(x[cal]), atol=2e-3)
    # Past twice the records of the last full fit: a full fit again (C chosen anew).
    full = fit_heads(x, y, 3, ids, names, previous=grown)
    assert full.space is not None and full.space.full_fit_records == 700
    # Other labels: never warm.
    assert fit_heads(x[:400], y[:400], 3, ids[:400], ["x", "y", "z"], previous=served).space.full_fit_records == 400  # type: ignore[union-attr]


def test_past_the_cross_validation_sample_every_fit_record_trains_the_served_heads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from raee_server.core import fitting as heads_module

    monkeypatch.setattr(heads_module, "CV_ROWS", 120)  # C chosen on 120 of the 280 fit records
    monkeypatch.setattr(heads_module, "CHUNK_ROWS", 50)  # and the gradient summed over 6 chunks
    x, y = separable(n=400, exits=3, dim=12, seed=6)
    heads = fit_heads(x, y, 3, [f"r{i}" for i in range(400)], ["a", "b", "c"])
    assert heads.space is not None and heads.calibration is not None
    fit = np.flatnonzero(~heads.calibration)
    z = (x[fit].astype(np.float64) - heads.space.mean) / heads.space.scale
    c = torch.tensor(heads.c, dtype=torch.float64)
    whole = torch.from_numpy(z.transpose(1, 0, 2).copy())
    w = torch.from_numpy(heads_module.class_weights(y[fit], 3).astype(np.float64))
    reference = _fit(lambda: [(whole, torch.from_numpy(y[fit]), w)], float(w.sum()), 3, 12, c, 3, max_iter=500,
                     dtype=torch.float64)
    served = heads.all_probs(x[fit])
    z_all = torch.from_numpy(z.transpose(1, 0, 2).copy())
    optimum = torch.softmax(torch.bmm(z_all, reference[0]) + reference[1].unsqueeze(1), -1).permute(1, 0, 2).numpy()
    np.testing.assert_allclose(served, optimum, atol=1e-2)
    # Records outside the sample were judged by fold models, not by the heads they trained.
    in_sample = served
    assert not np.allclose(heads.oof[fit].astype(np.float64), in_sample, atol=1e-3)
    assert abs(heads.accuracy[-1] - (in_sample.argmax(-1)[:, -1] == y[fit]).mean()) < 0.1
