"""Labelled files: formats, line numbers of rejected rows, header errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raee_server.core.datafile import read_rows
from raee_server.errors import InvalidInput
from raee_server.types import Rejected, Row


def test_tsv_rows_and_rejections_carry_their_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.tsv"
    path.write_text('text\tlabel\ngood film\tpositive\n"two\nlines"\tnegative\n   \tpositive\nonly one field\n'
                    "ok\t  positive \n", encoding="utf-8")
    items = list(read_rows(path))
    assert items == [
        Row(2, "good film", "positive"),
        Row(3, "two\nlines", "negative"),
        Rejected(5, "empty text"),
        Rejected(6, "expected 2 fields, found 1"),
        Row(7, "ok", "positive"),  # labels are stripped of surrounding spaces
    ]


def test_csv_with_renamed_columns(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text('id,sentence,y\n1,"a, b",pos\n', encoding="utf-8")
    assert list(read_rows(path, "sentence", "y")) == [Row(2, "a, b", "pos")]


def test_jsonl_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "fine", "label": "positive"}), "{broken", json.dumps({"text": "x"}), "[1]"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = list(read_rows(path))
    assert items[0] == Row(1, "fine", "positive")
    assert [type(i) for i in items[1:]] == [Rejected] * 3
    assert [i.line for i in items[1:]] == [2, 3, 4]
    assert "missing field 'label'" in items[2].reason


def test_a_missing_column_names_the_column_and_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "d.tsv"
    path.write_text("txt\tlabel\nhello\tpositive\n", encoding="utf-8")
    with pytest.raises(InvalidInput, match=r"line 1: no column 'text'.*--text-column"):
        list(read_rows(path))


def test_invalid_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "d.tsv"
    path.write_bytes(b"text\tlabel\ngood \xff film\tpositive\n")
    with pytest.raises(InvalidInput, match="not valid UTF-8"):
        list(read_rows(path))


def test_unknown_extension_asks_for_a_format(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_text("text\tlabel\n")
    with pytest.raises(InvalidInput, match="--format"):
        list(read_rows(path))
    assert list(read_rows(path, fmt="tsv")) == []
