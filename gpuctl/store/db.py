"""One SQLite database under the state dir, in WAL mode, shared by the store's tables.

Each table module passes its own ``CREATE TABLE IF NOT EXISTS`` statements to ``open_db``,
so the schema stays next to the code that uses it. SQLite in WAL mode lets ``gpuctl keys``
write while ``gpuctl serve`` reads; ``PRAGMA data_version`` tells a reader cheaply that
another connection changed something.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

__all__ = ["DB_FILENAME", "data_version", "open_db"]

DB_FILENAME = "gpuctl.db"


def open_db(path: Path, schema: Iterable[str] = ()) -> sqlite3.Connection:
    """Open (creating if needed) the database at ``path`` and apply ``schema`` statements."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    for statement in schema:
        conn.execute(statement)
    return conn


def data_version(conn: sqlite3.Connection) -> int:
    """Changes when *another* connection commits; costs a few microseconds."""
    row = conn.execute("PRAGMA data_version").fetchone()
    return int(row[0])
