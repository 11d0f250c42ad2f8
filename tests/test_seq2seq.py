"""Encoder-decoder backbones (T5): 2 x D + 1 exits at the first decoding step, truncation, and the
whole ingest/classify/eval path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from raee_server.cli.main import cli
from raee_server.errors import InvalidInput
from raee_server.models.seq2seq import Seq2SeqBackbone

from .conftest import admin_cli, write_tsv
from .test_concurrent_writers import corpus
from .tiny_models import save_tiny_t5, tiny_t5, tiny_tokenizer

PROMPTS = ["what is the sentiment of a great movie ? the answer is", "boring", "the plot is a mess"]


@pytest.fixture
def bb() -> Seq2SeqBackbone:
    return Seq2SeqBackbone(tiny_t5(layers=2), tiny_tokenizer(), "tiny-t5")


def test_exits_count_both_stacks_and_the_last_is_the_models_answer(bb: Seq2SeqBackbone) -> None:
    head = bb.label_head(bb.label_token_ids([" good", " bad"]))
    lens = bb.all_exit_logits(PROMPTS, head)
    assert bb.depth == 4 and lens.shape == (3, 2 * 2 + 1, 2)  # 2 x D + 1 exits
    for i, prompt in enumerate(PROMPTS):
        enc = bb.tokenizer([prompt], return_tensors="pt")
        with torch.no_grad():
            own = bb.model(**enc, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long)).logits[0, 0]
        torch.testing.assert_close(lens[i, -1], own[list(head.token_ids)], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lens[i], bb.all_exit_logits([prompt], head)[0], rtol=1e-4, atol=1e-5)


def test_each_exit_runs_only_what_it_needs(bb: Seq2SeqBackbone) -> None:
    head = bb.label_head(bb.label_token_ids([" good", " bad"]))
    lens = bb.all_exit_logits(PROMPTS, head)
    encoder_ran, decoder_ran = [0], [0]
    for layer in bb.encoder_layers:
        layer.register_forward_hook(lambda *_: encoder_ran.__setitem__(0, encoder_ran[0] + 1))
    for layer in bb.decoder_layers:
        layer.register_forward_hook(lambda *_: decoder_ran.__setitem__(0, decoder_ran[0] + 1))
    expected = {0: (0, 2), 1: (1, 2), 2: (2, 2), 3: (2, 1), 4: (2, 2)}  # (encoder, first-step decoder) layers
    for exit_layer, (enc, dec) in expected.items():
        encoder_ran[0] = decoder_ran[0] = 0
        torch.testing.assert_close(bb.exit_logits(PROMPTS, head, exit_layer), lens[:, exit_layer],
                                   rtol=1e-4, atol=1e-5)
        assert (encoder_ran[0], decoder_ran[0]) == (enc, dec), exit_layer
    found: list[tuple[torch.Tensor, int]] = []

    def visit(layer: int, rows: list[int], features: torch.Tensor) -> list[int]:  # stop the first row at 3
        if layer == 3:
            found.append((bb.lens(features[0], head), layer))
            return rows
        return []

    bb.walk_exits(PROMPTS[:1], 4, visit)
    logits, layer = found[0]
    assert layer == 3
    torch.testing.assert_close(logits, lens[0, 3], rtol=1e-4, atol=1e-5)


def test_a_mask_slot_is_refused(bb: Seq2SeqBackbone) -> None:
    with pytest.raises(InvalidInput, match="is for masked-LM backbones"):
        bb.check_template("{text} It was {mask}.")


def test_ingest_classify_eval_on_t5(tmp_path: Path) -> None:
    model = save_tiny_t5(tmp_path / "tiny-t5")
    run = admin_cli(tmp_path / "data", model)

    run("task", "create", "s", "--template", "sentiment : {text}", "--label", "negative= bad",
        "--label", "positive= good")
    rows = corpus(50)
    assert "added 40" in run("ingest", "--task", "s", str(write_tsv(tmp_path / "t.tsv", rows[:40])))
    answer = json.loads(run("classify", "--task", "s", "--json", "a great movie").strip().splitlines()[-1])[0]
    assert answer["depth"] == 4 and 0 <= answer["exit_layer"] <= 4
    assert "paper" in run("eval", "--task", "s", str(write_tsv(tmp_path / "d.tsv", rows[40:])))


def test_records_of_another_backbone_are_refused(tmp_path: Path) -> None:
    """Same stores, another backbone: the task's records are not used (a clear error instead)."""
    runner = CliRunner()
    t5 = save_tiny_t5(tmp_path / "tiny-t5")
    from .tiny_models import save_tiny_masked_lm

    roberta = save_tiny_masked_lm(tmp_path / "tiny-roberta", "roberta")
    data = ["--data-dir", str(tmp_path / "data"), "--encoder", "hashing:32"]
    created = runner.invoke(cli, [*data, "--backbone", str(t5), "task", "create", "s", "--template", "{text} :",
                                  "--label", "negative= bad", "--label", "positive= good"])
    assert created.exit_code == 0, created.output
    other = runner.invoke(cli, [*data, "--backbone", str(roberta), "classify", "--task", "s", "good"])
    assert other.exit_code == 3 and "was built with backbone 'tiny-t5'" in other.output


@pytest.mark.parametrize("family", ["masked", "seq2seq"])
def test_bench_runs_on_every_family(family: str, tmp_path: Path) -> None:
    from raee_server.bench.harness import bench_task
    from raee_server.core.engine import Engine
    from raee_server.settings import Settings
    from raee_server.types import Label, TaskSpec

    from .tiny_models import save_tiny_masked_lm

    model = save_tiny_masked_lm(tmp_path / "m", "bert") if family == "masked" else save_tiny_t5(tmp_path / "m")
    template = "{text} . it was {mask} ." if family == "masked" else "sentiment : {text}"
    engine = Engine.open(Settings(data_dir=tmp_path / "data", backbone=str(model), encoder="hashing:32"))
    try:
        rows = corpus(90)
        train, dev = write_tsv(tmp_path / "train.tsv", rows[:70]), write_tsv(tmp_path / "dev.tsv", rows[70:])
        spec = TaskSpec("s", template, (Label("negative", " bad"), Label("positive", " good")))
        report = bench_task(engine, spec, train, dev, 60, 20, latency_rows=2, sweeps=("k",))
        names = [r.name for r in report.results]
        assert {"full", "paper", "knn-vote", "oracle"} <= set(names) and report.depth == engine.depth
        assert all(r.rows == 20 for r in report.results)
    finally:
        engine.close()
