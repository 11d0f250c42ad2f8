"""Moving a task between deployments: one portable file, no backbone forward.

The file (`raee-admin export` / `import`) is gzip-compressed JSON lines, written and read a chunk of
records at a time:

    {"format": "raee-task", "version": 1, "task": <spec>, "backbone_id", "encoder_id", "key_dim",
     "tuned": <auto choice> | null}
    {"codec": <base64 npz>}                                          (where the task has one)
    {"heads": {"summary", "data": <base64 npz>}}                     (the newest version, where any)
    {"record": {"id", "text", "label", "layers": [[predicted, p, gold_p], ...], "key": <base64 float32>,
                "features": {"codec", "exits", "dim", "data": <base64>} | null}}   (one per record)
    {"end": {"records": N, "sha256": <hex of every line above, as written>}}

Import reads the file twice: once to check the checksum, the format version, the backbone and the
key encoder against this deployment's (records made by another backbone would answer wrongly), and
once to write, in ingest's order per chunk (SQL pending, vectors, SQL committed), so a failure part-way
leaves what `doctor --repair` finishes, and a file that does not check out writes nothing.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from raee_server.core.engine import Engine
from raee_server.errors import InvalidInput, StoreMismatch, TaskExists, TaskNotFound
from raee_server.stores.codec import FeatureCodec
from raee_server.stores.records import ExitRecord, LayerResult, StoredFeatures
from raee_server.types import Choice, TaskSpec

FORMAT, VERSION = "raee-task", 1
CHUNK = 500


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _bytes(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def export_task(engine: Engine, task: str, path: Path, progress: Callable[[int], None] | None = None) -> int:
    """Write the task to `path` (gzip JSON lines); returns the records written."""
    info = engine.task_info(task)
    metadata = engine.metadata
    digest = hashlib.sha256()
    written = 0
    with gzip.open(path, "wt", encoding="utf-8") as out:

        def line(item: dict[str, Any]) -> None:
            text = json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n"
            digest.update(text.encode("utf-8"))
            out.write(text)

        line({"format": FORMAT, "version": VERSION, "task": info.spec.to_dict(), "backbone_id": info.backbone_id,
              "encoder_id": info.encoder_id, "key_dim": engine.encoder.dim,
              "tuned": info.tuned.to_dict() if info.tuned else None})
        codec = metadata.codec(task)
        if codec is not None:
            line({"codec": _b64(codec.to_bytes())})
        heads = metadata.heads(task)
        if heads is not None:
            line({"heads": {"summary": heads.summary, "data": _b64(heads.data)}})
        examples = metadata.committed_examples(task)
        for start in range(0, len(examples), CHUNK):
            part = examples[start : start + CHUNK]
            ids = [rid for rid, _, _ in part]
            layers, features, keys = metadata.layer_results(ids), metadata.features_of(ids), engine.vectors.vectors(ids)
            for rid, text, label in part:
                if rid not in keys:
                    raise StoreMismatch(f"record {rid} of task {task!r} has no vector: run `raee-admin doctor "
                                        "--repair` before exporting")
                f = features.get(rid)
                line({"record": {"id": rid, "text": text, "label": label, "layers": layers.get(rid, []),
                                 "key": _b64(keys[rid].astype(np.float32).tobytes()),
                                 "features": None if f is None else {"codec": f.codec, "exits": f.exits, "dim": f.dim,
                                                                     "data": _b64(f.data)}}})
                written += 1
            if progress:
                progress(len(part))
        out.write(json.dumps({"end": {"records": written, "sha256": digest.hexdigest()}}) + "\n")
    return written


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    """The file's items, each with the checksum of the lines before it under "_sha256"."""
    digest = hashlib.sha256()
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for number, text in enumerate(handle, 1):
                try:
                    item = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise InvalidInput(f"{path}:{number}: not a JSON line ({exc.msg})") from None
                if not isinstance(item, dict):
                    raise InvalidInput(f"{path}:{number}: not a JSON object")
                item["_line"], item["_sha256"] = number, digest.hexdigest()
                yield item
                digest.update(text.encode("utf-8"))
    except (OSError, EOFError) as exc:  # not gzip, or cut short
        raise InvalidInput(f"{path}: not a complete task export ({exc})") from None


