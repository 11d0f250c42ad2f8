"""Access control: API keys per tenant, stored hashed, carried in gRPC metadata, reloaded live.

A key has a scope: `classify` (Classify, ClassifyBatch, ClassifyStream, GetTask, GetTaskStats on the
tasks it names, "*" for all), `ingest` (also Ingest, DeleteRecords and RelabelRecords on them) or
`admin` (every RPC on every task, including CreateTask, DeleteTask and ListTasks). Keys are random
tokens, so a SHA-256 of the key is enough to store: the file never holds a usable secret. The file
is read again when it changes (checked on every call: one stat) and on SIGHUP, so a revoked key is
refused from the next call on; a file that no longer parses keeps the last good keys (and logs why).
Off when no key file is configured.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from raee_server.errors import InvalidInput, PermissionDenied, Unauthenticated
from raee_server.types import METADATA_KEY

log = logging.getLogger(__name__)

ADMIN_METHODS = frozenset({"CreateTask", "DeleteTask", "ListTasks", "CheckRecords", "BuildIndex"})
# What `ingest` adds to `classify`: changing a task's records, heads or `auto` choice.
WRITE_METHODS = frozenset({"Ingest", "DeleteRecords", "RelabelRecords", "FitHeads", "Tune", "BackfillFeatures"})
SCOPES = ("classify", "ingest", "admin")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "raee_" + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class Principal:
    name: str
    tasks: frozenset[str]  # "*" grants every task
    scope: str = "ingest"  # one of SCOPES

    @property
    def admin(self) -> bool:
        return self.scope == "admin"

    def may_use(self, task: str) -> bool:
        return self.admin or "*" in self.tasks or task in self.tasks


def scope_of(entry: dict[str, Any], where: str) -> str:
    """An entry's scope; a file written before scopes existed says `admin = true` or nothing (ingest,
    which is what every task key could do then)."""
    scope = entry.get("scope", "admin" if entry.get("admin") else "ingest")
    if scope not in SCOPES:
        raise InvalidInput(f"{where}: scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    return str(scope)


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
            if not isinstance(entry, dict) or "sha256" not in entry or "name" not in entry:
                raise InvalidInput(f"{path}: keys[{i}] needs 'name' and 'sha256'")
            principals[entry["sha256"]] = Principal(entry["name"], frozenset(entry.get("tasks", [])),
                                                    scope_of(entry, f"{path}: keys[{i}]"))
        return cls(principals)

    @property
    def principals(self) -> list[Principal]:
        return list(self._by_hash.values())

    def by_hash(self) -> list[tuple[str, Principal]]:
        return list(self._by_hash.items())

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
        elif method in WRITE_METHODS and principal.scope == "classify":
            raise PermissionDenied(f"{method} needs an ingest or admin key; key {principal.name!r} may only classify")
        return principal


class LiveKeys:
    """The key file as the server sees it: read again when it changes (its inode, size or mtime: the
    writers here swap in a new file, so an edit is a new inode) and on `reload()` (SIGHUP)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen = self._stamp()
        self._ring = KeyRing.load(path)  # at start a bad file is fatal, as it always was

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def reload(self, force: bool = True) -> KeyRing:
        """Read the file again (always, or only when its stamp changed); keep the last good keys if it
        cannot be read (a missing file means no key is valid: an operator who removes it revokes all)."""
        with self._lock:
            stamp = self._stamp()
            if not force and stamp == self._seen:
                return self._ring
            self._seen = stamp
            try:
                self._ring = KeyRing({}) if stamp is None else KeyRing.load(self.path)
                log.info("API keys loaded from %s: %d keys", self.path, len(self._ring.principals))
            except InvalidInput as exc:
                log.error("API key file not reloaded, the last good keys stay in force: %s", exc)
            return self._ring

    @property
    def ring(self) -> KeyRing:
        if self._stamp() == self._seen:  # the common case: no lock on the request path, one stat
            return self._ring
        return self.reload(force=False)

    def authenticate(self, key: str | None) -> Principal:
        return self.ring.authenticate(key)

    def authorize(self, key: str | None, method: str, task: str | None) -> Principal:
        return self.ring.authorize(key, method, task)


def _read_entries(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    KeyRing.load(path)  # refuse to change a file that does not parse
    return list(tomllib.loads(path.read_text(encoding="utf-8")).get("keys", []))


def _write_entries(path: Path, entries: list[dict[str, Any]]) -> None:
    """Written whole by a TOML writer, then swapped in atomically: a name holding quotes or newlines
    stays a name, a crash never leaves half a file, and a running server sees a new inode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(tomli_w.dumps({"keys": entries}), encoding="utf-8")
    os.replace(partial, path)


def add_key(path: Path, name: str, tasks: Sequence[str], scope: str) -> str:
    """Add a new key's hash to the key file; returns the key (shown once, never stored)."""
    if scope not in SCOPES:
        raise InvalidInput(f"scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    entries = _read_entries(path)
    key = new_key()
    entries.append({"name": name, "sha256": hash_key(key), "tasks": list(tasks), "scope": scope})
    _write_entries(path, entries)
    return key


def list_keys(path: Path) -> list[dict[str, Any]]:
    """What the file grants, without the hashes' full length (enough to tell keys of one name apart)."""
    return [{"name": p.name, "tasks": sorted(p.tasks), "scope": p.scope, "sha256": digest[:12]}
            for digest, p in KeyRing.load(path).by_hash()] if path.exists() else []


def revoke_key(path: Path, name: str | None = None, sha256: str | None = None) -> list[str]:
    """Remove the keys of a name, or the one whose hash starts with `sha256`; returns their hash
    prefixes. A running server refuses them from its next call on (it sees the file change)."""
    entries = _read_entries(path)
    gone = [e for e in entries if (name is not None and e["name"] == name)
            or (sha256 is not None and len(sha256) >= 6 and str(e["sha256"]).startswith(sha256))]
    if not gone:
        raise InvalidInput(f"no key {'named ' + repr(name) if name is not None else 'with hash ' + repr(sha256)} "
                       f"in {path}")
    _write_entries(path, [e for e in entries if e not in gone])
    return [str(e["sha256"])[:12] for e in gone]
