"""`raee-admin bench` end to end on a tiny model: every policy on the same rows, sweeps, reports, plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from raee_server.cli.main import cli
from raee_server.errors import InvalidInput

from .conftest import task_data
from .tiny_models import save_tiny_backbone


def run_bench(tmp_path: Path, rows: int, train: int, *options: str) -> dict:  # type: ignore[type-arg]
    """`raee-admin bench sst2` on a tiny model and `rows` rows of data (`train` of them train rows),
    written to <tmp_path>/out; returns the task's report."""
    model = save_tiny_backbone(tmp_path / "model")
    task_data(tmp_path / "data", rows, train=train)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [
        "--backbone", str(model), "--encoder", "hashing:32", "bench", "sst2", "--data", str(tmp_path / "data"),
        *options, "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return dict(json.loads((out / "results.json").read_text())["tasks"][0])


def test_bench_writes_comparable_results_and_plots(tmp_path: Path) -> None:
    report = run_bench(tmp_path, 170, 120, "--train-rows", "100", "--dev-rows", "40", "--dev-skip", "10",
                       "--latency-rows", "3", "--size", "30", "--size", "60", "--alt-encoder", "hashing:16",
                       "--alt-encoder", "backbone:1")
    out = tmp_path / "out"
    policies = {p["policy"]: p for p in report["policies"]}
    static, confidence = report["calibrated_on_train"]["static"], report["calibrated_on_train"]["confidence"]
    assert {"full", static, confidence, "paper", "paper-all", "knn-agree", "knn-vote", "oracle"} <= set(policies)
    assert any(name.startswith("auto=") for name in policies)
    assert all(p["rows"] == 40 for p in policies.values())  # the same rows for every policy
    assert policies["full"]["mean_exit_layer"] == 4 and policies["knn-vote"]["mean_exit_layer"] == 0
    backbone_answered = [p for name, p in policies.items() if name not in ("knn-vote", "oracle")
                         and not name.startswith("auto=knn-vote")]
    assert all(policies["oracle"]["accuracy"] >= p["accuracy"] for p in backbone_answered)
    # Static's layer is the one its accuracy says: the best single exit among the calibrated ones is real.
    assert 0 <= int(static.split(":")[1]) <= 4
    assert [x for x, *_ in report["size_sweep"]["paper"]] == [30, 60, 100]
    assert [x for x, *_ in report["k_sweep"]["paper"]] == [1, 2, 4, 8, 12, 16, 24, 32]
    assert set(report["encoder_sweep"]) == {"hashing-32", "hashing-16", "model-hidden1"}
    assert set(report["latency_us"]) >= {"full", "paper", "knn-vote"}
    assert report["latency_us"]["knn-vote"]["forward_us"]["p95"] < report["latency_us"]["full"]["forward_us"]["p50"]
    for png in ("accuracy_vs_exit.png", "exit_histograms.png", "layer_accuracy.png", "k_sweep.png",
                "size_sweep.png", "encoder_sweep.png"):
        assert (out / png).stat().st_size > 5000
    assert "| paper |" in (out / "results.md").read_text()
    # Exit heads: fit on the train records; the cascades and the comparison against the baselines are reported.
    assert report["heads"]["records"] == 100 and len(report["heads"]["accuracy"]) == 5
    assert {"cascade:0.01", "cascade:0.02", "cascade:0.03", "key-logreg", "oracle-heads"} <= set(policies)
    assert all(policies[c]["mean_exit_layer"] <= report["heads"]["best_exit"] for c in policies if c.startswith("casc"))
    assert "against the best baseline" in (out / "results.md").read_text()
    # The report rows are dev rows 11-50; the baselines get their own tuning; every figure has its interval
    # against the best baseline (the best of key-logreg, knn-vote, paper and the head at full depth).
    assert report["dev_skip"] == 10 and "dev rows 11-50" in (out / "results.md").read_text()
    assert "heads:4" in policies and set(report["baseline_k"]) == {"paper", "knn-vote"}
    assert all(k in (4, 8, 12, 16, 24, 32) for k in report["baseline_k"].values())
    assert 1e-4 <= report["key_logreg_c"] <= 1e3 and len(report["heads"]["c"]) == 5
    assert report["best_baseline"] in ("key-logreg", "knn-vote", "paper", "heads:4")
    best = policies[report["best_baseline"]]
    assert best["accuracy"] == max(policies[b]["accuracy"] for b in ("key-logreg", "knn-vote", "paper", "heads:4"))
    for p in policies.values():
        assert p["vs_best_baseline"] == pytest.approx(p["accuracy"] - best["accuracy"])
        assert p["vs_best_baseline_low"] <= p["vs_best_baseline"] <= p["vs_best_baseline_high"]
        assert p["balanced_vs_best_baseline"] == pytest.approx(p["balanced_accuracy"] - best["balanced_accuracy"])
        low, high = p["balanced_vs_best_baseline_low"], p["balanced_vs_best_baseline_high"]
        assert low <= p["balanced_vs_best_baseline"] <= high
    assert best["vs_best_baseline_low"] == best["vs_best_baseline_high"] == 0
    # The leak-free rows: a subset, scored alike; the cascades against the best head, with their margin.
    assert report["leak_free"] and all(p["rows"] <= 40 for p in report["leak_free"])
    assert {c["policy"] for c in report["cascades"]} >= {"cascade:0.01", "cascade:0.02", "cascade:0.03"}
    # The key-first cascades (issue 32), each against the heads-only cascade at its margin.
    key_first = {c["policy"]: c for c in report["cascades"] if c["policy"].startswith("key-cascade:")}
    assert set(key_first) == {"key-cascade:0.01", "key-cascade:0.02", "key-cascade:0.03"}
    for c in key_first.values():
        plain = policies[f"cascade:{c['margin']:g}"]
        assert c["vs_heads_only_low"] <= c["vs_heads_only"] <= c["vs_heads_only_high"]
        assert c["depth_vs_heads_only"] == pytest.approx(c["mean_exit"] / max(plain["mean_exit_layer"], 1e-9))
        assert 0 <= c["key_share"] <= 1 and policies[c["policy"]]["key_share"] == c["key_share"]
    assert report["heads"]["key_head"] is not None and report["heads"]["coverage"]["words"] >= 1


def test_bench_coverage_measures_cascades_with_and_without_the_gate(tmp_path: Path) -> None:
    model = save_tiny_backbone(tmp_path / "model")
    task_data(tmp_path / "data", 330, train=200)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [
        "--backbone", str(model), "--encoder", "hashing:32", "bench-coverage", "sst2", "--construction", "subtopic",
        "--data", str(tmp_path / "data"), "--train-rows", "200", "--rows", "40", "--dev-skip", "10",
        "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "coverage.json").read_text())["reports"][0]
    assert report["construction"] == "subtopic" and 0 < report["records"] < 200  # one cluster per label kept
    for traffic in ("control", "shifted"):
        t = report["traffic"][traffic]
        assert 0 < t["rows"] <= 40 and 0 <= t["outside"] <= 1
        policies = {p["policy"]: p for p in t["policies"]}
        best = f"heads:{report['heads']['best_exit']}"
        assert policies[best]["balanced_lost"] == 0
        for m in ("0.01", "0.02", "0.03"):
            gated, ungated = policies[f"key-cascade:{m}"], policies[f"key-cascade-ungated:{m}"]
            assert gated["key_share"] <= ungated["key_share"]  # the gate only ever stops fewer rows early
            assert gated["low"] <= gated["balanced_lost"] <= gated["high"]
    assert "| key-cascade:0.02 |" in (out / "coverage.md").read_text()
    assert (out / "coverage.png").stat().st_size > 5000


def test_scale_benchmark_measures_each_size_before_and_after_indexing(tmp_path: Path) -> None:
    from raee_server.bench import scale

    results = scale.scale([300, 600], tenants=3, dim=16, queries=20, recall_queries=20)
    assert [r["records"] for r in results] == [300, 600] and [r["per_tenant"] for r in results] == [100, 200]
    for r in results:
        assert r["upsert_per_second"] > 0 and r["index_seconds"] >= 0
        for phase in ("scan", "indexed"):
            assert 0 < r[phase]["p50_ms"] <= r[phase]["p95_ms"] <= r[phase]["p99_ms"]
            assert r[phase]["recall"] == 1.0  # tenants this small are scanned exactly: numpy must agree
    serving = results[-1]["serving_rss_mb"]
    assert 0 < serving["before_open"] < serving["after_500_queries"]
    rows = [line.split(" | ")[0] for line in scale.table(results).splitlines()[2:] if line.startswith("| ")]
    assert rows == ["| 300", "| 600"] and "A fresh process opening the 600-record store" in scale.table(results)
    scale.plot(results, tmp_path / "scale.png")
    assert (tmp_path / "scale.png").stat().st_size > 5000
    with pytest.raises(InvalidInput, match="keys: expected one of clustered, uniform"):
        scale.scale([10], keys="gaussian")


def test_scale_benchmark_on_real_keys_holds_its_queries_out(tmp_path: Path) -> None:
    from raee_server.bench import scale

    keys = np.random.default_rng(1).normal(size=(700, 16))
    with pytest.raises(InvalidInput, match="size: 650 records asked for, but only 600 real keys"):
        scale.scale([650], keys=keys, queries=100)
    results = scale.scale([200, 600], tenants=2, keys=keys, queries=100, recall_queries=100)
    assert [r["records"] for r in results] == [200, 600] and results[-1]["indexed"]["recall"] == 1.0


def test_scale_benchmark_runs_against_a_qdrant_server_store() -> None:
    """The server path (here qdrant-client's in-memory mode) gives the same exact answers."""
    from raee_server.bench import scale

    results = scale.scale([300], tenants=3, dim=16, queries=10, keys="uniform",
                          store_factory=scale.server_store_factory(":memory:", dim=16))
    assert results[0]["indexed"]["recall"] == results[0]["scan"]["recall"] == 1.0


def test_bench_scale_command_writes_its_reports(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["bench-scale", "--size", "400", "--size", "800", "--tenants", "4",
                                      "--queries", "10", "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "scale.json").read_text())
    assert report["store"] == "embedded" and report["keys"] == "clustered"
    assert [r["records"] for r in report["results"]] == [400, 800]
    assert "| 800 | 200 |" in (tmp_path / "scale.md").read_text() and (tmp_path / "scale.png").exists()


def test_bench_speed_compares_both_ingest_paths_and_their_records(tmp_path: Path) -> None:
    model = save_tiny_backbone(tmp_path / "model")
    task_data(tmp_path / "data", 60, train=60)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["--data-dir", str(tmp_path / "stores"), "--backbone", str(model), "--encoder",
                                      "hashing:32", "--json", "bench-speed", "sst2:50", "--data",
                                      str(tmp_path / "data"), "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    task = report["tasks"][0]
    assert report["machine_gflops"] > 0 and task["rows"] == 50 and task["gflop_per_row"] > 0
    # float32 beside bfloat16, and which native units this CPU has (what the comparison means)
    assert set(report["matmul_512_gflops"]) == {"float32", "bfloat16"} and min(report["matmul_512_gflops"].values()) > 0
    from raee_server.models.hardware import bfloat16_units

    assert report["bfloat16_units"] == bfloat16_units()
    assert "bfloat16 " in (out / "speed.md").read_text()
    assert set(task["paths"]) == {"file order", "by length"}
    assert all(p["added"] == 50 and p["rows_per_second"] > 0 for p in task["paths"].values())
    # Batching by length changes how rows are grouped, not what each record says.
    assert task["records"] == {"same_ids": True, "records": 50, "max_probability_difference":
                               task["records"]["max_probability_difference"], "predictions_that_differ": 0,
                               "identical": True}
    assert task["records"]["max_probability_difference"] <= 1e-4
    assert "| sst2 | 50 |" in (out / "speed.md").read_text() and (out / "speed.png").stat().st_size > 5000


def test_bench_without_heads_fits_none_and_still_sweeps(tmp_path: Path) -> None:
    report = run_bench(tmp_path, 100, 70, "--train-rows", "60", "--dev-rows", "20", "--latency-rows", "2",
                       "--size", "30", "--sweep", "size", "--no-heads")
    policies = {p["policy"] for p in report["policies"]}
    assert report["heads"] == {} and not any(p.startswith(("heads:", "cascade", "oracle-heads")) for p in policies)
    assert {"paper", "knn-vote", "key-logreg"} <= policies
    assert [x for x, *_ in report["size_sweep"]["knn-vote"]] == [30, 60]


def test_leak_free_rows_share_no_four_word_phrase_with_a_record_and_sit_inside_none() -> None:
    from raee_server.bench.harness import leak_free_rows
    from raee_server.types import Row

    records = ["The plot is thin and the acting is worse", "a joy"]
    rows = [Row(1, "the plot is THIN and dull", "n"), Row(2, "is thin", "n"), Row(3, "a fine film", "p"),
            Row(4, "plot is thin", "n"), Row(5, "thin and the acting", "n"), Row(6, "a joy to watch", "p")]
    # 1 and 5 share four words in a row; 2 and 4 sit inside a record; 3 and 6 are new text
    assert leak_free_rows(records, rows) == [2, 5]
