"""The logit lens at every exit, and truncated forwards that run only the layers below the exit."""

from __future__ import annotations

import pytest
import torch

from raee_server.errors import InvalidInput
from raee_server.models.backbone import Backbone, CausalLMBackbone

from .tiny_models import FAMILIES, tiny_causal_lm, tiny_tokenizer

PROMPTS = [
    "what is the sentiment of the sentence ' a great movie ' ? the answer is",
    "boring",
    "the plot is a mess and the acting is awful , the answer is",
]


def make(family: str) -> Backbone:
    return CausalLMBackbone(tiny_causal_lm(family), tiny_tokenizer(), f"tiny-{family}")


def count_layers_run(bb: Backbone) -> list[int]:
    calls = [0]
    for layer in bb.layers:
        layer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))  # fires only when a layer completed
    return calls


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_last_exit_equals_the_models_own_logits(family: str) -> None:
    bb = make(family)
    head = bb.label_head(bb.label_token_ids([" negative", " positive", " good"]))
    for prompt in PROMPTS:  # one at a time: no padding involved in the reference
        enc = bb.tokenizer([prompt], return_tensors="pt")
        with torch.no_grad():
            full = bb.model(**enc).logits[0, -1, list(head.token_ids)]
        ours = bb.all_exit_logits([prompt], head)[0, -1]
        torch.testing.assert_close(ours, full.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batched_left_padded_rows_match_single_rows(family: str) -> None:
    bb = make(family)
    head = bb.label_head(bb.label_token_ids([" negative", " positive"]))
    batched = bb.all_exit_logits(PROMPTS, head)
    assert batched.shape == (len(PROMPTS), bb.depth + 1, 2)
    for i, prompt in enumerate(PROMPTS):
        torch.testing.assert_close(batched[i], bb.all_exit_logits([prompt], head)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["gemma3_text", "llama"])
def test_truncated_forward_runs_only_layers_below_the_exit(family: str) -> None:
    bb = make(family)
    head = bb.label_head(bb.label_token_ids([" negative", " positive"]))
    everything = bb.all_exit_logits(PROMPTS, head)
    calls = count_layers_run(bb)
    for exit_layer in range(bb.depth + 1):
        calls[0] = 0
        logits = bb.exit_logits(PROMPTS, head, exit_layer)
        assert calls[0] == exit_layer, f"exit {exit_layer} ran {calls[0]} layers"
        torch.testing.assert_close(logits, everything[:, exit_layer], rtol=1e-4, atol=1e-5)


def test_hooks_are_removed_after_a_truncated_forward(backbone: Backbone) -> None:
    head = backbone.label_head(backbone.label_token_ids([" negative", " positive"]))
    backbone.exit_logits(PROMPTS, head, 1)
    calls = count_layers_run(backbone)
    backbone.exit_logits(PROMPTS, head, backbone.depth)
    assert calls[0] == backbone.depth


def test_exit_layer_out_of_range_is_rejected(backbone: Backbone) -> None:
    head = backbone.label_head(backbone.label_token_ids([" negative", " positive"]))
    with pytest.raises(InvalidInput, match="exit layer 5 outside 0..4"):
        backbone.exit_logits(PROMPTS, head, 5)


def test_colliding_label_words_are_rejected(backbone: Backbone) -> None:
    # The word-level tokenizer splits " good !" into "good", "!": same first sub-token as " good".
    with pytest.raises(InvalidInput, match="share their first sub-token"):
        backbone.label_token_ids([" good", " good !"])


def test_layer_by_layer_forward_stops_where_the_rule_says(backbone: Backbone) -> None:
    head = backbone.label_head(backbone.label_token_ids([" negative", " positive"]))
    lens = backbone.all_exit_logits(PROMPTS[:1], head)[0]
    calls = count_layers_run(backbone)

    def until(last: int, stop: int | None) -> tuple[torch.Tensor, int]:  # the engine's use of walk_exits
        found: list[tuple[torch.Tensor, int]] = []

        def visit(layer: int, rows: list[int], features: torch.Tensor) -> list[int]:
            if layer in (last, stop):
                found.append((backbone.lens(features[0], head), layer))
                return rows
            return []

        backbone.walk_exits(PROMPTS[:1], last, visit)
        return found[0]

    for target in range(backbone.depth + 1):
        calls[0] = 0
        logits, exit_layer = until(backbone.depth, target)
        assert exit_layer == target == calls[0]
        torch.testing.assert_close(logits, lens[target], rtol=1e-4, atol=1e-5)
    calls[0] = 0
    _, exit_layer = until(2, None)
    assert exit_layer == 2 == calls[0]  # the bound holds when the rule never fires


def test_over_long_prompts_keep_their_end(backbone: Backbone) -> None:
    head = backbone.label_head(backbone.label_token_ids([" negative", " positive"]))
    short = "the answer is"
    backbone.max_tokens = 8
    long_prompt = "boring " * 50 + short
    # Truncated from the left: the last tokens (where the label word follows) are the ones kept.
    kept = backbone.tokenizer.convert_ids_to_tokens(backbone._inputs([long_prompt])["input_ids"][0])
    assert kept[-3:] == ["the", "answer", "is"] and len(kept) == 8
    assert backbone.all_exit_logits([long_prompt], head).shape == (1, backbone.depth + 1, 2)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rows_leave_the_batch_at_their_own_exit_with_unchanged_features(family: str) -> None:
    bb = make(family)
    everything = bb.all_exit_features(PROMPTS)  # [rows, exits, H], left-padded together
    leave_at = {0: 1, 1: 3, 2: bb.depth}
    seen: dict[tuple[int, int], torch.Tensor] = {}
    sizes: list[int] = []
    for layer in bb.layers:  # the batch each layer ran on
        layer.register_forward_hook(lambda _m, _a, out: sizes.append(int((out[0] if isinstance(out, tuple)
                                                                           else out).shape[0])))

    def visit(layer: int, rows: list[int], features: torch.Tensor) -> list[int]:
        for row, f in zip(rows, features):
            seen[(row, layer)] = f
        return [row for row in rows if leave_at[row] == layer]

    bb.walk_exits(PROMPTS, bb.depth, visit)
    assert sorted(seen) == sorted((row, layer) for row, last in leave_at.items() for layer in range(last + 1))
    for (row, layer), f in seen.items():
        torch.testing.assert_close(f, everything[row, layer], rtol=1e-4, atol=1e-5)
    # Layer i makes exit i + 1: it runs on the rows not done at exit i.
    assert sizes == [sum(1 for last in leave_at.values() if last > i) for i in range(bb.depth)]


def test_a_backbone_in_another_dtype_has_its_own_id_and_records(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """bfloat16 numbers are not float32's: a backbone loaded in another dtype has its own backbone id,
    so its records never mix with float32's, and a task built in float32 is refused by it."""
    from raee_server.core.engine import Engine
    from raee_server.errors import StoreMismatch
    from raee_server.models.loading import load_backbone
    from raee_server.settings import Settings
    from raee_server.types import TaskSpec

    from .conftest import SENTIMENT
    from .tiny_models import save_tiny_backbone

    model = save_tiny_backbone(tmp_path / "model")
    fp32 = load_backbone(str(model), tmp_path / "models")
    bf16 = load_backbone(str(model), tmp_path / "models", dtype="bfloat16")
    assert bf16.model_id == f"{fp32.model_id}@bfloat16" and "@" not in fp32.model_id
    base = Settings(data_dir=tmp_path / "data", backbone=str(model), encoder="hashing:32",
                    model_cache=tmp_path / "models")
    engine = Engine.open(base)
    engine.create_task(TaskSpec(SENTIMENT.name, SENTIMENT.template, SENTIMENT.labels))
    engine.close()
    other = Engine.open(base.model_copy(update={"dtype": "bfloat16"}))
    try:
        with pytest.raises(StoreMismatch, match="was built with backbone"):
            other.classify(SENTIMENT.name, ["a great movie"])
    finally:
        other.close()
