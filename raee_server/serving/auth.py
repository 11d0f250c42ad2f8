"""Access control: API keys per tenant, stored hashed, carried in gRPC metadata.

A key grants Classify, ClassifyBatch, ClassifyStream, Ingest, GetTask and GetTaskStats on the
tasks it names ("*" for all); admin RPCs (CreateTask, DeleteTask, ListTasks)
need an admin key. Keys are random tokens, so a SHA-256 of the key is enough to
store: the file never holds a usable secret. Off when no key file is configured.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from raee_server.errors import InvalidInput, PermissionDenied, Unauthenticated
from raee_server.types import METADATA_KEY

ADMIN_METHODS = frozenset({"CreateTask", "DeleteTask", "ListTasks"})



def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "raee_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    name: str
    tasks: frozenset[str]  # "*" grants every task
    admin: bool

    def may_use(self, task: str) -> bool:
        return self.admin or "*" in self.tasks or task in self.tasks


class KeyRing:
    def __init__(self, principals: dict[str, Principal]) -> None:
        self._by_hash = principals

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInput(f"{path}: cannot read the API key file: {exc}") from exc
        principals = {}
        for i, entry in enumerate(data.get("keys", [])):
            if "sha256" not in entry or "name" not in entry:
                raise InvalidInput(f"{path}: keys[{i}] needs 'name' and 'sha256'")
            principals[entry["sha256"]] = Principal(entry["name"], frozenset(entry.get("tasks", [])),
                                                    bool(entry.get("admin", False)))
        return cls(principals)

    def authenticate(self, key: str | None) -> Principal:
        if not key:
            raise Unauthenticated(f"missing API key: send it in the '{METADATA_KEY}' metadata entry")
        digest = hash_key(key)
        for known, principal in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return principal
        raise Unauthenticated("unknown API key")

    def authorize(self, key: str | None, method: str, task: str | None) -> Principal:
        principal = self.authenticate(key)
        if method in ADMIN_METHODS:
            if not principal.admin:
                raise PermissionDenied(f"{method} needs an admin key; key {principal.name!r} is not one")
        elif task is not None and not principal.may_use(task):
            raise PermissionDenied(f"key {principal.name!r} does not grant task {task!r}")
        return principal


def add_key(path: Path, name: str, tasks: Sequence[str], admin: bool) -> str:
    """Add a new key's hash to the key file; returns the key (shown once, never stored).

    The file is read, extended and written whole by a TOML writer, then swapped in atomically:
    a name holding quotes or newlines stays a name, and a crash never leaves half a file."""
    data: dict[str, list[dict[str, object]]] = {}
    if path.exists():
        KeyRing.load(path)  # refuse to extend a file that does not parse
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    key = new_key()
    data.setdefault("keys", []).append({"name": name, "sha256": hash_key(key), "tasks": list(tasks),
                                        "admin": admin})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(tomli_w.dumps(data), encoding="utf-8")
    os.replace(partial, path)
    return key
