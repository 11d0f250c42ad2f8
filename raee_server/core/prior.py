"""Online label-prior adaptation: estimate the traffic's label mix from the service's own answers.

No labels arrive with the traffic, but the answers' probabilities carry its label mix. The EM
re-estimation of Saerens, Latinne and Decaestecker (2002, "Adjusting the outputs of a classifier
to new a priori probabilities") finds the prior that makes the answers, re-weighted by it,
consistent with it. Answers are then re-weighted by the ratio of that estimate to the prior the
answers were made under.

Bounded, so that a burst of one label cannot flip the service: the estimate uses a window of
recent answers, waits for `min_answers` before it acts, and each label's ratio is clipped to
[1 / max_ratio, max_ratio].
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np


def em_prior(probs: np.ndarray, train_prior: np.ndarray, iterations: int = 200, tol: float = 1e-7) -> np.ndarray:
    """The label prior [C] of the rows whose posteriors under `train_prior` are `probs` [N, C]."""
    prior = train_prior.copy()
    for _ in range(iterations):
        weighted = probs * (prior / train_prior)
        weighted /= weighted.sum(1, keepdims=True)
        new = weighted.mean(0)
        if np.abs(new - prior).max() < tol:
            return np.asarray(new)
        prior = new
    return np.asarray(prior)


class PriorTracker:
    """One task's traffic prior, estimated from a window of its recent answers (thread-safe)."""

    def __init__(self, labels: Sequence[str], train_prior: Sequence[float], window: int = 500,
                 min_answers: int = 100, max_ratio: float = 5.0, every: int = 25) -> None:
        self.labels = list(labels)
        self.train_prior = np.asarray(train_prior, dtype=np.float64)
        self.window, self.min_answers, self.max_ratio, self.every = window, min_answers, max_ratio, every
        self._answers: deque[np.ndarray] = deque(maxlen=window)
        self._since = 0
        self.estimate = self.train_prior.copy()
        self.updated_at = ""  # RFC 3339, for GetTask
        self.updated_unix = 0.0  # the same moment, for metrics
        self.seen = 0
        self._lock = threading.Lock()

    def observe(self, probs: Sequence[np.ndarray] | np.ndarray) -> None:
        """Record answers' probabilities (as made under the train prior, before `adjust`)."""
        with self._lock:
            for p in probs:
                self._answers.append(np.asarray(p, dtype=np.float64))
            self.seen += len(probs)
            self._since += len(probs)
            if len(self._answers) >= self.min_answers and self._since >= self.every:
                self._since = 0
                self.estimate = em_prior(np.stack(self._answers), self.train_prior)
                now = datetime.now(UTC)
                self.updated_at, self.updated_unix = now.isoformat(timespec="seconds"), now.timestamp()

    @property
    def active(self) -> bool:
        return bool(self.updated_at)

    def ratio(self) -> np.ndarray:
        """Per label, estimated traffic prior over the train prior, clipped; all 1 until active."""
        if not self.active:
            return np.ones_like(self.train_prior)
        return np.asarray(np.clip(self.estimate / self.train_prior, 1 / self.max_ratio, self.max_ratio))

    def adjust(self, probs: np.ndarray) -> np.ndarray:
        """Answers' probabilities [..., C] re-weighted toward the estimated traffic prior."""
        z = probs * self.ratio()
        return np.asarray(z / z.sum(-1, keepdims=True))
