"""Reading labelled files (TSV, CSV, JSONL) row by row, with line numbers for every rejection."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from raee_server.errors import InvalidInput
from raee_server.types import Rejected, Row, is_blank, pack_inputs

FORMATS = ("tsv", "csv", "jsonl")
csv.field_size_limit(sys.maxsize)


def detect_format(path: Path, fmt: str | None) -> str:
    if fmt:
        if fmt not in FORMATS:
            raise InvalidInput(f"format {fmt!r}: use one of {', '.join(FORMATS)}")
        return fmt
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("json", "ndjson"):
        return "jsonl"
    if suffix in FORMATS:
        return suffix
    raise InvalidInput(f"{path}: cannot tell the format from the extension; pass --format tsv|csv|jsonl")


def read_rows(
    path: Path, text_column: str = "text", label_column: str = "label", fmt: str | None = None,
    inputs: Sequence[str] = (),
) -> Iterator[Row | Rejected]:
    """Yield a Row per usable line and a Rejected (with its reason) per unusable one.

    A missing column in the header is an InvalidInput for the whole file: no row can be read.
    Labels are stripped of surrounding spaces; their case is kept (labels are matched exactly).
    `inputs`: a task's named inputs, when it has several (a sentence pair): a column (or JSON field)
    each, named as the input, instead of `text_column`; the row's text is their packed form.
    """
    fmt = detect_format(path, fmt)
    if not path.is_file():
        raise InvalidInput(f"{path}: no such file")
    with path.open("r", encoding="utf-8", errors="strict", newline="") as handle:
        try:
            columns = list(inputs) if len(inputs) > 1 else [text_column]
            if fmt == "jsonl":
                yield from _jsonl_rows(handle, path, columns, label_column)
            else:
                yield from _delimited_rows(handle, path, "\t" if fmt == "tsv" else ",", columns, label_column)
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc


def check_row(line: int, text: object, label: object) -> Row | Rejected:
    """The checks every labelled example gets, from a file or from a gRPC stream."""
    if not isinstance(text, str) or is_blank(text):
        return Rejected(line, "empty text")
    if "\x00" in text:
        return Rejected(line, "text contains a NUL byte")
    if label is None or is_blank(str(label)):
        return Rejected(line, "empty label")
    return Row(line, text, str(label).strip())


def _inputs_row(line: int, columns: Sequence[str], values: Sequence[object], label: object) -> Row | Rejected:
    """`check_row` for one text column, or for several (a column per input, each checked by name)."""
    if len(columns) == 1:
        return check_row(line, values[0], label)
    texts: dict[str, str] = {}
    for column, value in zip(columns, values):
        if not isinstance(value, str) or is_blank(value):
            return Rejected(line, f"{column}: empty text")
        if "\x00" in value:
            return Rejected(line, f"{column}: text contains a NUL byte")
        texts[column] = value
    if label is None or is_blank(str(label)):
        return Rejected(line, "empty label")
    return Row(line, pack_inputs(texts), str(label).strip())


def _delimited_rows(handle, path: Path, delimiter: str, text_cols: Sequence[str], label_col: str
                    ) -> Iterator[Row | Rejected]:
    reader = csv.reader(handle, delimiter=delimiter)
    header = next(reader, None)
    wanted = " and ".join(repr(c) for c in (*text_cols, label_col))
    if header is None:
        raise InvalidInput(f"{path}: empty file (expected a header with {wanted})")
    header = [h.strip() for h in header]
    flags = ["--text-column" if len(text_cols) == 1 else "the task's inputs"] * len(text_cols) + ["--label-column"]
    for col, flag in zip((*text_cols, label_col), flags):
        if col not in header:
            raise InvalidInput(f"{path}: line 1: no column {col!r} in header {header} (set it with {flag})")
    tis, li = [header.index(c) for c in text_cols], header.index(label_col)
    line = reader.line_num + 1
    for fields in reader:
        start, line = line, reader.line_num + 1
        if not fields:
            continue  # a blank line
        if len(fields) != len(header):
            yield Rejected(start, f"expected {len(header)} fields, found {len(fields)}")
            continue
        yield _inputs_row(start, text_cols, [fields[i] for i in tis], fields[li])


def _jsonl_rows(handle, path: Path, text_cols: Sequence[str], label_col: str) -> Iterator[Row | Rejected]:
    for number, raw in enumerate(handle, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            yield Rejected(number, f"invalid JSON: {exc.msg}")
            continue
        if not isinstance(obj, dict):
            yield Rejected(number, "not a JSON object")
            continue
        missing = [c for c in (*text_cols, label_col) if c not in obj]
        if missing:
            yield Rejected(number, f"missing field {missing[0]!r}")
            continue
        yield _inputs_row(number, text_cols, [obj[c] for c in text_cols], obj[label_col])
