"""An encoder-decoder backbone (T5 style): exits at every encoder layer, then every decoder layer of
the first decoding step, as one walk of depth encoder + decoder layers."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import suppress
from typing import Any

import torch
from torch import nn

from raee_server.errors import InvalidInput
from raee_server.models.backbone import (
    MASK_SLOT,
    Backbone,
    Visit,
    _ExitReached,
    _hidden_of,
    _hooked,
    _output_hidden,
    _stop_before_layer,
)


class Seq2SeqBackbone(Backbone):
    """An encoder-decoder LM (T5, Flan-T5), read at the first decoding step, with 2 x D + 1 exits as
    the RAEE paper counts them (D: layers per stack):

    - exits 0..D sit inside the encoder: exit e runs e encoder layers over the input, applies the
      encoder's final norm, then the *whole* decoder for one step (one position attending to the
      input), whose last state gives the label logits;
    - exits D + d (d = 1..D) run the whole encoder and d decoder layers at the first step, read
      through the decoder's final norm and the LM head.

    Cost: an encoder layer processes every input token; a decoder layer at the first step processes
    one token (plus cross-attention over the input), so a decoder layer costs a small fraction of an
    encoder layer and an encoder exit still pays the (cheap) full decoder step.
    """

    family = "seq2seq"
    walks_in_one_pass = False  # its walk re-runs each exit from the input

    def __init__(self, model: nn.Module, tokenizer: Any, model_id: str, max_tokens: int = 512) -> None:
        super().__init__(model, tokenizer, model_id, max_tokens)
        self.encoder: nn.Module = model.get_encoder()
        self.decoder: nn.Module = model.get_decoder()
        self.encoder_layers: nn.ModuleList = self.encoder.block
        self.decoder_layers: nn.ModuleList = self.decoder.block
        self.layers = nn.ModuleList([*self.encoder_layers, *self.decoder_layers])  # for counting layers run
        self.scale = model.model_dim ** -0.5 if getattr(model.config, "scale_decoder_outputs", False) else 1.0
        self.start_id = model.config.decoder_start_token_id
        tokenizer.padding_side = "right"

    @property
    def depth(self) -> int:
        return len(self.encoder_layers) + len(self.decoder_layers)

    @property
    def encoder_depth(self) -> int:
        return len(self.encoder_layers)

    def check_template(self, template: str) -> None:
        if MASK_SLOT in template:
            raise InvalidInput(f"template: a {MASK_SLOT} slot is for masked-LM backbones; {self.model_id} is an "
                               "encoder-decoder model, whose first generated token is the label word")

    def _inputs(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=True,
                             max_length=self.max_tokens)
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def _transform(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder.final_layer_norm(hidden) * self.scale

    def _first_step(self, batch: int) -> torch.Tensor:
        return torch.full((batch, 1), self.start_id, dtype=torch.long, device=self.device)

    def _decode(self, encoded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The whole decoder for one step on (normed) encoder states: the last decoder state, pre-norm."""
        captured: list[torch.Tensor] = []
        handle = self.decoder_layers[-1].register_forward_hook(
            lambda _m, _a, out: captured.append(_output_hidden(out)[:, 0, :]))
        with _hooked([handle]):
            self.decoder(input_ids=self._first_step(encoded.shape[0]), encoder_hidden_states=encoded,
                         encoder_attention_mask=mask, use_cache=False)
        return captured[-1]

    def _encoder_states(self, inputs: dict[str, torch.Tensor], upto: int | None = None) -> list[torch.Tensor]:
        """Hidden states entering encoder layers 0..upto-1 and the last layer's output (all of them when
        upto is None); stops before layer `upto`."""
        states: list[torch.Tensor] = []
        handles = [self.encoder_layers[0].register_forward_pre_hook(
            lambda _m, args, kwargs: states.append(_hidden_of(args, kwargs)), with_kwargs=True)]
        handles += [layer.register_forward_hook(lambda _m, _a, out: states.append(_output_hidden(out)))
                    for layer in self.encoder_layers]
        if upto is not None and upto < self.encoder_depth:
            handles.append(_stop_before_layer(self.encoder_layers[upto]))
        with _hooked(handles), suppress(_ExitReached):
            self.encoder(**inputs)
        return states

    def _decoder_states(self, encoded: torch.Tensor, mask: torch.Tensor, upto: int) -> list[torch.Tensor]:
        """First-step states after decoder layers 0..upto-1 (running only those layers)."""
        states: list[torch.Tensor] = []
        handles = [layer.register_forward_hook(lambda _m, _a, out: states.append(_output_hidden(out)[:, 0, :]))
                   for layer in self.decoder_layers[:upto]]
        if upto < len(self.decoder_layers):
            handles.append(_stop_before_layer(self.decoder_layers[upto]))
        with _hooked(handles), suppress(_ExitReached):
            self.decoder(input_ids=self._first_step(encoded.shape[0]), encoder_hidden_states=encoded,
                         encoder_attention_mask=mask, use_cache=False)
        return states

    @torch.inference_mode()
    def all_exit_features(self, prompts: Sequence[str]) -> torch.Tensor:
        inputs = self._inputs(prompts)
        mask = inputs["attention_mask"]
        norm = self.encoder.final_layer_norm
        encoder_states = self._encoder_states(inputs)
        finals = [self._decode(norm(h), mask) for h in encoder_states]  # exits 0..D
        decoder_states = self._decoder_states(norm(encoder_states[-1]), mask, len(self.decoder_layers))
        return self._transform(torch.stack(finals + decoder_states, dim=1))

    @torch.inference_mode()
    def exit_features(self, prompts: Sequence[str], exit_layer: int) -> torch.Tensor:
        if not 0 <= exit_layer <= self.depth:
            raise InvalidInput(f"exit layer {exit_layer} outside 0..{self.depth}")
        inputs = self._inputs(prompts)
        mask = inputs["attention_mask"]
        norm = self.encoder.final_layer_norm
        if exit_layer <= self.encoder_depth:
            states = self._encoder_states(inputs, upto=exit_layer)
            return self._transform(self._decode(norm(states[exit_layer]), mask))
        encoded = norm(self._encoder_states(inputs)[-1])
        return self._transform(self._decoder_states(encoded, mask, exit_layer - self.encoder_depth)[-1])

    @torch.inference_mode()
    def walk_exits(self, prompts: Sequence[str], last_layer: int, visit: Visit) -> None:
        """Exit by exit (each exit as exit_features runs it: the encoder-decoder split has no single
        pass); rows that are done leave the batch."""
        running = list(range(len(prompts)))
        for layer in range(last_layer + 1):
            done = set(visit(layer, running, self.exit_features([prompts[i] for i in running], layer)))
            running = [i for i in running if i not in done]
            if not running:
                return

    @torch.inference_mode()
    def pooled_hidden(self, texts: Sequence[str], exit_layer: int) -> torch.Tensor:
        inputs = self._inputs(texts)
        hidden = self._encoder_states(inputs, upto=min(exit_layer, self.encoder_depth))[
            min(exit_layer, self.encoder_depth)]
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float()
