"""The ledger's tables: the GPU timeline, the request log, and daily roll-ups.

Two append-mostly tables are the source of truth for cost (``engine/attribution.py`` turns
them into GPU-seconds per user and per reason):

- ``gpu_timeline``: every observed status change of every GPU, with its instant (wall-clock
  seconds), what caused it and the GPU's flavour. Rare, and the record of money being spent,
  so each change is written at once; the engine writes the changes it causes *before* it asks
  the cloud, so a gateway killed mid-action still knows why the GPU was billed.
- ``request_log``: one row per request. Frequent, so rows are kept in memory and written in
  one transaction by ``flush`` (the engine calls it every poll interval): a gateway killed
  with SIGKILL loses at most one interval of rows, and no request waits on the disk. The
  pending list is bounded (``PENDING_MAX``); past it rows are counted as dropped, not kept.

Retention (``ledger.keep_days``) deletes old request rows after summing them into
``usage_daily`` (per day, per user, GPU and model), which is kept for good; the timeline is a
few rows per GPU per day and is kept whole.

``requests(since, until)`` is the documented reader other parts (``gpuctl simulate``) use.
"""

from __future__ import annotations

import operator
import sqlite3
from collections.abc import Iterable
from dataclasses import astuple, dataclass, fields

__all__ = ["PENDING_MAX", "DailyRollup", "LedgerStore", "RequestRow", "TimelineEvent"]

#: Request rows kept in memory between two flushes, at most (a flood is counted, not kept).
PENDING_MAX = 100_000


@dataclass(slots=True)
class RequestRow:
    """One request as the ledger keeps it. Times are wall-clock seconds since the epoch.

    ``at`` is the arrival; ``queued_s`` the wait for a slot or a wake; ``wake_gpu`` the GPU
    whose wake it waited for (None: it did not wait for a wake); ``served_at`` and
    ``service_s`` the interval it held a slot on ``gpu_id``; ``lease_s`` the lease that
    request left its user on that GPU; ``outcome`` is ``ok``, ``error``, ``cancelled`` (by
    the client) or ``refused`` (answered without reaching a GPU: queue full, budget, ...).
    """

    at: float
    key_id: str
    user: str
    route: str
    model: str
    gpu_id: str | None = None
    status: int = 0
    queued_s: float = 0.0
    wake_gpu: str | None = None
    ttfb_s: float | None = None
    duration_s: float = 0.0
    served_at: float | None = None
    service_s: float = 0.0
    lease_s: float = 0.0
    tokens_in: int = 0
    tokens_out: int = 0
    outcome: str = "ok"

    @property
    def cold(self) -> bool:
        """It waited for a GPU to wake."""
        return self.wake_gpu is not None


_COLUMNS = tuple(f.name for f in fields(RequestRow))
#: A row's values in column order (``dataclasses.astuple`` deep-copies: 5x slower).
_values = operator.attrgetter(*_COLUMNS)
_INSERT = (
    f"INSERT INTO request_log ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _COLUMNS)})"
)


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    """A GPU's status from ``at`` on: a cloud status (``paused``, ``resuming``, ``running``,
    ``pausing``, or whatever else the cloud says), ``ready`` (Ollama answered) or ``failed``
    (a resume gave up). ``cause`` says who: ``gateway`` (a wake for requests or an idle
    pause), ``probe`` (a wake to learn a GPU's models), ``hand`` (``gpuctl resume``/``pause``
    or the admin API), ``outside`` (seen on a poll, caused by nobody gpuctl knows), or
    ``observed`` (the consequence of an action under way, as the cloud reports it)."""

    gpu_id: str
    at: float
    status: str
    cause: str
    flavour: str = ""


