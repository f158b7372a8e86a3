"""API keys of the gateway: stored only as SHA-256 hashes, looked up in O(1), never logged.

A key is ``sk-`` plus 43 characters of ``secrets.token_urlsafe`` (256 bits), so a plain
SHA-256 is enough: there is nothing to brute-force, and hashing costs about a microsecond,
which matters on a path that authenticates every request. The secret is shown once, by
``create``, and never stored.

``gpuctl keys`` and ``gpuctl serve`` are different processes sharing one SQLite file.
``KeyStore.authenticate`` answers from an in-memory map of hash → key and reloads that map
only when ``PRAGMA data_version`` says another connection committed, so a key created or
revoked from the CLI takes effect on the gateway's next request at the cost of a few
microseconds per request. "Last used" is kept in memory and written in batches
(``flush``), because rewriting the key store on every request was a weak spot of the
service gpuctl replaces.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from gpuctl.errors import NotFoundError, UsageError
from gpuctl.store.db import DB_FILENAME, data_version, open_db
from gpuctl.store.migrations import migrate

__all__ = ["KEY_PREFIX", "ApiKey", "KeyStore", "hash_key"]

KEY_PREFIX = "sk-"
Role = Literal["admin", "user"]


class ApiKey(BaseModel):
    """One key as ``keys list`` shows it: everything but the secret."""

    id: str
    name: str
    email: str = ""
    role: Role = "user"
    created: float
    last_used: float | None = None
    revoked: float | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def active(self) -> bool:
        return self.revoked is None


def hash_key(secret: str) -> str:
    """The stored form of a key: hex SHA-256."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def _new_id() -> str:
    return "key_" + secrets.token_hex(4)


def _imported_id(key_hash: str) -> str:
    """The id an imported key gets: drawn from its hash, so the same file imported on every
    gateway host (replicas) gives each key one id everywhere, and a budget or a revocation
    by id means the same key on all of them. (A hash of the hash: it says nothing of the
    secret.)"""
    return "key_" + hashlib.sha256(f"gpuctl-key-id:{key_hash}".encode()).hexdigest()[:8]


def _row_to_key(row: sqlite3.Row) -> ApiKey:
    return ApiKey(
        id=row["id"], name=row["name"], email=row["email"], role=row["role"],
        created=row["created"], last_used=row["last_used"], revoked=row["revoked"],
    )


def _parse_created(value: Any) -> float:
    """The old service wrote ``created`` as an ISO date or an epoch number; keep what we can."""
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return time.time()
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()
    return time.time()


