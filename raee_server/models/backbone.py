"""The backbone language model, read through the logit lens at every exit.

Exit l (0..L) is the hidden state of the last prompt token *entering* decoder
layer l (exit 0: the embedding output; exit L: the output of the last layer),
passed through the model's final norm and only the label-word rows of the LM
head. Reading exits with hooks on the model's own decoder layers keeps this
independent of each family's attention-mask and rotary details.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raee_server.errors import InvalidInput

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# (exit, the rows still running, their exit features [rows, H]) -> the rows that are done there
Visit = Callable[[int, list[int], torch.Tensor], Collection[int]]


class _ExitReached(Exception):
    """Raised by the hook on the exit layer: stops the forward before that layer runs."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


def _hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output_hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _stop_before_layer(layer: nn.Module) -> Any:
    """Hook `layer` so that a forward stops as it enters it, carrying the hidden state entering it.
    Returns the hook's handle: remove it when done."""

    def stop(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _ExitReached(_hidden_of(args, kwargs))

    return layer.register_forward_pre_hook(stop, with_kwargs=True)


@contextmanager
def _hooked(handles: list[Any]) -> Iterator[None]:
    """Remove these hooks however the forward inside ends (an early stop is an exception)."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass(frozen=True)
class LabelHead:
    """The LM-head rows of one task's label words (first sub-token of each)."""

    token_ids: tuple[int, ...]
    weight: torch.Tensor  # [n_labels, hidden]
    bias: torch.Tensor | None


class Backbone:
    """What the engine needs of any backbone family; subclasses say where the layers, the readout
    position and the head are.

    Not thread-safe: exits are read with hooks on the shared modules, so one thread
    (the server's model worker) drives a Backbone.
    """

    family = "abstract"
    # walk_exits runs the layers once for the whole batch; rows with known exits share that pass
    walks_in_one_pass = True
    layers: nn.ModuleList
    lm_head: nn.Module  # the output layer whose rows are the label words

    def __init__(self, model: nn.Module, tokenizer: Any, model_id: str, max_tokens: int = 512) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.max_tokens = max_tokens
        self.lm_head = model.get_output_embeddings()
        self.device = next(model.parameters()).device
        # A prompt over max_tokens loses its beginning, never its end: the label word (or the
        # mask slot) sits at the end of every template.
        tokenizer.truncation_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._heads: dict[tuple[int, ...], LabelHead] = {}

    # -- what a family defines -------------------------------------------------

    def check_template(self, template: str) -> None:
        """Raise InvalidInput when a task template does not suit this family."""

    def format_prompt(self, prompt: str) -> str:
        return prompt

    def _inputs(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _readout(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per row, the position whose hidden state is read: [batch]."""
        raise NotImplementedError

    def _run(self, inputs: dict[str, torch.Tensor]) -> None:
        """Run the layer stack (the hooks collect what is needed)."""
        raise NotImplementedError

    def _transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the family applies before the output layer (final norm, LM-head transform)."""
        raise NotImplementedError

    def _pick(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]

    @property
    def depth(self) -> int:
        """Number of decoder layers L; exits are 0..L."""
        return len(self.layers)

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Tokens per prompt as the model sees it (after truncation), without padding."""
        encoded = self.tokenizer(list(prompts), truncation=True, max_length=self.max_tokens, padding=False)
        return [len(ids) for ids in encoded["input_ids"]]

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
            # float32 whatever the backbone's dtype: the lens is a few rows, and a label's score is read
            # off small differences between them (bfloat16 keeps 8 bits of mantissa)
            weight = self.lm_head.weight.detach().index_select(0, index).float()
            bias = getattr(self.lm_head, "bias", None)
            head = LabelHead(token_ids, weight, None if bias is None else bias.detach().index_select(0, index).float())
            self._heads[token_ids] = head
        return head

    # -- forwards ----------------------------------------------------------

    def lens(self, features: torch.Tensor, head: LabelHead) -> torch.Tensor:
        """The logit lens on exit features: the label-word rows of the output layer, [..., H] -> [..., C]."""
        return nn.functional.linear(features.float(), head.weight, head.bias)

    def _project(self, hidden: torch.Tensor, head: LabelHead) -> torch.Tensor:
        """The family's transform, then the lens: [..., H] -> [..., C]."""
        return self.lens(self._transform(hidden), head)

    @torch.inference_mode()
    def all_exit_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """The readout position's hidden state at every exit, through the family's transform (the
        vector the lens reads; exit heads are fit on it), in one full forward: [batch, L + 1, H]."""
        states: list[torch.Tensor] = []
        inputs = self._inputs(prompts)
        at = self._readout(inputs)

        def before_first(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            states.append(self._pick(_hidden_of(args, kwargs), at))

        def after_layer(_m: nn.Module, _args: Any, output: Any) -> None:
            states.append(self._pick(_output_hidden(output), at))

        handles = [self.layers[0].register_forward_pre_hook(before_first, with_kwargs=True)]
        handles += [layer.register_forward_hook(after_layer) for layer in self.layers]
        with _hooked(handles):
            self._run(inputs)
        return self._transform(torch.stack(states, dim=1))

    def all_exit_logits(self, prompts: Sequence[str], head: LabelHead) -> torch.Tensor:
        """Label-word logits at every exit in one full forward: [batch, L + 1, n_labels]."""
        return self.lens(self.all_exit_features(prompts), head)

    @torch.inference_mode()
    def exit_features(self, prompts: Sequence[str], exit_layer: int) -> torch.Tensor:
        """The exit features at one exit, running only layers 0..exit_layer-1: [batch, H]."""
        if not 0 <= exit_layer <= self.depth:
            raise InvalidInput(f"exit layer {exit_layer} outside 0..{self.depth}")
        inputs = self._inputs(prompts)
        hidden = self._hidden_entering(inputs, exit_layer)
        return self._transform(self._pick(hidden, self._readout(inputs)))

    def exit_logits(self, prompts: Sequence[str], head: LabelHead, exit_layer: int) -> torch.Tensor:
        """Label-word logits at one exit, running only layers 0..exit_layer-1: [batch, n_labels]."""
        return self.lens(self.exit_features(prompts, exit_layer), head)

    @torch.inference_mode()
    def walk_exits(self, prompts: Sequence[str], last_layer: int, visit: Visit) -> None:
        """One batched forward, exit by exit, in which rows leave the batch as they finish.

        `visit(layer, rows, features)` sees the exit features [len(rows), H] of the rows still
        running (`rows`: their indices in `prompts`) at exits 0..last_layer in order, and returns
        the rows that are done there. Those rows leave the batch: later layers run on the others
        only (their attention masks and position embeddings are cut to match), and the forward
        stops once none is left. A row's features never depend on the other rows in the batch,
        so leaving changes no answer; it saves the layers the row no longer needs."""
        if not 0 <= last_layer <= self.depth:
            raise InvalidInput(f"exit layer {last_layer} outside 0..{self.depth}")
        inputs = self._inputs(prompts)
        at = self._readout(inputs)
        batch = len(prompts)
        running = torch.arange(batch)

        def check(layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
            """Visit an exit; the hidden states of the rows that go on (None: all of them)."""
            nonlocal running
            done = visit(layer, running.tolist(), self._transform(self._pick(hidden, at[running])))
            if layer == last_layer:
                raise _ExitReached(hidden)
            if not done:
                return None
            keep = ~torch.isin(running, torch.as_tensor(sorted(done), dtype=running.dtype))
            if not keep.any():
                raise _ExitReached(hidden)
            running = running[keep]
            return hidden[keep]

        def rows_only(value: Any) -> Any:
            """A layer's per-row inputs (masks, position embeddings) cut to the running rows."""
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
                return value[running]
            if isinstance(value, tuple):
                return tuple(rows_only(v) for v in value)
            return value

        def enter(index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
            hidden = _hidden_of(args, kwargs)
            if index == 0 and (kept := check(0, hidden)) is not None:
                hidden = kept
            if len(running) == batch:
                return None
            kwargs = {name: rows_only(v) for name, v in kwargs.items() if name != "hidden_states"}
            return (hidden, *(rows_only(a) for a in args[1:])), kwargs

        def leave(index: int, output: Any) -> Any:
            kept = check(index + 1, _output_hidden(output))
            if kept is None:
                return None
            return (kept, *output[1:]) if isinstance(output, tuple) else kept

        handles = [layer.register_forward_pre_hook(lambda _m, a, kw, i=i: enter(i, a, kw), with_kwargs=True)
                   for i, layer in enumerate(self.layers[: last_layer + 1])]
        handles += [layer.register_forward_hook(lambda _m, _a, out, i=i: leave(i, out))
                    for i, layer in enumerate(self.layers[:last_layer])]
        with _hooked(handles):
            try:
                self._run(inputs)
            except _ExitReached:
                pass

    @torch.inference_mode()
    def pooled_hidden(self, texts: Sequence[str], exit_layer: int) -> torch.Tensor:
        """Mean over the real tokens of the hidden states entering layer `exit_layer`: [batch, hidden]."""
        inputs = self._inputs(texts)
        hidden = self._hidden_entering(inputs, exit_layer)
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float()

    def _hidden_entering(self, inputs: dict[str, torch.Tensor], exit_layer: int) -> torch.Tensor:
        """All positions' hidden states entering layer `exit_layer` (the last output at depth);
        layers from `exit_layer` on never run."""
        with self._stop_before(exit_layer) as captured:
            try:
                self._run(inputs)
            except _ExitReached as stop:
                captured.append(stop.hidden)
        return captured[-1]

    @contextmanager
    def _stop_before(self, exit_layer: int) -> Iterator[list[torch.Tensor]]:
        captured: list[torch.Tensor] = []
        if exit_layer < self.depth:
            handle = _stop_before_layer(self.layers[exit_layer])
        else:

            def keep(_m: nn.Module, _args: Any, output: Any) -> None:
                captured.append(_output_hidden(output))

            handle = self.layers[-1].register_forward_hook(keep)
        with _hooked([handle]):
            yield captured


class CausalLMBackbone(Backbone):
    """A decoder-only LM (Gemma 3, Llama, Qwen2, Mistral ...): decoder layers, final norm, LM head;
    read at the last prompt token, where the label word would come next."""

    family = "causal"

    def __init__(self, model: nn.Module, tokenizer: Any, model_id: str, max_tokens: int = 512) -> None:
        super().__init__(model, tokenizer, model_id, max_tokens)
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        if not all(hasattr(decoder, a) for a in ("layers", "norm")):
            raise InvalidInput(f"backbone {model_id!r}: cannot find decoder layers and final norm")
        self.decoder: nn.Module = decoder
        self.layers = decoder.layers
        self.norm: nn.Module = decoder.norm
        self.softcap: float | None = getattr(model.config, "final_logit_softcapping", None)
        tokenizer.padding_side = "left"  # the readout position is -1 in every row

    def check_template(self, template: str) -> None:
        if MASK_SLOT in template:
            raise InvalidInput(f"template: a {MASK_SLOT} slot is for masked-LM backbones; {self.model_id} is a "
                               "causal LM, whose label word follows the end of the prompt")

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

    def _readout(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        batch, length = inputs["input_ids"].shape
        return torch.full((batch,), length - 1, device=self.device)

    def _run(self, inputs: dict[str, torch.Tensor]) -> None:
        self.decoder(**inputs, use_cache=False)

    def _transform(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)

    def _project(self, hidden: torch.Tensor, head: LabelHead) -> torch.Tensor:
        logits = super()._project(hidden, head)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


MASK_SLOT = "{mask}"


class MaskedLMBackbone(Backbone):
    """A masked LM (BERT- or RoBERTa-style `...ForMaskedLM`): the template holds a {mask}
    slot; exits are read there from every encoder layer through the model's own LM-head transform
    (dense, activation, layer norm), then the label-word rows of the decoder, as the RAEE paper's
    encoder setting does."""

    family = "masked"

    def __init__(self, model: nn.Module, tokenizer: Any, model_id: str, max_tokens: int = 512) -> None:
        super().__init__(model, tokenizer, model_id, max_tokens)
        base = model.base_model
        if not hasattr(base, "encoder") or not hasattr(base.encoder, "layer"):
            raise InvalidInput(f"backbone {model_id!r}: cannot find the encoder layers")
        if tokenizer.mask_token_id is None:
            raise InvalidInput(f"backbone {model_id!r}: its tokenizer has no mask token")
        self.encoder_model: nn.Module = base
        self.layers = base.encoder.layer
        if hasattr(model, "lm_head") and hasattr(model.lm_head, "dense"):  # RoBERTa style
            head = model.lm_head
            act = nn.functional.gelu
            self._head_transform = lambda h: head.layer_norm(act(head.dense(h)))
        elif hasattr(model, "cls"):  # BERT style
            self._head_transform = model.cls.predictions.transform
        else:
            raise InvalidInput(f"backbone {model_id!r}: cannot find the masked-LM head transform")
        tokenizer.padding_side = "right"

    def check_template(self, template: str) -> None:
        if template.count(MASK_SLOT) != 1:
            raise InvalidInput(f"template: a masked-LM backbone ({self.model_id}) needs exactly one {MASK_SLOT} "
                               f"slot where the label word goes, e.g. '{{text}} It was {MASK_SLOT}.'")

    def format_prompt(self, prompt: str) -> str:
        return prompt.replace(MASK_SLOT, self.tokenizer.mask_token)

    def _inputs(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(prompts), return_tensors="pt", padding=True, truncation=True, max_length=self.max_tokens
        )
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def _readout(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        is_mask = inputs["input_ids"] == self.tokenizer.mask_token_id
        if not bool(is_mask.any(-1).all()):
            raise InvalidInput(f"a prompt has no {self.tokenizer.mask_token} token (cut by the token limit?)")
        return is_mask.int().argmax(-1)

    def _run(self, inputs: dict[str, torch.Tensor]) -> None:
        self.encoder_model(**inputs)

    def _transform(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._head_transform(hidden)
