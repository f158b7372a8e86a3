"""The engine's durable memory: leases, known models, resume history, pending actions, usage.

Everything here survives a restart of ``gpuctl serve``, because forgetting it costs money or
users: a forgotten lease lets a GPU be paused under someone's feet, a forgotten resume in
flight makes the engine resume the same GPU twice, forgotten model lists make a typo wake a
GPU on every request.

The hot path (``Engine.acquire``/``release``) never waits on the disk. Usage is summed in
memory and written by ``flush`` (the engine calls it every poll interval and at stop); leases
are written the same way through ``save_leases``. Rare events (a resume finished, a model
list changed, a cloud action started) are written at once.

One writer per piece of state: leases and usage belong to the gateway that serves the
requests behind them. A laptop command (``gpuctl status``, ``resume``...) opens the same
database as a *reader* (``Store.open(dir, reader=True)``): it may read the leases to show
them, and record what it learns or does first-hand (a model list it probed, a resume it
sent), but ``save_leases`` and ``record_usage`` refuse, so it can never write back the
gateway's leases from its own (possibly empty, possibly stale) copy.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuctl.store.db import DB_FILENAME, memory_db, open_db
from gpuctl.store.ledger import LedgerStore, RequestRow

__all__ = ["LeaseRecord", "NotTheWriter", "PendingAction", "Store", "UsageTotals"]

#: How many past resumes per GPU feed the estimate; old ones describe another cloud mood.
HISTORY_KEEP = 20


class NotTheWriter(RuntimeError):
    """A reader store was asked to write state that only the gateway writes (a bug)."""


@dataclass
class UsageTotals:
    """What one user has used, summed over all time (for ``gpuctl keys list``)."""

    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    gpu_seconds: float = 0.0
    last_at: float | None = None

    def add(self, other: UsageTotals) -> None:
        self.requests += other.requests
        self.tokens_in += other.tokens_in
        self.tokens_out += other.tokens_out
        self.gpu_seconds += other.gpu_seconds
        if other.last_at is not None:
            self.last_at = max(self.last_at or other.last_at, other.last_at)


@dataclass(frozen=True)
class LeaseRecord:
    gpu_id: str
    user: str
    expires_at: float  # wall-clock seconds
    seconds: float = 0.0  # the lease's length after each request


@dataclass(frozen=True)
class PendingAction:
    gpu_id: str
    action: str  # "resume" or "pause"
    started_at: float  # wall-clock seconds


class Store:
    """The SQLite store at ``state_dir / "gpuctl.db"`` (shared with the key table)."""

    def __init__(self, conn: sqlite3.Connection, path: Path, *, reader: bool = False) -> None:
        self.conn = conn
        self.path = path
        #: Not the gateway: leases and usage may be read, never written.
        self.reader = reader
        self._usage: dict[str, UsageTotals] = {}
        #: The ledger's tables (GPU timeline, request log, roll-ups, budgets).
        self.ledger = LedgerStore(conn)
        #: Replicas (``store.url``): told of each model list, resume and load written here,
        #: so the other replicas learn them too (``store.shared.ledger``). None: one gateway.
        self.tap: Callable[[str, dict[str, Any]], None] | None = None

    @classmethod
    def open(cls, state_dir: Path, *, reader: bool = False) -> Store:
        """The store in ``state_dir``; ``reader`` for every process that is not the gateway."""
        path = Path(state_dir) / DB_FILENAME
        return cls(open_db(path), path, reader=reader)

    def _writer_only(self, what: str) -> None:
        if self.reader:
            raise NotTheWriter(f"only the gateway writes {what}; this store was opened to read")

    @classmethod
    def memory(cls) -> Store:
        """A throw-away store (tests, benchmarks, ``serve --demo``)."""
        return cls(memory_db(), Path(":memory:"))

    def close(self) -> None:
        self.flush()
        self.conn.close()

    # -- usage ledger ----------------------------------------------------------------------

    def record_usage(
        self, user: str, *, tokens_in: int = 0, tokens_out: int = 0, gpu_seconds: float = 0.0,
        at: float | None = None,
    ) -> None:
        """Add one served request to the in-memory ledger; ``flush`` writes it (O(1))."""
        self._writer_only("usage")
        totals = self._usage.get(user)
        if totals is None:
            totals = self._usage[user] = UsageTotals()
        totals.requests += 1
        totals.tokens_in += tokens_in
        totals.tokens_out += tokens_out
        totals.gpu_seconds += gpu_seconds
        if at is not None:
            totals.last_at = at

    def requests(self, since: float, until: float, limit: int | None = None) -> list[RequestRow]:
        """The requests that arrived in ``[since, until)`` (wall-clock seconds), oldest first;
        only the first ``limit`` when given.

        Typed rows with arrival time, user, model, GPU, service seconds and tokens out; see
        ``gpuctl.store.ledger.RequestRow``. Rows not yet flushed are included.
        """
        return self.ledger.requests(since, until, limit)

    def flush(self) -> None:
        """Write the usage summed and the request rows kept since the last flush."""
        self.ledger.flush()
        if not self._usage:
            return
        pending, self._usage = self._usage, {}
        with self._transaction():
            self.conn.executemany(
                """INSERT INTO usage (user, requests, tokens_in, tokens_out, gpu_seconds, last_at)
                VALUES (?, ?, ?, ?, ?, ?)
                ON CONFLICT (user) DO UPDATE SET
                    requests = requests + excluded.requests,
                    tokens_in = tokens_in + excluded.tokens_in,
                    tokens_out = tokens_out + excluded.tokens_out,
                    gpu_seconds = gpu_seconds + excluded.gpu_seconds,
                    last_at = COALESCE(excluded.last_at, last_at)""",
                [
                    (user, t.requests, t.tokens_in, t.tokens_out, t.gpu_seconds, t.last_at)
                    for user, t in pending.items()
                ],
            )

    def usage(self) -> dict[str, UsageTotals]:
        """Usage per user, including what is not yet flushed."""
        result: dict[str, UsageTotals] = {}
        for row in self.conn.execute(
            "SELECT user, requests, tokens_in, tokens_out, gpu_seconds, last_at FROM usage"
        ):
            result[row["user"]] = UsageTotals(
                row["requests"], row["tokens_in"], row["tokens_out"], row["gpu_seconds"],
                row["last_at"],
            )
        for user, pending in self._usage.items():
            result.setdefault(user, UsageTotals()).add(pending)
        return result

    # -- leases ------------------------------------------------------------------------------

    def save_leases(self, leases: Iterable[LeaseRecord]) -> None:
        """Replace the stored leases with ``leases`` (the engine's whole current set)."""
        self._writer_only("leases")
        with self._transaction():
            self.conn.execute("DELETE FROM leases")
            self.conn.executemany(
                "INSERT INTO leases (gpu_id, user, expires_at, seconds) VALUES (?, ?, ?, ?)",
                [(r.gpu_id, r.user, r.expires_at, r.seconds) for r in leases],
            )

    def load_leases(self, now_wall: float) -> list[LeaseRecord]:
        """The leases that have not expired by ``now_wall``."""
        rows = self.conn.execute(
            "SELECT gpu_id, user, expires_at, seconds FROM leases WHERE expires_at > ?",
            (now_wall,),
        )
        return [
            LeaseRecord(r["gpu_id"], r["user"], r["expires_at"], r["seconds"]) for r in rows
        ]

    # -- known models --------------------------------------------------------------------------

    def save_models(self, gpu_id: str, models: Sequence[Mapping[str, Any]], at: float) -> None:
        """Remember a GPU's model list (``/api/tags`` entries), so paused GPUs still list it."""
        self.conn.execute(
            """INSERT INTO known_models (gpu_id, models, seen_at) VALUES (?, ?, ?)
            ON CONFLICT (gpu_id) DO UPDATE SET models = excluded.models,
                seen_at = excluded.seen_at""",
            (gpu_id, json.dumps(list(models)), at),
        )
        if self.tap is not None:
            self.tap("models", {"gpu": gpu_id, "models": list(models), "at": at})

    def known_models(self) -> dict[str, list[dict[str, Any]]]:
        """Models per GPU as last seen; a GPU missing here was never seen awake."""
        return {
            r["gpu_id"]: list(json.loads(r["models"]))
            for r in self.conn.execute("SELECT gpu_id, models FROM known_models")
        }

    # -- resume and load history ---------------------------------------------------------------

    def record_resume(
        self, gpu_id: str, seconds: float, *, ok: bool, at: float, reason: str | None = None
    ) -> None:
        with self._transaction():
            self.conn.execute(
                "INSERT INTO resume_history (gpu_id, seconds, ok, at, reason) VALUES (?,?,?,?,?)",
                (gpu_id, seconds, int(ok), at, reason),
            )
            self.conn.execute(
                """DELETE FROM resume_history WHERE gpu_id = ? AND rowid NOT IN (
                    SELECT rowid FROM resume_history WHERE gpu_id = ?
                    ORDER BY at DESC LIMIT ?)""",
                (gpu_id, gpu_id, HISTORY_KEEP),
            )
        if self.tap is not None:
            self.tap("resume", {"gpu": gpu_id, "seconds": seconds, "ok": ok, "at": at,
                                "reason": reason})

    def resume_history(self) -> dict[str, list[tuple[float, bool]]]:
        """Past resumes per GPU, oldest first: (seconds, succeeded)."""
        history: dict[str, list[tuple[float, bool]]] = {}
        for r in self.conn.execute(
            "SELECT gpu_id, seconds, ok FROM resume_history ORDER BY at"
        ):
            history.setdefault(r["gpu_id"], []).append((r["seconds"], bool(r["ok"])))
        return history

    def record_load(self, model: str, seconds: float, at: float) -> None:
        """Keep a load time, and only the newest ``HISTORY_KEEP`` per model (as resumes)."""
        with self._transaction():
            self.conn.execute(
                "INSERT INTO load_history (model, seconds, at) VALUES (?, ?, ?)",
                (model, seconds, at),
            )
            self.conn.execute(
                """DELETE FROM load_history WHERE model = ? AND rowid NOT IN (
                    SELECT rowid FROM load_history WHERE model = ?
                    ORDER BY at DESC LIMIT ?)""",
                (model, model, HISTORY_KEEP),
            )
        if self.tap is not None:
            self.tap("load", {"model": model, "seconds": seconds, "at": at})

    def load_history(self) -> dict[str, list[float]]:
        history: dict[str, list[float]] = {}
        for r in self.conn.execute("SELECT model, seconds FROM load_history ORDER BY at"):
            history.setdefault(r["model"], []).append(r["seconds"])
        return {model: times[-HISTORY_KEEP:] for model, times in history.items()}

    # -- pending cloud actions -----------------------------------------------------------------

    def begin_action(self, gpu_id: str, action: str, at: float) -> None:
        """Remember a cloud action in flight, so a restarted engine adopts it, not repeats it."""
        self.conn.execute(
            """INSERT INTO pending_actions (gpu_id, action, started_at) VALUES (?, ?, ?)
            ON CONFLICT (gpu_id) DO UPDATE SET action = excluded.action,
                started_at = excluded.started_at""",
            (gpu_id, action, at),
        )

    def end_action(self, gpu_id: str) -> None:
        self.conn.execute("DELETE FROM pending_actions WHERE gpu_id = ?", (gpu_id,))

    def pending_actions(self) -> dict[str, PendingAction]:
        return {
            r["gpu_id"]: PendingAction(r["gpu_id"], r["action"], r["started_at"])
            for r in self.conn.execute("SELECT gpu_id, action, started_at FROM pending_actions")
        }

    # -- helpers -------------------------------------------------------------------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self.conn)


class _Transaction:
    """``BEGIN``/``COMMIT`` around a block (the connection runs in autocommit mode)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")
