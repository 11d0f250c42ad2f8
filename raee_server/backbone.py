"""The backbone language model, read through the logit lens at every exit.

Exit l (0..L) is the hidden state of the last prompt token *entering* decoder
layer l (exit 0: the embedding output; exit L: the output of the last layer),
passed through the model's final norm and only the label-word rows of the LM
head. Reading exits with hooks on the model's own decoder layers keeps this
independent of each family's attention-mask and rotary details.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import InvalidInput

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _ExitReached(Exception):
    """Raised by the hook on the exit layer: stops the forward before that layer runs."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


def _hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output_hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@dataclass(frozen=True)
class LabelHead:
    """The LM-head rows of one task's label words (first sub-token of each)."""

    token_ids: tuple[int, ...]
    weight: torch.Tensor  # [n_labels, hidden]
    bias: torch.Tensor | None


class Backbone:
    """A Hugging Face causal LM whose decoder layers, final norm and LM head are reachable.

    Not thread-safe: exits are read with hooks on the shared modules, so one thread
    (the server's model worker) drives a Backbone.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, model_id: str, max_tokens: int = 512) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_tokens = max_tokens
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        if not all(hasattr(decoder, a) for a in ("layers", "norm")):
            raise InvalidInput(f"backbone {model_id!r}: cannot find decoder layers and final norm")
        self.decoder: nn.Module = decoder
        self.layers: nn.ModuleList = decoder.layers
        self.norm: nn.Module = decoder.norm
        self.lm_head: nn.Module = model.get_output_embeddings()
        self.softcap: float | None = getattr(model.config, "final_logit_softcapping", None)
        self.device = next(model.parameters()).device
        tokenizer.padding_side = "left"
        # A prompt over max_tokens loses its beginning, never its end: the label word follows the end.
        tokenizer.truncation_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._heads: dict[tuple[int, ...], LabelHead] = {}

    @property
    def depth(self) -> int:
        """Number of decoder layers L; exits are 0..L."""
        return len(self.layers)

    # -- label words -------------------------------------------------------

    def label_token_ids(self, words: Sequence[str]) -> tuple[int, ...]:
        """First sub-token of each label word; rejects words that collide on it."""
        ids: list[int] = []
        for word in words:
            tokens = self.tokenizer(word, add_special_tokens=False).input_ids
            if not tokens:
                raise InvalidInput(f"label word {word!r} produces no token")
            ids.append(tokens[0])
        seen: dict[int, str] = {}
        for word, tid in zip(words, ids):
            if tid in seen:
                shared = self.tokenizer.convert_ids_to_tokens(tid)
                raise InvalidInput(
                    f"label words {seen[tid]!r} and {word!r} share their first sub-token {shared!r}; "
                    "choose words that differ in their first token"
                )
            seen[tid] = word
        return tuple(ids)

    def label_head(self, token_ids: tuple[int, ...]) -> LabelHead:
        head = self._heads.get(token_ids)
        if head is None:
            index = torch.tensor(token_ids, device=self.device)
            weight = self.lm_head.weight.detach().index_select(0, index)
            bias = getattr(self.lm_head, "bias", None)
            head = LabelHead(token_ids, weight, None if bias is None else bias.detach().index_select(0, index))
            self._heads[token_ids] = head
        return head

    # -- forwards ----------------------------------------------------------

    def _inputs(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(prompts), return_tensors="pt", padding=True, truncation=True, max_length=self.max_tokens
        )
        mask = enc["attention_mask"]
        # Left padding: positions must count real tokens only, or padded rows would shift.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return {
            "input_ids": enc["input_ids"].to(self.device),
            "attention_mask": mask.to(self.device),
            "position_ids": position_ids.to(self.device),
        }

    def _project(self, hidden: torch.Tensor, head: LabelHead) -> torch.Tensor:
        """Final norm, then the label-word rows of the LM head: [..., hidden] -> [..., n_labels]."""
        logits = nn.functional.linear(self.norm(hidden), head.weight, head.bias).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.inference_mode()
    def all_exit_logits(self, prompts: Sequence[str], head: LabelHead) -> torch.Tensor:
        """Label-word logits at every exit in one full forward: [batch, L + 1, n_labels]."""
        states: list[torch.Tensor] = []

        def before_first(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            states.append(_hidden_of(args, kwargs)[:, -1, :])

        def after_layer(_m: nn.Module, _args: Any, output: Any) -> None:
            states.append(_output_hidden(output)[:, -1, :])

        handles = [self.layers[0].register_forward_pre_hook(before_first, with_kwargs=True)]
        handles += [layer.register_forward_hook(after_layer) for layer in self.layers]
        try:
            self.decoder(**self._inputs(prompts), use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return self._project(torch.stack(states, dim=1), head)

    @torch.inference_mode()
    def exit_logits(self, prompts: Sequence[str], head: LabelHead, exit_layer: int) -> torch.Tensor:
        """Label-word logits at one exit, running only decoder layers 0..exit_layer-1: [batch, n_labels]."""
        if not 0 <= exit_layer <= self.depth:
            raise InvalidInput(f"exit layer {exit_layer} outside 0..{self.depth}")
        with self._stop_before(exit_layer) as captured:
            try:
                self.decoder(**self._inputs(prompts), use_cache=False)
            except _ExitReached as stop:
                captured.append(stop.hidden)
        return self._project(captured[-1][:, -1, :], head)

    @torch.inference_mode()
    def pooled_hidden(self, texts: Sequence[str], exit_layer: int) -> torch.Tensor:
        """Mean over the real tokens of the hidden states entering layer `exit_layer`: [batch, hidden]."""
        inputs = self._inputs(texts)
        with self._stop_before(exit_layer) as captured:
            try:
                self.decoder(**inputs, use_cache=False)
            except _ExitReached as stop:
                captured.append(stop.hidden)
        mask = inputs["attention_mask"].unsqueeze(-1).to(captured[-1].dtype)
        return ((captured[-1] * mask).sum(1) / mask.sum(1).clamp(min=1)).float()

    @torch.inference_mode()
    def exit_logits_until(
        self, prompt: str, head: LabelHead, max_layer: int, stop: Callable[[int, np.ndarray], bool]
    ) -> tuple[torch.Tensor, int]:
        """Run one prompt layer by layer; stop at the first exit where `stop(layer, label probs)` holds,
        or at `max_layer`. Returns the label logits there and the exit. Layers past it never run."""
        if not 0 <= max_layer <= self.depth:
            raise InvalidInput(f"exit layer {max_layer} outside 0..{self.depth}")

        exit_at = [max_layer]

        def check(layer: int, hidden: torch.Tensor) -> None:
            logits = self._project(hidden[:, -1, :], head)
            if layer == max_layer or stop(layer, torch.softmax(logits[0], -1).numpy()):
                exit_at[0] = layer
                raise _ExitReached(hidden)

        handles = [self.layers[0].register_forward_pre_hook(
            lambda _m, args, kwargs: check(0, _hidden_of(args, kwargs)), with_kwargs=True)]
        handles += [
            layer.register_forward_hook(lambda _m, _a, out, i=i: check(i + 1, _output_hidden(out)))
            for i, layer in enumerate(self.layers[:max_layer])
        ]
        try:
            self.decoder(**self._inputs([prompt]), use_cache=False)
            raise RuntimeError("the forward ended without reaching its exit")  # unreachable
        except _ExitReached as stop_here:
            hidden = stop_here.hidden
        finally:
            for h in handles:
                h.remove()
        return self._project(hidden[:, -1, :], head)[0], exit_at[0]

    @contextmanager
    def _stop_before(self, exit_layer: int) -> Iterator[list[torch.Tensor]]:
        captured: list[torch.Tensor] = []
        if exit_layer < self.depth:

            def stop(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                raise _ExitReached(_hidden_of(args, kwargs))

            handle = self.layers[exit_layer].register_forward_pre_hook(stop, with_kwargs=True)
        else:

            def keep(_m: nn.Module, _args: Any, output: Any) -> None:
                captured.append(_output_hidden(output))

            handle = self.layers[-1].register_forward_hook(keep)
        try:
            yield captured
        finally:
            handle.remove()