class KeyStore:
    """The ``api_keys`` table of ``gpuctl.db``, plus the gateway's in-memory lookup cache."""

    def __init__(self, conn: sqlite3.Connection, *, own_connection: bool = False) -> None:
        self._conn = conn
        self._own = own_connection
        migrate(conn)
        self._version: int | None = None
        self._by_hash: dict[str, ApiKey] = {}
        self._hash_of: dict[str, str] = {}
        self._used: dict[str, float] = {}

    @classmethod
    def open(cls, state_dir: Path) -> KeyStore:
        """Open (or create) the key table in ``state_dir / gpuctl.db``."""
        return cls(open_db(state_dir / DB_FILENAME), own_connection=True)

    def close(self) -> None:
        self.flush()
        if self._own:
            self._conn.close()

    # -- administration (the CLI) ------------------------------------------------------

    def create(self, name: str, *, email: str = "", admin: bool = False) -> tuple[ApiKey, str]:
        """Make a key; returns the record and the secret, which is never seen again."""
        if not name.strip():
            raise UsageError("a key needs a name", hint="Use `gpuctl keys create --name NAME`.")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(id=_new_id(), name=name.strip(), email=email.strip(),
                     role="admin" if admin else "user", created=time.time())
        self._insert(key, hash_key(secret))
        return key, secret

    def _insert(self, key: ApiKey, key_hash: str) -> None:
        self._conn.execute(
            "INSERT INTO api_keys (id, key_hash, name, email, role, created, last_used, revoked)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key.id, key_hash, key.name, key.email, key.role, key.created, key.last_used,
             key.revoked),
        )
        self._version = None

    def all(self, *, include_revoked: bool = True) -> list[ApiKey]:
        self.flush()
        rows = self._conn.execute("SELECT * FROM api_keys ORDER BY created, id").fetchall()
        keys = [_row_to_key(row) for row in rows]
        return keys if include_revoked else [k for k in keys if k.active]

    def hashed(self) -> list[tuple[ApiKey, str]]:
        """Every key with its stored hash (to publish to replicas; never the secret)."""
        rows = self._conn.execute("SELECT * FROM api_keys ORDER BY created, id").fetchall()
        return [(_row_to_key(row), row["key_hash"]) for row in rows]

    def get(self, key_id: str) -> ApiKey:
        row = self._conn.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no key with id {key_id!r}",
                                hint="List the keys with `gpuctl keys list`.")
        return _row_to_key(row)

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key; revoking twice is harmless and keeps the first time."""
        key = self.get(key_id)
        if key.revoked is None:
            now = time.time()
            self._conn.execute("UPDATE api_keys SET revoked = ? WHERE id = ?", (now, key_id))
            key = key.model_copy(update={"revoked": now})
            self._version = None
        return key

    def import_file(self, path: Path) -> list[ApiKey]:
        """Import the old service's ``api_keys.json``; keys already present are skipped."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"no such file: {path}") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {path} as JSON: {exc}") from None
        entries = data.get("api_keys") if isinstance(data, dict) else None
        if not isinstance(entries, dict):
            raise UsageError(f"{path}: expected {{\"api_keys\": {{\"<key>\": {{...}}}}}}")
        imported: list[ApiKey] = []
        for secret, info in entries.items():
            if not isinstance(secret, str) or not secret:
                continue
            info = info if isinstance(info, dict) else {}
            key_hash = hash_key(secret)
            exists = self._conn.execute(
                "SELECT 1 FROM api_keys WHERE key_hash = ?", (key_hash,)
            ).fetchone()
            if exists:
                continue
            role: Role = "admin" if info.get("role") == "admin" or info.get("admin") else "user"
            key_id = _imported_id(key_hash)
            if self._conn.execute("SELECT 1 FROM api_keys WHERE id = ?", (key_id,)).fetchone():
                key_id = _new_id()  # another key has it (one in four billion)
            key = ApiKey(id=key_id, name=str(info.get("name") or "imported"),
                         email=str(info.get("email") or ""), role=role,
                         created=_parse_created(info.get("created")))
            self._insert(key, key_hash)
            imported.append(key)
        return imported

    # -- the gateway's hot path --------------------------------------------------------

    def authenticate(self, secret: str) -> ApiKey | None:
        """The active key for ``secret``, or None. O(1); reloads only after another writer."""
        version = data_version(self._conn)
        if version != self._version:
            self._reload(version)
        digest = hash_key(secret)
        key = self._by_hash.get(digest)
        if key is None:
            return None
        # The dict lookup found the candidate; the constant-time compare is the decision.
        stored = self._hash_of.get(key.id, "")
        if not hmac.compare_digest(stored, digest):
            return None
        return key

    def active(self, key_id: str) -> ApiKey | None:
        """The key with ``key_id`` if it is still active (O(1), like ``authenticate``): how
        a browser session learns at once that its key was revoked."""
        version = data_version(self._conn)
        if version != self._version:
            self._reload(version)
        digest = self._hash_of.get(key_id)
        return self._by_hash.get(digest) if digest is not None else None

    def _reload(self, version: int) -> None:
        rows = self._conn.execute(
            "SELECT * FROM api_keys WHERE revoked IS NULL"
        ).fetchall()
        self._by_hash = {row["key_hash"]: _row_to_key(row) for row in rows}
        self._hash_of = {key.id: h for h, key in self._by_hash.items()}
        self._version = version

    def mark_used(self, key_id: str, when: float | None = None) -> None:
        """Remember that a key was used; written to disk by ``flush``, not per request."""
        self._used[key_id] = time.time() if when is None else when

    def flush(self) -> None:
        """Write the batched "last used" times."""
        if not self._used:
            return
        used, self._used = self._used, {}
        self._conn.executemany(
            "UPDATE api_keys SET last_used = MAX(COALESCE(last_used, 0), ?) WHERE id = ?",
            [(when, key_id) for key_id, when in used.items()],
        )
