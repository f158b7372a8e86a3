"""One SQLite database under the state dir, in WAL mode, shared by the store's tables.

The schema is versioned: ``open_db`` applies the migrations the file lacks
(``migrations.py``) and refuses a file from a newer gpuctl. SQLite in WAL mode lets ``gpuctl keys``
write while ``gpuctl serve`` reads; ``PRAGMA data_version`` tells a reader cheaply that
another connection changed something.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from gpuctl.store.migrations import migrate

__all__ = ["DB_FILENAME", "data_version", "memory_db", "open_db"]

DB_FILENAME = "gpuctl.db"


def open_db(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the database at ``path``, migrated to the current schema.

    Raises ``SchemaTooNew`` (and closes the file) when a newer gpuctl wrote it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    try:
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        migrate(conn, path=str(path))
    except BaseException:
        conn.close()
        raise
    return conn


def memory_db() -> sqlite3.Connection:
    """A throw-away database with the current schema (tests, benchmarks, the demo)."""
    conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    migrate(conn)
    return conn


def data_version(conn: sqlite3.Connection) -> int:
    """Changes when *another* connection commits; costs a few microseconds."""
    row = conn.execute("PRAGMA data_version").fetchone()
    return int(row[0])
