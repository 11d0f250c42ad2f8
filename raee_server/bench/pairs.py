"""Sentence-pair tasks built from the single-text labelled files this machine has.

No GLUE pair set can be fetched here, so two pair tasks are made from real texts, each asking whether
two texts share their label: `agnews-pairs` ("are these two news articles about the same topic?") and
`trec-pairs` ("do these two questions ask for the same kind of answer?"). The construction, per split:

- every text of the split is the first input of exactly one pair, in a seeded random order;
- its partner is another text of the same split: of the same label with probability 1/2 (label
  `same`), else of another label drawn uniformly (`different`); so about half the pairs are `same`;
- train pairs come from the train file's texts, dev pairs from the dev file's: no text, and so no
  pair, is in both (`build` checks it, counting either order of a pair).

The same seed gives the same files (`raee-admin pairs`); the task specs are `tasks/<name>.toml`.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from raee_server.core.datafile import read_rows
from raee_server.types import Row

# pair task -> (the single-text task whose files it is built from, its two inputs)
PAIR_TASKS = {"agnews-pairs": ("agnews", ("article1", "article2")),
              "trec-pairs": ("trec", ("question1", "question2"))}
SAME, DIFFERENT = "same", "different"


def pairs_of(rows: Sequence[Row], seed: int) -> list[tuple[str, str, str]]:
    """(first, second, same|different) for each row, as the module docstring constructs them."""
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        by_label[row.label].append(i)
    labels = sorted(by_label)
    out: list[tuple[str, str, str]] = []
    seen: set[frozenset[str]] = set()
    for i in rng.permutation(len(rows)):
        row = rows[i]
        same = rng.random() < 0.5 and len(by_label[row.label]) > 1
        others = [lb for lb in labels if lb != row.label]
        pool = by_label[row.label] if same or not others else by_label[others[rng.integers(len(others))]]
        j = int(pool[rng.integers(len(pool))])
        while rows[j].text == row.text and len(pool) > 1:
            j = int(pool[rng.integers(len(pool))])
        pair = frozenset((row.text, rows[j].text))
        if rows[j].text == row.text or pair in seen:
            continue  # a text paired with itself, or a pair already made: never a duplicate record
        seen.add(pair)
        out.append((row.text, rows[j].text, SAME if rows[j].label == row.label else DIFFERENT))
    return out


def write_pairs(path: Path, inputs: tuple[str, str], pairs: Sequence[tuple[str, str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow([*inputs, "label"])
        writer.writerows(pairs)


def build(data: Path, out: Path, seed: int = 0) -> dict[str, dict[str, int]]:
    """<out>/<pair task>/{train,dev}.tsv from <data>/<source task>/{train,dev}.tsv; returns the row
    counts per task and split (and the `same` pairs)."""
    report: dict[str, dict[str, int]] = {}
    for name, (source, inputs) in PAIR_TASKS.items():
        made: dict[str, list[tuple[str, str, str]]] = {}
        for split in ("train", "dev"):
            rows = [r for r in read_rows(data / source / f"{split}.tsv") if isinstance(r, Row)]
            made[split] = pairs_of(rows, seed + (split == "dev"))
            write_pairs(out / name / f"{split}.tsv", inputs, made[split])
        train = {frozenset(p[:2]) for p in made["train"]}
        assert not any(frozenset(p[:2]) in train for p in made["dev"]), f"{name}: a pair in both train and dev"
        report[name] = {f"{split}_rows": len(made[split]) for split in made} | \
            {f"{split}_same": sum(p[2] == SAME for p in made[split]) for split in made}
    return report
