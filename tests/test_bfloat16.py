"""bfloat16 on the CPU: refused where the processor would only emulate it; where it runs, a row's
answers do not depend on the rows that share its batch.

The numbers here run on any CPU (torch emulates bfloat16 where it has no native units): the
tolerance is bfloat16's own, not a speed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raee_server.core.engine import Engine
from raee_server.errors import InvalidInput
from raee_server.models import hardware
from raee_server.models.backbone import Backbone, CausalLMBackbone
from raee_server.models.loading import load_backbone
from raee_server.settings import Settings

from .tiny_models import FAMILIES, save_tiny_backbone, tiny_causal_lm, tiny_tokenizer

ROWS = [
    "what is the sentiment of the sentence ' a great movie ' ? the answer is",
    "boring",
    "the plot is a mess and the acting is awful , the answer is",
    "a film that is neither good nor bad , but long , very long , too long and then some more , the answer is",
]
# bfloat16 keeps 8 bits of mantissa: one rounding step is 2^-8 of a value. Another batch can change
# the kernels' summation order, so a row's numbers may move by a few steps of their scale (an exit's
# largest feature; the row's largest label logit). Measured on the tiny models: at most 1.0 % (features),
# 1.2 % (logits) and 0.0004 (label probabilities). Allowed: 2^-5 of the scale, and 2^-8 of probability.
TOLERANCE, PROBABILITY = 2**-5, 2**-8


def assert_near(got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor) -> None:
    """|got - want| <= TOLERANCE x scale."""
    worst = float(((got.float() - want.float()).abs() / scale.clamp_min(1e-6)).max())
    assert worst <= TOLERANCE, f"{worst:.4f} of the scale apart (allowed {TOLERANCE})"


@pytest.fixture
def no_bfloat16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"fpu", "avx", "avx2", "fma"}))


def test_the_probe_reads_this_machines_flags() -> None:
    flags = hardware.cpu_flags()
    assert hardware.bfloat16_units() == [u for u in hardware.BFLOAT16_UNITS if u in flags]
    if Path("/proc/cpuinfo").exists():
        assert "fpu" in flags or "fp" in flags or flags  # a Linux x86 or ARM machine names its features


def test_bfloat16_is_a_problem_only_on_a_cpu_without_its_units(monkeypatch: pytest.MonkeyPatch,
                                                               no_bfloat16_units: None) -> None:
    problem = hardware.dtype_problem("cpu", "bfloat16")
    assert problem is not None and "AVX512-BF16 or AMX" in problem and "RAEE_DTYPE=float32" in problem
    assert hardware.dtype_problem("cpu", "float32") is None
    assert hardware.dtype_problem("cuda", "bfloat16") is None  # a GPU's own business
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert hardware.dtype_problem("cpu", "bfloat16") is None


def test_a_server_refuses_bfloat16_where_it_would_be_emulated_before_loading_anything(
        tmp_path: Path, no_bfloat16_units: None) -> None:
    settings = Settings(data_dir=tmp_path / "data", backbone=str(tmp_path / "no-such-model"), encoder="hashing:32",
                        dtype="bfloat16")
    with pytest.raises(InvalidInput, match="no native bfloat16 units") as refused:
        Engine.open_for_serving(settings)  # the missing model is never reached
    assert refused.value.field == "dtype"


def test_a_server_process_says_so_at_start_and_exits(tmp_path: Path, no_bfloat16_units: None) -> None:
    """Through the real start path (RaeeServer loading in the background): not SERVING slowly, a
    clear error and a failed start."""
    import asyncio

    from raee_server.serving.server import RaeeServer

    model = save_tiny_backbone(tmp_path / "model")
    settings = Settings(data_dir=tmp_path / "data", backbone=str(model), encoder="hashing:32", dtype="bfloat16",
                        address="127.0.0.1:0", http_address="", metrics_port=-1, model_cache=tmp_path / "models")

    async def scenario() -> BaseException | None:
        server = RaeeServer(settings)
        await server.start()
        await asyncio.wait_for(server.failed.wait(), 120)
        await server.stop(0)
        return server.load_error

    error = asyncio.run(scenario())
    assert isinstance(error, InvalidInput) and "bfloat16" in str(error)


def bf16(family: str) -> Backbone:
    """The tiny model in bfloat16, as load_backbone(dtype="bfloat16") makes it (loaded in that dtype)."""
    return CausalLMBackbone(tiny_causal_lm(family).to(torch.bfloat16), tiny_tokenizer(), f"tiny-{family}@bfloat16")


def test_a_backbone_loaded_in_bfloat16_computes_in_it_and_reads_the_lens_in_float32(tmp_path: Path) -> None:
    bb = load_backbone(str(save_tiny_backbone(tmp_path / "model")), tmp_path / "models", dtype="bfloat16")
    assert bb.model_id.endswith("@bfloat16") and next(bb.model.parameters()).dtype == torch.bfloat16
    head = bb.label_head(bb.label_token_ids([" negative", " positive"]))
    assert head.weight.dtype == torch.float32 and bb.all_exit_logits(ROWS, head).dtype == torch.float32


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_rows_bfloat16_exits_do_not_depend_on_who_shares_its_batch(family: str) -> None:
    """Each row alone, and inside batches of other rows of other lengths (so other padding): the same
    exit features and label logits at every exit, within bfloat16's tolerance."""
    bb = bf16(family)
    head = bb.label_head(bb.label_token_ids([" negative", " positive"]))
    alone = {row: (bb.all_exit_features([row])[0], bb.all_exit_logits([row], head)[0]) for row in ROWS}
    for batch in (ROWS, ROWS[::-1], [ROWS[0], ROWS[3]], [ROWS[1], ROWS[1], ROWS[2]]):
        features, logits = bb.all_exit_features(batch), bb.all_exit_logits(batch, head)
        for i, row in enumerate(batch):
            want_features, want_logits = alone[row]
            assert_near(features[i], want_features, want_features.float().abs().amax(-1, keepdim=True))
            assert_near(logits[i], want_logits, want_logits.abs().max())
            assert float((logits[i].softmax(-1) - want_logits.softmax(-1)).abs().max()) <= PROBABILITY
    # A truncated forward to exit e gives what the full forward gives there.
    for exit_layer in (0, 1, bb.depth):
        full = bb.all_exit_logits(ROWS, head)
        assert_near(bb.exit_logits(ROWS, head, exit_layer), full[:, exit_layer], full.abs().amax((1, 2))[:, None])
