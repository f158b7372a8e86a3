"""The store's schema is versioned: old databases migrate, newer ones are refused clearly."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpuctl.cli.main import app
from gpuctl.errors import SchemaTooNew
from gpuctl.store import Store
from gpuctl.store.db import DB_FILENAME, open_db
from gpuctl.store.keys import KeyStore, hash_key
from gpuctl.store.migrations import MIGRATIONS, SCHEMA_VERSION, migrate, schema_version

#: The DDL of the release before versioning (0.1), frozen here as that release wrote it.
UNVERSIONED_DDL = (
    """CREATE TABLE IF NOT EXISTS api_keys (
        id TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
        email TEXT NOT NULL DEFAULT '', role TEXT NOT NULL DEFAULT 'user',
        created REAL NOT NULL, last_used REAL, revoked REAL)""",
    """CREATE TABLE IF NOT EXISTS leases (
        gpu_id TEXT NOT NULL, user TEXT NOT NULL, expires_at REAL NOT NULL,
        seconds REAL NOT NULL DEFAULT 0, PRIMARY KEY (gpu_id, user))""",
    """CREATE TABLE IF NOT EXISTS known_models (
        gpu_id TEXT PRIMARY KEY, models TEXT NOT NULL, seen_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS resume_history (
        gpu_id TEXT NOT NULL, seconds REAL NOT NULL, ok INTEGER NOT NULL,
        at REAL NOT NULL, reason TEXT)""",
    "CREATE INDEX IF NOT EXISTS resume_history_gpu ON resume_history (gpu_id, at)",
    """CREATE TABLE IF NOT EXISTS load_history (
        model TEXT NOT NULL, seconds REAL NOT NULL, at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS pending_actions (
        gpu_id TEXT PRIMARY KEY, action TEXT NOT NULL, started_at REAL NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS usage (
        user TEXT PRIMARY KEY, requests INTEGER NOT NULL DEFAULT 0,
        tokens_in INTEGER NOT NULL DEFAULT 0, tokens_out INTEGER NOT NULL DEFAULT 0,
        gpu_seconds REAL NOT NULL DEFAULT 0, last_at REAL)""",
)


def _unversioned_db(state: Path) -> Path:
    """A database as the unversioned release left it, with a key, a lease and history."""
    state.mkdir(parents=True, exist_ok=True)
    path = state / DB_FILENAME
    conn = sqlite3.connect(path)
    for statement in UNVERSIONED_DDL:
        conn.execute(statement)
    conn.execute(
        "INSERT INTO api_keys (id, key_hash, name, role, created) VALUES (?, ?, ?, ?, ?)",
        ("key_old", hash_key("sk-old-secret"), "alice", "user", 1.0),
    )
    conn.execute("INSERT INTO leases VALUES ('ws-1', 'alice', 4e9, 600)")
    conn.execute("INSERT INTO resume_history VALUES ('ws-1', 95.0, 1, 10.0, NULL)")
    conn.execute("INSERT INTO usage VALUES ('alice', 3, 30, 40, 12.5, 10.0)")
    conn.commit()
    conn.close()
    return path


def test_a_database_of_the_unversioned_release_migrates_and_keeps_its_rows(
    tmp_path: Path,
) -> None:
    path = _unversioned_db(tmp_path)
    store = Store.open(tmp_path)
    assert schema_version(store.conn) == SCHEMA_VERSION
    assert store.load_leases(0.0)[0].user == "alice"
    assert store.resume_history() == {"ws-1": [(95.0, True)]}
    assert store.usage()["alice"].gpu_seconds == 12.5
    store.close()
    keys = KeyStore.open(tmp_path)
    key = keys.authenticate("sk-old-secret")
    assert key is not None and key.name == "alice"
    keys.close()
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_migrating_twice_changes_nothing(tmp_path: Path) -> None:
    conn = open_db(tmp_path / DB_FILENAME)
    assert migrate(conn) == SCHEMA_VERSION
    before = conn.total_changes
    assert migrate(conn) == SCHEMA_VERSION
    assert conn.total_changes == before


def test_each_step_of_the_migration_list_opens_in_the_current_code(tmp_path: Path) -> None:
    """A database left at any earlier version (any past release) migrates forward."""
    for version in range(SCHEMA_VERSION + 1):
        path = tmp_path / f"v{version}.db"
        conn = sqlite3.connect(path, isolation_level=None)
        for step in MIGRATIONS[:version]:
            step(conn)
        conn.execute(f"PRAGMA user_version = {version}")
        assert migrate(conn) == version
        assert schema_version(conn) == SCHEMA_VERSION
        conn.close()


def test_a_failing_migration_leaves_the_database_as_it_was(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = _unversioned_db(tmp_path)

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("gpuctl.store.migrations.MIGRATIONS", (*MIGRATIONS, broken))
    monkeypatch.setattr("gpuctl.store.migrations.SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(RuntimeError):
        open_db(path)
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 0
    tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "half_done" not in tables


def _from_the_future(state: Path) -> None:
    state.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(state / DB_FILENAME)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()


def test_a_database_from_a_newer_gpuctl_is_refused_with_a_hint(tmp_path: Path) -> None:
    _from_the_future(tmp_path)
    with pytest.raises(SchemaTooNew) as caught:
        Store.open(tmp_path)
    assert f"schema version {SCHEMA_VERSION + 1}" in caught.value.message
    assert caught.value.hint is not None and "Upgrade gpuctl" in caught.value.hint
    assert caught.value.exit_code == 1


def test_the_cli_exits_1_with_a_hint_on_a_newer_database(gpuctl_home: Path) -> None:
    _from_the_future(gpuctl_home / "state")
    result = CliRunner().invoke(app, ["keys", "list"])
    assert result.exit_code == 1
    assert "newer gpuctl" in result.output
    assert "Hint: Upgrade gpuctl" in result.output
