from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from raee_server.core.engine import Engine
from raee_server.models.backbone import Backbone, CausalLMBackbone
from raee_server.models.encoders import HashingEncoder
from raee_server.settings import Settings
from raee_server.stores.metadata import MetadataStore
from raee_server.stores.vectors import EdgeVectorStore, collection_name
from raee_server.types import Label, TaskSpec

from .databases import database
from .tiny_models import WORDS, tiny_causal_lm, tiny_tokenizer

CORPORA = Path(__file__).resolve().parents[1] / "corpora"  # the repository's labelled data

SENTIMENT = TaskSpec(
    "sentiment",
    "What is the sentiment of the sentence '{text}' ? Print negative or positive . The answer is",
    (Label("negative", " negative"), Label("positive", " positive")),
)


@pytest.fixture
def backbone() -> Backbone:
    return CausalLMBackbone(tiny_causal_lm(), tiny_tokenizer(), "tiny-gemma3")


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    with database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def engine(tmp_path: Path, backbone: Backbone, database_url: str):  # type: ignore[no-untyped-def]
    encoder = HashingEncoder(32)
    settings = Settings(data_dir=tmp_path, database_url=database_url, ingest_batch_size=4, forward_batch_size=3)
    vectors = EdgeVectorStore(tmp_path / "qdrant", collection_name(backbone.model_id, encoder.model_id), encoder.dim)
    eng = Engine(backbone, encoder, vectors, MetadataStore(settings.sql_url), settings)
    yield eng
    eng.close()


def write_tsv(path: Path, rows: list[tuple[str, str]], header: str = "text\tlabel") -> Path:
    path.write_text(header + "\n" + "".join(f"{t}\t{l}\n" for t, l in rows), encoding="utf-8")
    return path


def corpus(n: int) -> list[tuple[str, str]]:
    """n distinct synthetic sentiment rows, one third negative."""
    return [(f"{WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]} {i}", "positive" if i % 3 else "negative")
            for i in range(n)]


def task_data(root: Path, n: int, train: int, task: str = "sst2") -> Path:
    """A data root for the benches: <root>/<task>/train.tsv holds corpus(n)'s first `train` rows and
    dev.tsv the rest; returns <root>."""
    rows = corpus(n)
    (root / task).mkdir(parents=True)
    write_tsv(root / task / "train.tsv", rows[:train])
    write_tsv(root / task / "dev.tsv", rows[train:])
    return root


def admin_cli(data_dir: Path, backbone: Path, encoder: str = "hashing:32") -> Callable[..., str]:
    """`raee-admin` on a tiny model in-process: run(*args, code=0) checks the exit code, returns the output."""
    from raee_server.cli.main import cli

    runner = CliRunner()
    base = ["--data-dir", str(data_dir), "--backbone", str(backbone), "--encoder", encoder]

    def run(*args: str, code: int = 0) -> str:
        result = runner.invoke(cli, [*base, *args], catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result.output

    return run