@dataclass(frozen=True, slots=True)
class DailyRollup:
    """One day (UTC, ``YYYY-MM-DD``) of one user, GPU or model, kept after its rows are gone.

    ``by = "reason"`` rows hold a day's ``unattributed`` seconds of one reason; a ``by =
    "fleet"`` row (all zeros) marks a day as rolled up, with or without activity.
    """

    day: str
    by: str  # "user", "gpu", "model", "reason" or "fleet"
    key: str
    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cold: int = 0
    serving: float = 0.0
    waking: float = 0.0
    held: float = 0.0
    credits: float = 0.0
    unattributed: float = 0.0


class LedgerStore:
    """The ledger's tables on the store's connection, and the batch of unwritten rows."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._pending: list[RequestRow] = []
        #: Rows not kept because ``PENDING_MAX`` rows were already waiting for a flush.
        self.dropped = 0

    # -- the request log ---------------------------------------------------------------

    def add_request(self, row: RequestRow) -> None:
        """Keep one request's row for the next flush (O(1), no disk)."""
        if len(self._pending) >= PENDING_MAX:
            self.dropped += 1
            return
        self._pending.append(row)

    def flush(self) -> int:
        """Write the rows kept since the last flush in one transaction; returns how many."""
        if not self._pending:
            return 0
        pending, self._pending = self._pending, []
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany(_INSERT, map(_values, pending))
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return len(pending)

    def requests(self, since: float, until: float, limit: int | None = None) -> list[RequestRow]:
        """The requests that arrived in ``[since, until)``, oldest first, unflushed included;
        only the first ``limit`` of them when given (a bounded read).

        The reader for reports and for ``gpuctl simulate --since``: each row carries the
        arrival time, user, model, GPU, service seconds and tokens out (see ``RequestRow``).
        """
        query = (f"SELECT {', '.join(_COLUMNS)} FROM request_log WHERE at >= ? AND at < ? "
                 "ORDER BY at")
        args: tuple[float | int, ...] = (since, until)
        if limit is not None:
            query += " LIMIT ?"
            args += (max(0, limit),)
        rows = [RequestRow(*tuple(r)) for r in self.conn.execute(query, args)]
        rows += [r for r in self._pending if since <= r.at < until]
        rows.sort(key=lambda r: r.at)
        return rows if limit is None else rows[:max(0, limit)]

    def serving_overlapping(self, since: float, until: float) -> list[RequestRow]:
        """Requests whose slot, wait or lease may reach into ``[since, until)``.

        Attribution of a window needs the requests that arrived before it and still served,
        waited or held a lease inside it; ``horizon`` bounds how far back to look.
        """
        return self.requests(since - _HORIZON, until)

    # -- the timeline ------------------------------------------------------------------

    def add_event(self, event: TimelineEvent) -> None:
        """Write one status change now (rare; must survive a crash of the gateway)."""
        self.conn.execute(
            "INSERT INTO gpu_timeline (gpu_id, at, status, cause, flavour) VALUES (?,?,?,?,?)",
            (event.gpu_id, event.at, event.status, event.cause, event.flavour),
        )

    def last_events(self) -> dict[str, TimelineEvent]:
        """The latest event of every GPU (what a restarted engine knew last)."""
        return {
            r["gpu_id"]: TimelineEvent(r["gpu_id"], r["at"], r["status"], r["cause"],
                                       r["flavour"])
            for r in self.conn.execute(
                """SELECT t.gpu_id, t.at, t.status, t.cause, t.flavour FROM gpu_timeline t
                JOIN (SELECT gpu_id, MAX(rowid) AS last FROM gpu_timeline GROUP BY gpu_id) m
                ON t.rowid = m.last"""
            )
        }

    def last_event(self, gpu_id: str) -> TimelineEvent | None:
        r = self.conn.execute(
            "SELECT gpu_id, at, status, cause, flavour FROM gpu_timeline WHERE gpu_id = ? "
            "ORDER BY rowid DESC LIMIT 1", (gpu_id,),
        ).fetchone()
        if r is None:
            return None
        return TimelineEvent(r["gpu_id"], r["at"], r["status"], r["cause"], r["flavour"])

    def timeline(self, until: float, since: float | None = None) -> list[TimelineEvent]:
        """The events before ``until`` in order; with ``since``, only those from ``since``
        on (callers look back far enough to see the phase a window begins in)."""
        start = float("-inf") if since is None else since
        return [
            TimelineEvent(r["gpu_id"], r["at"], r["status"], r["cause"], r["flavour"])
            for r in self.conn.execute(
                "SELECT gpu_id, at, status, cause, flavour FROM gpu_timeline "
                "WHERE at < ? AND at >= ? ORDER BY at, rowid", (until, start),
            )
        ]

    # -- roll-ups and retention ----------------------------------------------------------

    def rollups(self, since_day: str, until_day: str) -> list[DailyRollup]:
        """Roll-ups of the days in ``[since_day, until_day)``."""
        return [
            DailyRollup(*tuple(r))
            for r in self.conn.execute(
                "SELECT day, by, key, requests, tokens_in, tokens_out, cold, serving, waking,"
                " held, credits, unattributed FROM usage_daily WHERE day >= ? AND day < ? "
                "ORDER BY day, by, key", (since_day, until_day),
            )
        ]

    def last_rollup_day(self) -> str | None:
        """The last day rolled up (``YYYY-MM-DD``), if any."""
        row = self.conn.execute("SELECT MAX(day) FROM usage_daily").fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def first_event(self) -> float | None:
        row = self.conn.execute("SELECT MIN(at) FROM gpu_timeline").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def oldest_request(self) -> float | None:
        row = self.conn.execute("SELECT MIN(at) FROM request_log").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def retire(self, before: float, rollups: Iterable[DailyRollup]) -> int:
        """Add ``rollups`` and delete the request rows older than ``before``, atomically."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.executemany(
                """INSERT INTO usage_daily (day, by, key, requests, tokens_in, tokens_out,
                    cold, serving, waking, held, credits, unattributed)
                VALUES (?,?,?,?,?,?,?,?,?,?,?,?)
                ON CONFLICT (day, by, key) DO UPDATE SET
                    requests = requests + excluded.requests,
                    tokens_in = tokens_in + excluded.tokens_in,
                    tokens_out = tokens_out + excluded.tokens_out,
                    cold = cold + excluded.cold, serving = serving + excluded.serving,
                    waking = waking + excluded.waking, held = held + excluded.held,
                    credits = credits + excluded.credits,
                    unattributed = unattributed + excluded.unattributed""",
                [astuple(r) for r in rollups],
            )
            deleted = self.conn.execute(
                "DELETE FROM request_log WHERE at < ?", (before,)
            ).rowcount
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return int(deleted)

    # -- budgets -----------------------------------------------------------------------

    def set_budget(self, key_id: str, gpu_seconds: float | None, per: str = "day") -> None:
        """Give ``key_id`` a budget of GPU-seconds per day/week/month; None removes it."""
        if gpu_seconds is None:
            self.conn.execute("DELETE FROM budgets WHERE key_id = ?", (key_id,))
            return
        self.conn.execute(
            """INSERT INTO budgets (key_id, gpu_seconds, per) VALUES (?, ?, ?)
            ON CONFLICT (key_id) DO UPDATE SET gpu_seconds = excluded.gpu_seconds,
                per = excluded.per""",
            (key_id, gpu_seconds, per),
        )

    def budgets(self) -> dict[str, tuple[float, str]]:
        """Key id → (GPU-seconds, period) for every key with a budget."""
        return {
            r["key_id"]: (float(r["gpu_seconds"]), str(r["per"]))
            for r in self.conn.execute("SELECT key_id, gpu_seconds, per FROM budgets")
        }


#: How far before a window a request may have arrived and still count in it: the longest
#: wait plus service plus lease a request can leave behind (a day is ample).
_HORIZON = 86_400.0
