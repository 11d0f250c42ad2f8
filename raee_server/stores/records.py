"""Exit records: what the database stores for each labelled example."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field

import numpy as np

# Fixed namespace: point ids must be the same in every process and on every machine.
_ID_NAMESPACE = uuid.UUID("6f1d2a8e-3c4b-5e7f-9a0b-1c2d3e4f5a6b")


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_record_id(name: str) -> bool:
    """Could be a record id (a uuid in its canonical form): other strings name no record."""
    try:
        return str(uuid.UUID(name)) == name
    except ValueError:
        return False


def record_id(task: str, text: str) -> str:
    """Deterministic point id (uuid5 of task and text hash): re-ingesting a text changes nothing."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{task}\x00{text_hash(text)}"))


@dataclass(frozen=True)
class LayerResult:
    layer: int
    predicted: int  # label index
    probability: float  # softmax over label words of the predicted label
    gold_probability: float  # softmax probability of the gold label
    correct: bool


@dataclass(frozen=True)
class StoredFeatures:
    """Exit features as a feature row holds them (raee_server.stores.codec): copied between tasks and
    deployments as they are, never decoded and encoded again."""

    codec: int  # 0: raw float16; 1: the task's codec
    exits: int
    dim: int  # of the raw features
    data: bytes


@dataclass(frozen=True)
class ExitRecord:
    id: str
    task: str
    text: str
    label: str
    label_index: int
    layers: tuple[LayerResult, ...]
    # The readout features at every exit, [L + 1, H] float16 (what exit heads are fit on); None when
    # the record was made without them (records from before exit heads: `raee-admin backfill-features`).
    # Or, copied from another store, the stored row itself (that store's codec must come along).
    features: np.ndarray | StoredFeatures | None = field(default=None, compare=False, repr=False)

    @property
    def exits(self) -> tuple[tuple[int, float], ...]:
        """(layer, p) for the layers whose prediction equals the gold label (may be empty)."""
        return tuple((r.layer, r.probability) for r in self.layers if r.correct)

    def payload(self) -> dict[str, object]:
        """What the hot path needs, carried in the vector store's point payload."""
        return {
            "task": self.task,
            "label": self.label,
            "exit_layers": [layer for layer, _ in self.exits],
            "exit_probs": [round(p, 6) for _, p in self.exits],
        }


def to_features(features: np.ndarray) -> np.ndarray:
    """Exit features as stored: float16, clipped to its range (a large activation must not become inf)."""
    return np.clip(features, -65000.0, 65000.0).astype(np.float16)


def layer_results(logits: np.ndarray, gold: int) -> tuple[LayerResult, ...]:
    """Per-exit prediction, its softmax probability over the label words, and correctness.

    logits: [L + 1, n_labels] label-word logits of one example.
    """
    shifted = logits - logits.max(axis=-1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=-1, keepdims=True)
    predicted = probs.argmax(axis=-1)
    return tuple(
        LayerResult(
            layer=layer,
            predicted=int(predicted[layer]),
            probability=float(probs[layer, predicted[layer]]),
            gold_probability=float(probs[layer, gold]),
            correct=bool(predicted[layer] == gold),
        )
        for layer in range(logits.shape[0])
    )
