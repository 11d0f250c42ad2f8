"""A batch between the engine's two stages: after retrieval and the exit decisions
(`Engine.prepare`), before the backbone (`Engine.complete`); the worker joins and splits these to
batch rows of several requests into one forward."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from raee_server.core.heads import ExitHeads
from raee_server.core.policies import Decision
from raee_server.types import Neighbour


@dataclass
class Prepared:
    """Rows of one task and policy after `Engine.prepare`: what the backbone stage needs of them."""

    task: str
    texts: list[str]
    served: str  # the policy as the answers name it
    decisions: list[Decision]
    found: list[list[Neighbour]]
    covered: list[bool | None]  # the records cover the row (None: not checked)
    timings: dict[str, int] = field(default_factory=dict)
    heads: ExitHeads | None = None

    def rows(self, index: Sequence[int]) -> Prepared:
        """Some of the rows, in the order given."""
        pick = list(index)
        return Prepared(self.task, [self.texts[i] for i in pick], self.served, [self.decisions[i] for i in pick],
                        [self.found[i] for i in pick], [self.covered[i] for i in pick], self.timings, self.heads)

    @property
    def without_backbone(self) -> list[int]:
        """The rows answered before the backbone (by the key head, or retrieval)."""
        return [i for i, d in enumerate(self.decisions) if d.answer is not None]

    @staticmethod
    def join(parts: Sequence[Prepared]) -> Prepared:
        """Rows of one task and policy prepared apart, as one batch for the backbone."""
        first = parts[0]
        return Prepared(first.task, [t for p in parts for t in p.texts], first.served,
                        [d for p in parts for d in p.decisions], [f for p in parts for f in p.found],
                        [c for p in parts for c in p.covered], first.timings, first.heads)
