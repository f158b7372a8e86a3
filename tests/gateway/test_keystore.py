"""The key store: hashes only, O(1) lookups, changes by other processes seen at once."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpuctl.errors import NotFoundError, UsageError
from gpuctl.store.keys import KeyStore, hash_key


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[KeyStore]:
    store = KeyStore.open(tmp_path)
    yield store
    store.close()


def test_created_key_is_high_entropy_and_stored_only_as_its_hash(
    keys: KeyStore, tmp_path: Path,
) -> None:
    key, secret = keys.create("alice", email="a@example.org")
    assert secret.startswith("sk-") and len(secret) >= 40
    raw = (tmp_path / "gpuctl.db").read_bytes() + _wal(tmp_path)
    assert secret.encode() not in raw
    conn = sqlite3.connect(tmp_path / "gpuctl.db")
    (stored,) = conn.execute("SELECT key_hash FROM api_keys WHERE id = ?", (key.id,)).fetchone()
    conn.close()
    assert stored == hash_key(secret)


def _wal(path: Path) -> bytes:
    wal = path / "gpuctl.db-wal"
    return wal.read_bytes() if wal.exists() else b""


def test_authenticate_finds_the_key_and_refuses_others(keys: KeyStore) -> None:
    key, secret = keys.create("alice", admin=True)
    found = keys.authenticate(secret)
    assert found is not None and found.id == key.id and found.is_admin
    assert keys.authenticate(secret + "x") is None
    assert keys.authenticate("") is None


def test_revoked_key_no_longer_authenticates(keys: KeyStore) -> None:
    key, secret = keys.create("alice")
    keys.revoke(key.id)
    assert keys.authenticate(secret) is None
    assert keys.get(key.id).revoked is not None


def test_revoke_by_another_connection_is_seen_on_the_next_lookup(tmp_path: Path) -> None:
    server = KeyStore.open(tmp_path)
    cli = KeyStore.open(tmp_path)
    try:
        key, secret = cli.create("alice")
        assert server.authenticate(secret) is not None
        cli.revoke(key.id)
        assert server.authenticate(secret) is None
    finally:
        cli.close()
        server.close()


def test_revoking_an_unknown_id_is_not_found(keys: KeyStore) -> None:
    with pytest.raises(NotFoundError):
        keys.revoke("key_nope")


def test_a_key_needs_a_name(keys: KeyStore) -> None:
    with pytest.raises(UsageError):
        keys.create("  ")


def test_import_of_the_old_key_file_keeps_the_keys_working(
    keys: KeyStore, tmp_path: Path,
) -> None:
    old = {"api_keys": {
        "sk-old-alice": {"name": "Alice", "email": "alice@uni.nl",
                         "created": "2024-05-01T10:00:00"},
        "sk-old-bob": {"name": "Bob", "email": "bob@uni.nl", "created": 1714557600},
    }}
    path = tmp_path / "api_keys.json"
    path.write_text(json.dumps(old))
    imported = keys.import_file(path)
    assert sorted(k.name for k in imported) == ["Alice", "Bob"]
    alice = keys.authenticate("sk-old-alice")
    assert alice is not None and alice.email == "alice@uni.nl" and alice.role == "user"
    assert alice.created == 1714557600.0
    assert keys.import_file(path) == []  # importing twice adds nothing
    # The same file imported on another host (a replica) gives each key the same id there,
    # so a budget or revocation by id means one key on every host.
    other = KeyStore.open(tmp_path / "other-host")
    try:
        assert sorted(k.id for k in other.import_file(path)) == sorted(k.id for k in imported)
    finally:
        other.close()
    assert len({k.id for k in imported}) == 2


def test_import_of_a_file_in_another_shape_is_a_usage_error(
    keys: KeyStore, tmp_path: Path,
) -> None:
    path = tmp_path / "keys.json"
    path.write_text('["sk-1"]')
    with pytest.raises(UsageError):
        keys.import_file(path)


def test_last_used_is_batched_until_flush(keys: KeyStore) -> None:
    key, _ = keys.create("alice")
    keys.mark_used(key.id, 1_800_000_000.0)
    row = keys._conn.execute("SELECT last_used FROM api_keys WHERE id = ?", (key.id,)).fetchone()
    assert row[0] is None
    keys.flush()
    assert keys.get(key.id).last_used == 1_800_000_000.0
