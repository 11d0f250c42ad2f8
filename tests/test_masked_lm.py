"""Masked-LM backbones (BERT, RoBERTa): exits read at the mask slot through the model's own LM-head
transform, truncation, template checks, and the whole ingest/classify/bench path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raee_server.errors import InvalidInput
from raee_server.models.backbone import CausalLMBackbone, MaskedLMBackbone

from .conftest import admin_cli, write_tsv
from .test_concurrent_writers import corpus
from .tiny_models import MASKED_FAMILIES, save_tiny_masked_lm, tiny_causal_lm, tiny_masked_lm, tiny_tokenizer

TEMPLATE = "{text} . it was {mask} ."
TEXTS = ["a great movie", "the plot is a boring mess and the acting is awful", "fun"]


def make(family: str) -> MaskedLMBackbone:
    return MaskedLMBackbone(tiny_masked_lm(family), tiny_tokenizer(), f"tiny-{family}")


def prompts(bb: MaskedLMBackbone) -> list[str]:
    return [bb.format_prompt(TEMPLATE.replace("{text}", t)) for t in TEXTS]


@pytest.mark.parametrize("family", MASKED_FAMILIES)
def test_last_exit_is_the_models_own_mask_prediction(family: str) -> None:
    bb = make(family)
    head = bb.label_head(bb.label_token_ids([" good", " bad", " fine"]))
    lens = bb.all_exit_logits(prompts(bb), head)
    assert lens.shape == (3, bb.depth + 1, 3)
    for i, prompt in enumerate(prompts(bb)):
        enc = bb.tokenizer([prompt], return_tensors="pt")
        at = int((enc["input_ids"][0] == bb.tokenizer.mask_token_id).nonzero()[0, 0])
        with torch.no_grad():
            own = bb.model(**enc).logits[0, at, list(head.token_ids)]
        torch.testing.assert_close(lens[i, -1], own, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lens[i], bb.all_exit_logits([prompt], head)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", MASKED_FAMILIES)
def test_truncated_forward_runs_only_the_layers_below_the_exit(family: str) -> None:
    bb = make(family)
    head = bb.label_head(bb.label_token_ids([" good", " bad"]))
    lens = bb.all_exit_logits(prompts(bb), head)
    ran = [0]
    for layer in bb.layers:
        layer.register_forward_hook(lambda *_: ran.__setitem__(0, ran[0] + 1))
    for exit_layer in range(bb.depth + 1):
        ran[0] = 0
        torch.testing.assert_close(bb.exit_logits(prompts(bb), head, exit_layer), lens[:, exit_layer],
                                   rtol=1e-4, atol=1e-5)
        assert ran[0] == exit_layer


def test_templates_are_checked_against_the_family() -> None:
    with pytest.raises(InvalidInput, match="needs exactly one {mask} slot"):
        make("roberta").check_template("{text} It was good.")
    with pytest.raises(InvalidInput, match="is for masked-LM backbones"):
        CausalLMBackbone(tiny_causal_lm(), tiny_tokenizer(), "tiny").check_template("{text} It was {mask}.")
    with pytest.raises(InvalidInput, match="has no <mask> token"):
        bb = make("bert")
        bb.exit_logits(["no slot here"], bb.label_head(bb.label_token_ids([" good", " bad"])), 1)


@pytest.mark.parametrize("family", MASKED_FAMILIES)
def test_ingest_classify_and_bench_on_a_masked_lm(family: str, tmp_path: Path) -> None:
    model = save_tiny_masked_lm(tmp_path / f"tiny-{family}", family)
    run = admin_cli(tmp_path / "data", model)

    bad = run("task", "create", "s", "--template", "{text} it was", "--label", "negative= bad",
              "--label", "positive= good", code=3)
    assert "needs exactly one {mask} slot" in bad
    run("task", "create", "s", "--template", TEMPLATE, "--label", "negative= bad", "--label", "positive= good")
    rows = corpus(60)
    data = write_tsv(tmp_path / "train.tsv", rows[:50])
    assert "added 50" in run("ingest", "--task", "s", str(data))
    out = run("classify", "--task", "s", "--json", "a great movie")
    answer = json.loads(out.strip().splitlines()[-1])[0]
    assert answer["depth"] == 3 and 0 <= answer["exit_layer"] <= 3
    report = run("eval", "--task", "s", str(write_tsv(tmp_path / "dev.tsv", rows[50:])))
    assert "auto=" in report and "knn-vote" in report  # eval measures auto (the default) beside the baselines


@pytest.mark.parametrize("family", MASKED_FAMILIES)
def test_rows_leave_the_batch_with_the_features_they_would_have_had(family: str) -> None:
    bb = make(family)
    everything = bb.all_exit_features(prompts(bb))
    leave_at = {0: 0, 1: 2, 2: bb.depth}
    seen: dict[tuple[int, int], torch.Tensor] = {}

    def visit(layer: int, rows: list[int], features: torch.Tensor) -> list[int]:
        seen.update({(row, layer): f for row, f in zip(rows, features)})
        return [row for row in rows if leave_at[row] == layer]

    bb.walk_exits(prompts(bb), bb.depth, visit)
    assert sorted(seen) == sorted((row, layer) for row, last in leave_at.items() for layer in range(last + 1))
    for (row, layer), f in seen.items():
        torch.testing.assert_close(f, everything[row, layer], rtol=1e-4, atol=1e-5)