def check_export(path: Path) -> dict[str, Any]:
    """The header of a task export whose checksum, format and record count check out; raises otherwise."""
    header: dict[str, Any] | None = None
    records = 0
    for item in _lines(path):
        if header is None:
            if item.get("format") != FORMAT:
                raise InvalidInput(f"{path}:1: not a RAEE task export (format {item.get('format')!r})")
            if item.get("version") != VERSION:
                raise InvalidInput(f"{path}:1: export format version {item.get('version')!r}; this release reads "
                                   f"{VERSION}")
            header = item
        elif "record" in item:
            records += 1
        elif "end" in item:
            end = item["end"]
            if end.get("sha256") != item["_sha256"] or end.get("records") != records:
                raise InvalidInput(f"{path}:{item['_line']}: checksum or record count does not match: the file is "
                                   "damaged")
            return header
    raise InvalidInput(f"{path}: no end line: the file is cut short")


def import_task(engine: Engine, path: Path, progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """Create the exported task here with its records, keys, exit information, features, heads and
    `auto` choice; returns its name and the records imported. Refused before anything is written when the file does
    not check out, the task exists, or this deployment's backbone or key encoder differs."""
    header = check_export(path)
    spec = TaskSpec.from_dict(header["task"], source=f"{path}: task")
    if header["backbone_id"] != engine.backbone.model_id:
        raise StoreMismatch(f"{path}: records of backbone {header['backbone_id']!r}; this deployment runs "
                            f"{engine.backbone.model_id!r}: its exits would not be these records'")
    if header["encoder_id"] != engine.encoder.model_id or header["key_dim"] != engine.encoder.dim:
        raise StoreMismatch(f"{path}: keys of encoder {header['encoder_id']!r}; this deployment runs "
                            f"{engine.encoder.model_id!r}")
    try:
        engine.task_info(spec.name)
        raise TaskExists(spec.name)
    except TaskNotFound:
        pass
    engine.create_task(spec)
    metadata = engine.metadata
    batch = metadata.begin_batch(spec.name, f"import of {path.name}")
    count, heads_version = 0, 0
    chunk: list[tuple[ExitRecord, np.ndarray]] = []
    heads: dict[str, Any] | None = None

    def flush() -> None:
        if chunk:
            engine.store_records(spec.name, [r for r, _ in chunk], np.stack([k for _, k in chunk]), batch)
            if progress:
                progress(len(chunk))
            chunk.clear()

    for item in _lines(path):
        if "codec" in item:
            metadata.adopt_codec(spec.name, FeatureCodec.from_bytes(_bytes(item["codec"])))
        elif "heads" in item:
            heads = item["heads"]
        elif "record" in item:
            chunk.append(_record(spec, item["record"]))
            count += 1
            if len(chunk) >= CHUNK:
                flush()
    flush()
    metadata.finish_batch(batch, count, 0, 0, "done")
    if heads is not None:  # after the records: the heads judge them by id
        heads_version = metadata.save_heads(spec.name, heads["summary"], _bytes(heads["data"]))
    if header.get("tuned"):
        choice = Choice.from_dict(header["tuned"])
        if choice.heads_version:
            choice = Choice.from_dict({**choice.to_dict(), "heads_version": heads_version})
        metadata.set_tuned(spec.name, choice)
    engine.forget_choice(spec.name)
    return spec.name, count


def _record(spec: TaskSpec, data: dict[str, Any]) -> tuple[ExitRecord, np.ndarray]:
    gold = spec.label_index(data["label"])
    layers = tuple(LayerResult(layer, spec.label_index(predicted), float(p), float(gold_p), predicted == data["label"])
                   for layer, (predicted, p, gold_p) in enumerate(data["layers"]))
    f = data.get("features")
    features = None if f is None else StoredFeatures(int(f["codec"]), int(f["exits"]), int(f["dim"]), _bytes(f["data"]))
    record = ExitRecord(data["id"], spec.name, data["text"], data["label"], gold, layers, features)
    return record, np.frombuffer(_bytes(data["key"]), dtype=np.float32)
