"""The store's schema, as an ordered, append-only list of migrations.

SQLite keeps one integer in the file header, ``PRAGMA user_version``: the number of
migrations applied to that database. Opening a database applies the ones it lacks, in
order, in one transaction, so a database made by any release of gpuctl opens in every later
one (the way simonw's ``llm`` keeps its ``migrations.py``). A database whose version is
higher than the code knows was written by a newer gpuctl: it is refused with a clear error
rather than half-understood, since an older writer could silently corrupt columns it does not
know about.

Rules for whoever adds a migration: append a function to ``MIGRATIONS``, never edit or
reorder one that has shipped, and write it so that it works on the database the previous
migrations left (``ALTER TABLE ... ADD COLUMN``, new tables, data copies). Migration 1 is
the schema of the releases before versioning; its ``IF NOT EXISTS`` lets a database of those
releases (version 0 with the tables present) take it as a no-op.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from gpuctl.errors import SchemaTooNew

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "migrate", "schema_version"]

Migration = Callable[[sqlite3.Connection], None]


def _m001_initial(conn: sqlite3.Connection) -> None:
    """The schema gpuctl shipped without a version: keys, leases, history, usage."""
    for statement in (
        """CREATE TABLE IF NOT EXISTS api_keys (
            id TEXT PRIMARY KEY,
            key_hash TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL,
            email TEXT NOT NULL DEFAULT '',
            role TEXT NOT NULL DEFAULT 'user',
            created REAL NOT NULL,
            last_used REAL,
            revoked REAL
        )""",
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
    ):
        conn.execute(statement)


def _m002_ledger(conn: sqlite3.Connection) -> None:
    """The ledger: every GPU status change, one row per request, and daily roll-ups."""
    for statement in (
        """CREATE TABLE gpu_timeline (
            gpu_id TEXT NOT NULL, at REAL NOT NULL, status TEXT NOT NULL,
            cause TEXT NOT NULL, flavour TEXT NOT NULL DEFAULT '')""",
        "CREATE INDEX gpu_timeline_gpu_at ON gpu_timeline (gpu_id, at)",
        "CREATE INDEX gpu_timeline_at ON gpu_timeline (at)",
        """CREATE TABLE request_log (
            at REAL NOT NULL, key_id TEXT NOT NULL, user TEXT NOT NULL, route TEXT NOT NULL,
            model TEXT NOT NULL, gpu_id TEXT, status INTEGER NOT NULL,
            queued_s REAL NOT NULL DEFAULT 0, wake_gpu TEXT, ttfb_s REAL,
            duration_s REAL NOT NULL DEFAULT 0, served_at REAL,
            service_s REAL NOT NULL DEFAULT 0, lease_s REAL NOT NULL DEFAULT 0,
            tokens_in INTEGER NOT NULL DEFAULT 0, tokens_out INTEGER NOT NULL DEFAULT 0,
            outcome TEXT NOT NULL)""",
        "CREATE INDEX request_log_at ON request_log (at)",
        """CREATE TABLE usage_daily (
            day TEXT NOT NULL, by TEXT NOT NULL, key TEXT NOT NULL,
            requests INTEGER NOT NULL DEFAULT 0, tokens_in INTEGER NOT NULL DEFAULT 0,
            tokens_out INTEGER NOT NULL DEFAULT 0, cold INTEGER NOT NULL DEFAULT 0,
            serving REAL NOT NULL DEFAULT 0, waking REAL NOT NULL DEFAULT 0,
            held REAL NOT NULL DEFAULT 0, credits REAL NOT NULL DEFAULT 0,
            unattributed REAL NOT NULL DEFAULT 0, PRIMARY KEY (day, by, key))""",
        """CREATE TABLE budgets (
            key_id TEXT PRIMARY KEY, gpu_seconds REAL NOT NULL, per TEXT NOT NULL)""",
    ):
        conn.execute(statement)


def _m003_origins(conn: sqlite3.Connection) -> None:
    """Replicas: each ledger row shared through Redis carries its origin (the replica's
    store id and the row's id there), unique, so a row folded in twice is kept once; and
    what this store has published and read of the shared journal. The indexes are partial:
    a single gateway (no origins) pays nothing for them."""
    for statement in (
        "ALTER TABLE request_log ADD COLUMN origin TEXT",
        "ALTER TABLE gpu_timeline ADD COLUMN origin TEXT",
        "CREATE UNIQUE INDEX request_log_origin ON request_log (origin) "
        "WHERE origin IS NOT NULL",
        "CREATE UNIQUE INDEX gpu_timeline_origin ON gpu_timeline (origin) "
        "WHERE origin IS NOT NULL",
        "CREATE TABLE replica_state (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ):
        conn.execute(statement)


#: Applied in order; the position (1-based) is the ``user_version`` a database reaches.
MIGRATIONS: tuple[Migration, ...] = (
    _m001_initial,
    _m002_ledger,
    _m003_origins,
)

SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(conn: sqlite3.Connection) -> int:
    """The number of migrations the database at ``conn`` has taken."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, *, path: str = "") -> int:
    """Bring the database up to ``SCHEMA_VERSION``; returns the version it had before.

    Runs in one ``BEGIN IMMEDIATE`` transaction and re-reads the version inside it, so two
    processes opening a fresh database at once migrate it once. Raises ``SchemaTooNew`` for
    a database from a newer gpuctl. ``conn`` must be in autocommit mode
    (``isolation_level=None``).
    """
    before = schema_version(conn)
    if before == SCHEMA_VERSION:
        return before
    _refuse_newer(before, path)
    conn.execute("BEGIN IMMEDIATE")
    try:
        before = schema_version(conn)
        _refuse_newer(before, path)
        for number in range(before + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[number - 1](conn)
        # PRAGMA takes no parameters; the value is our own integer.
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return before


def _refuse_newer(version: int, path: str) -> None:
    if version > SCHEMA_VERSION:
        where = f" {path}" if path else ""
        raise SchemaTooNew(
            f"the database{where} has schema version {version}, but this gpuctl knows only "
            f"up to {SCHEMA_VERSION}: a newer gpuctl wrote it",
            hint="Upgrade gpuctl (`pipx upgrade gpuctl`), or point GPUCTL_HOME at another "
            "state directory.",
        )
