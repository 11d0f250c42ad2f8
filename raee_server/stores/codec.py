"""Compact exit features: what the heads need of a record's [L + 1, H] exit features, in under 3 KB.

A record's exit features are float16 [19, 640] on Gemma 3 270M: 24,320 bytes, 24 GB per million
records. The heads are linear, so they need only the directions in which the features vary: per
task and exit, a principal-component basis learned once from the task's first records keeps the top
`DIM` whitened coordinates, stored as int8 with one float16 scale per exit (19 x (152 + 2) = 2,926
bytes per record). The heads fit on these coordinates and are then folded back to the raw space
(`ExitHeads.in_raw_space`), so serving applies them to live features unchanged. Chosen by measurement
(docs/results.md, "Compact exit features").

A stored feature row says how it is encoded: RAW float16, or CODED by the task's codec (one per task,
learned once). Readers project raw rows on the fly, so records written before the codec existed, or
while it was being learned, are never lost; `MetadataStore.compact_features` encodes them in place.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DIM = 152  # coordinates kept per exit: 19 x (152 + 2) = 2,926 bytes a record, the most under 3,000
LEARN_ROWS = 1000  # a task's codec is learned once it has this many records with raw features
RAW, CODED = 0, 1  # what a stored feature row holds: raw float16, or the task's codes


@dataclass(frozen=True)
class FeatureMatrix:
    """[N, E, d] features as a fit holds them: int8 codes with a float16 scale per row and exit (the
    stored size, under 3 KB a record, in memory too), or a plain float array (raw features, tests).
    `rows` turns the rows a step needs into float32, a chunk at a time."""

    values: np.ndarray  # [N, E, d]: int8 codes, or float features
    scales: np.ndarray | None = None  # [N, E] float16, with codes

    def __len__(self) -> int:
        return len(self.values)

    @property
    def shape(self) -> tuple[int, int, int]:
        n, e, d = self.values.shape
        return int(n), int(e), int(d)

    def exit_major(self, index: np.ndarray) -> np.ndarray:
        """[E, len(index), d] float32 (the layout the fit multiplies in), made in one buffer."""
        x = np.ascontiguousarray(self.values[index].transpose(1, 0, 2)).astype(np.float32)
        if self.scales is not None:
            x *= self.scales[index].T[:, :, None].astype(np.float32)
        return x

    def rows(self, index: np.ndarray) -> np.ndarray:
        """[len(index), E, d] float32."""
        return self.exit_major(index).transpose(1, 0, 2)

    def empty(self, n: int) -> FeatureMatrix:
        """n rows of this matrix's kind, to fill with `put`."""
        _, e, d = self.shape
        return FeatureMatrix(np.zeros((n, e, d), dtype=self.values.dtype),
                             None if self.scales is None else np.zeros((n, e), dtype=self.scales.dtype))

    def put(self, at: int, part: FeatureMatrix) -> None:
        self.values[at : at + len(part)] = part.values
        if self.scales is not None and part.scales is not None:
            self.scales[at : at + len(part)] = part.scales

    def head(self, n: int) -> FeatureMatrix:
        return FeatureMatrix(self.values[:n], None if self.scales is None else self.scales[:n])

    @staticmethod
    def stack(parts: Sequence[FeatureMatrix]) -> FeatureMatrix:
        coded = [p.scales is not None for p in parts]
        if any(coded) and not all(coded):
            raise ValueError("codes and float features do not stack")
        return FeatureMatrix(np.concatenate([p.values for p in parts]),
                             np.concatenate([p.scales for p in parts if p.scales is not None]) if all(coded) else None)


@dataclass(frozen=True)
class FeatureCodec:
    """One task's codec: per exit, the mean [E, H] and a whitened principal basis [E, H, d]."""

    mean: np.ndarray  # [E, H] float32
    basis: np.ndarray  # [E, H, d] float32: principal directions divided by their standard deviation

    @property
    def exits(self) -> int:
        return int(self.basis.shape[0])

    @property
    def dim(self) -> int:
        return int(self.basis.shape[2])

    @property
    def row_bytes(self) -> int:
        return self.exits * (self.dim + 2)

    def project(self, features: np.ndarray) -> np.ndarray:
        """[N, E, H] raw features -> [N, E, d] float32 whitened coordinates."""
        x = features.astype(np.float32) - self.mean
        return np.einsum("neh,ehd->ned", x, self.basis)

    def quantise(self, features: np.ndarray) -> FeatureMatrix:
        """[N, E, H] raw features -> their codes: int8 [N, E, d], one float16 scale per exit."""
        z = self.project(features)
        scale = np.maximum(np.abs(z).max(-1) / 127.0, 2.0**-14).astype(np.float16)  # [N, E]; float16's least normal
        codes = np.clip(np.rint(z / scale[..., None].astype(np.float32)), -127, 127).astype(np.int8)
        return FeatureMatrix(codes, scale)

    def encode(self, features: np.ndarray) -> list[bytes]:
        """[N, E, H] raw features -> one stored row each: int8 codes [E, d], then float16 scales [E]."""
        q = self.quantise(features)
        assert q.scales is not None
        return [q.values[i].tobytes() + q.scales[i].tobytes() for i in range(len(q))]

    def parse(self, rows: Sequence[bytes]) -> FeatureMatrix:
        """Stored rows -> their codes, as `quantise` made them."""
        e, d = self.exits, self.dim
        codes = np.empty((len(rows), e, d), dtype=np.int8)
        scales = np.empty((len(rows), e), dtype=np.float16)
        for i, data in enumerate(rows):
            if len(data) != self.row_bytes:
                raise ValueError(f"a coded feature row of {len(data)} bytes, this codec writes {self.row_bytes}")
            codes[i] = np.frombuffer(data, dtype=np.int8, count=e * d).reshape(e, d)
            scales[i] = np.frombuffer(data, dtype=np.float16, offset=e * d, count=e)
        return FeatureMatrix(codes, scales)

    def decode(self, rows: Sequence[bytes]) -> np.ndarray:
        """Stored rows -> [N, E, d] float32 coordinates."""
        return self.parse(rows).rows(np.arange(len(rows)))

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, mean=self.mean, basis=self.basis)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> FeatureCodec:
        z = np.load(io.BytesIO(data), allow_pickle=False)
        return cls(z["mean"].astype(np.float32), z["basis"].astype(np.float32))


def learn_codec(features: np.ndarray, dim: int = DIM, standardise: bool = True) -> FeatureCodec:
    """A codec from [N, E, H] raw features: per exit, the top `dim` principal directions of the
    records' features, each coordinate first scaled to unit variance (`standardise`: the heads see
    standardised features, so a few coordinates of huge variance must not take the basis), each
    direction scaled to unit variance (fewer where the records span fewer)."""
    x = features.astype(np.float64)
    mean = x.mean(0)  # [E, H]
    n, e, h = x.shape
    d = min(dim, h, max(n - 1, 1))
    basis = np.zeros((e, h, d), dtype=np.float32)
    for j in range(e):
        centred = x[:, j] - mean[j]
        unit = np.where(centred.std(0) > 1e-6, centred.std(0), 1.0) if standardise else np.ones(h)
        _, s, vt = np.linalg.svd(centred / unit, full_matrices=False)
        sd = s[:d] / np.sqrt(max(n - 1, 1))
        keep = sd > 1e-6 * max(float(sd[0]), 1e-12) if len(sd) else np.zeros(0, dtype=bool)
        basis[j, :, : int(keep.sum())] = (vt[:d][keep] / sd[keep, None]).T / unit[:, None]
    return FeatureCodec(mean.astype(np.float32), basis)
