"""One ledger for a group of replicas: each publishes what it wrote, each folds in the rest.

Every replica keeps writing its own SQLite store exactly as a single gateway does (request
rows flushed in batches, timeline events at once, model lists and resume/load times as they
are learnt), so nothing on a request's path changes and nothing is lost while Redis is
down. In the background (``engine.sharing``) the replica:

- **publishes** the rows of its store that have no origin yet (its own) to the journal
  (``store.shared.journal``), then stamps them with their origin (``{store id}:r{rowid}``
  or ``:t{rowid}``): a row is stamped only once Redis took it, so rows made while Redis was
  unreachable, or before a crash, go out when it answers again. Model lists and resume and
  load times reach the journal through the store's ``tap`` (a bounded queue in memory: they
  are estimates, not money);
- **folds** in the journal's entries from other stores: request rows and timeline events
  with ``INSERT OR IGNORE`` on their origin (unique), so one read twice is kept once; model
  lists, resume and load times into the store and, through ``Learner``, into the engine.

So ``gpuctl usage``, ``/admin/usage`` and ``/admin/requests`` on any replica report the
whole group, a second or two behind. The GPU timeline stays one record: only the leader
writes it (``engine.ledger.Ledger.leading``), the others fold it in, so attributed +
unattributed = billed holds on every replica's store.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields
from typing import Any, Protocol

from gpuctl.store.ledger import RequestRow
from gpuctl.store.shared.journal import BATCH_FACTS, Entry, Journal
from gpuctl.store.store import Store

__all__ = ["BATCH", "Learner", "LedgerShare"]

log = logging.getLogger(__name__)

#: Most rows of a table published, or facts folded, in one call: each call runs on the
#: event loop without a pause, ~15 µs (publish) or ~26 µs (fold) a row, so a few ms.
BATCH = 400
#: Learnt facts (model lists, resume and load times) waiting for Redis, at most.
OUTBOX_MAX = 10_000
#: After Redis lost the journal, own rows this recent are published again.
REPUBLISH_SECONDS = 3600.0

_ROW_COLUMNS = tuple(f.name for f in fields(RequestRow))
_EVENT_COLUMNS = ("gpu_id", "at", "status", "cause", "flavour")
#: SQLite's INTEGER is 64-bit: a larger number from another store is refused, not stored.
_INT_LIMIT = 2**63
#: What a checker returns for a value not of its column's type.
_WRONG = object()
#: Most origins in one ``IN (...)`` (SQLite's variable limit is 999 on old builds).
_IN_LIMIT = 500


def _str(value: Any) -> Any:
    return value if type(value) is str else _WRONG


def _int(value: Any) -> Any:
    return value if type(value) is int and -_INT_LIMIT <= value < _INT_LIMIT else _WRONG


def _float(value: Any) -> Any:
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else _WRONG
    if kind is int and -_INT_LIMIT <= value < _INT_LIMIT:  # JSON writes 2.0 as 2 at times
        return float(value)
    return _WRONG


_CHECKS: dict[str, Callable[[Any], Any]] = {"str": _str, "int": _int, "float": _float}


def _column(name: str, kind: str) -> tuple[str, str, Callable[[Any], Any]]:
    """A column's name, its declared type (``"float | None"``), and its checker."""
    check = _CHECKS[kind.partition("|")[0].strip()]
    if kind.endswith("| None"):
        strict = check

        def check(value: Any) -> Any:
            return None if value is None else strict(value)
    return name, kind, check


_ROW_TYPES = tuple(_column(f.name, str(f.type)) for f in fields(RequestRow))
_EVENT_TYPES = tuple(_column(name, kind) for name, kind in (
    ("gpu_id", "str"), ("at", "float"), ("status", "str"), ("cause", "str"),
    ("flavour", "str")))
_MODELS_TYPES = (_column("gpu", "str"), _column("at", "float"))
_RESUME_TYPES = (_column("gpu", "str"), _column("seconds", "float"), _column("at", "float"),
                 _column("reason", "str | None"))
_LOAD_TYPES = (_column("model", "str"), _column("seconds", "float"), _column("at", "float"))


def _typed(data: Any, columns: tuple[tuple[str, str, Callable[[Any], Any]], ...]) -> list[Any]:
    """``data``'s values in column order, each of its column's type (finite numbers; whole
    numbers that fit SQLite's 64 bits), or ``ValueError``: another store's row is checked
    before it enters this one's ledger. On the fold's path: one call per value, no more.

    ``data`` is a list in column order (what ``publish`` sends) or an object by column name
    (facts, and rows from the first replicas, which sent objects)."""
    if isinstance(data, list):
        if len(data) != len(columns):
            raise ValueError(f"{len(data)} values for {len(columns)} columns")
        raw = data
    elif isinstance(data, dict):
        raw = [data.get(name) for name, _, _ in columns]
    else:
        raise ValueError("not a list or an object")
    values: list[Any] = []
    for (name, kind, check), value in zip(columns, raw, strict=True):
        checked = check(value)
        if checked is _WRONG:
            raise ValueError(f"{name} is not a {kind}: {value!r}"[:200])
        values.append(checked)
    return values


class Learner(Protocol):
    """What the engine takes in from other replicas (``Engine`` has these)."""

    def learn_models(self, gpu_id: str, models: Sequence[dict[str, Any]]) -> None: ...

    def learn_resume(self, gpu_id: str, seconds: float, *, ok: bool) -> None: ...

    def learn_load(self, model: str, seconds: float) -> None: ...

    def learn_request(self, row: RequestRow) -> None: ...


class LedgerShare:
    """This store's side of the group's ledger: publish its own rows, fold in the others'."""

    def __init__(self, store: Store, journal: Journal) -> None:
        self.store = store
        self.conn = store.conn
        self.journal = journal
        self.origin = self._get("origin") or self._new_origin()
        self._outbox: deque[Entry] = deque(maxlen=OUTBOX_MAX)
        self._ids = 0
        store.tap = self._tapped
        #: Counters for logs and tests.
        self.published = 0
        self.folded = 0
        self.skipped = 0
        self.behind = False

    # -- the store's own rows out ----------------------------------------------------------

    def _tapped(self, kind: str, data: dict[str, Any]) -> None:
        self._ids += 1
        self._outbox.append(Entry(self.origin, f"x{secrets.token_hex(4)}{self._ids}", kind,
                                  data))

    async def publish(self) -> int:
        """Send the rows and facts not yet published (one batch); how many went out."""
        self.store.flush()  # the request rows kept in memory become rows to publish
        rows, row_low, row_top = self._unpublished("request_log", _ROW_COLUMNS, "published_r")
        events, event_low, event_top = self._unpublished("gpu_timeline", _EVENT_COLUMNS,
                                                         "published_t")
        facts = list(self._outbox)
        # Rows go as lists in column order (``_typed``): half the bytes of an object each,
        # and about half the time to encode and decode.
        entries = ([Entry(self.origin, f"r{r[0]}", "request", list(r)[1:]) for r in rows]
                   + [Entry(self.origin, f"t{e[0]}", "event", list(e)[1:]) for e in events]
                   + facts)
        if not entries:
            self._mark("published_r", row_top)
            self._mark("published_t", event_top)
            return 0
        await self.journal.append(self.origin, entries)
        for _ in facts:
            self._outbox.popleft()
        with self._transaction():
            # Exactly the rows sent: those of the range with no origin (rows folded in since
            # have one; rows written since are past the range).
            for table, tag, low, top in (("request_log", "r", row_low, row_top),
                                         ("gpu_timeline", "t", event_low, event_top)):
                self.conn.execute(
                    f"UPDATE {table} SET origin = ? || rowid "
                    "WHERE rowid > ? AND rowid <= ? AND origin IS NULL",
                    (f"{self.origin}:{tag}", low, top))
            self._mark("published_r", row_top)
            self._mark("published_t", event_top)
        self.published += len(entries)
        return len(entries)

    def _unpublished(self, table: str, columns: tuple[str, ...], mark_key: str,
                     ) -> tuple[list[sqlite3.Row], int, int]:
        """This store's rows of ``table`` with no origin after the mark (one batch), the
        mark, and the mark to keep once they are out (every row up to it is out or not
        ours)."""
        top = int(self.conn.execute(f"SELECT COALESCE(MAX(rowid), 0) FROM {table}")
                  .fetchone()[0])
        mark = int(self._get(mark_key) or 0)
        if mark > top:  # retention deleted the newest rows; rowids may be reused
            mark = 0
        rows = self.conn.execute(
            f"SELECT rowid, {', '.join(columns)} FROM {table} "
            "WHERE rowid > ? AND rowid <= ? AND origin IS NULL ORDER BY rowid LIMIT ?",
            (mark, top, BATCH)).fetchall()
        return rows, mark, (int(rows[-1][0]) if len(rows) == BATCH else top)

    # -- the others' rows in ---------------------------------------------------------------

    async def fold(self, learner: Learner | None = None) -> int:
        """Take in one batch of the journal written by other stores; how many were new."""
        count = max(1, BATCH // BATCH_FACTS)
        epoch, found = await self.journal.read(self._get("journal_read") or "0-0", count,
                                               skip=self.origin)
        #: More entries wait after these: call again (``engine.sharing`` does, in a loop).
        self.behind = len(found) == count
        known = self._get("journal_epoch")
        if known is None:  # the first read of this store: from the start
            self._mark("journal_epoch", epoch)
        elif known != epoch:
            # Redis lost the journal (restarted empty): read the new one from its start,
            # and send our recent rows again, since what others had not read went with it.
            with self._transaction():
                self._mark("journal_epoch", epoch)
                self._mark("journal_read", "0-0")
            log.warning("the shared ledger's journal was lost (Redis restarted empty?); "
                        "publishing this replica's last hour again")
            await self._republish()
            return 0
        if not found:
            return 0
        requests: dict[str, list[Any]] = {}
        events: dict[str, list[Any]] = {}
        facts: list[Entry] = []
        for entry_id, batch in found:
            for entry in batch:
                if entry.origin == self.origin:
                    break  # a batch of ours
                if entry.kind == "request":
                    with self._skipping(entry_id, entry):
                        requests[entry.key] = _typed(entry.data, _ROW_TYPES)
                elif entry.kind == "event":
                    with self._skipping(entry_id, entry):
                        events[entry.key] = _typed(entry.data, _EVENT_TYPES)
                else:
                    facts.append(entry)
        with self._transaction():
            added = self._insert_new("request_log", _ROW_COLUMNS, requests)
            new = len(added) + len(self._insert_new("gpu_timeline", _EVENT_COLUMNS, events))
            self._mark("journal_read", found[-1][0])
        for values in added:
            row = RequestRow(*values)
            if row.gpu_id is not None and row.served_at is not None:
                # A request that held a slot there: the user's totals (``keys list``) too,
                # as the serving replica's own store counts it.
                self.store.record_usage(row.user, tokens_in=row.tokens_in,
                                        tokens_out=row.tokens_out, gpu_seconds=row.service_s,
                                        at=row.served_at + row.service_s)
            if learner is not None:
                learner.learn_request(row)
        with self._muted():  # each writes in its own transaction
            for entry in facts:
                with self._skipping("", entry):
                    new += self._fold_fact(entry, learner)
        self.folded += new
        return new

    @contextlib.contextmanager
    def _skipping(self, entry_id: str, entry: Entry) -> Iterator[None]:
        """An entry this store cannot take (a broken or newer writer) is logged and skipped:
        stopping there would stop the ledger of the whole group for this replica."""
        try:
            yield
        except (ValueError, KeyError, TypeError, AttributeError, sqlite3.Error) as exc:
            self.skipped += 1
            log.warning("skipped entry %s (%s from %s) of the shared ledger: %s",
                        entry_id, entry.kind, entry.origin, exc)

    def _insert_new(self, table: str, columns: tuple[str, ...],
                    rows: dict[str, list[Any]]) -> list[list[Any]]:
        """Insert the ``rows`` (by origin) this store lacks, in one statement; the values of
        those inserted. Inside the caller's transaction.

        The origins already here are looked up first, so a row read twice (a lost read
        position, a republish) is neither inserted nor counted again; then one
        ``executemany``, ~5x cheaper than a statement per row. Should the store still refuse
        a row the type checks let through, the batch goes again row by row, that row skipped.
        """
        if not rows:
            return []
        keys = list(rows)
        known: set[str] = set()
        for start in range(0, len(keys), _IN_LIMIT):
            part = keys[start:start + _IN_LIMIT]
            known.update(str(r[0]) for r in self.conn.execute(
                f"SELECT origin FROM {table} WHERE origin IN ({', '.join('?' * len(part))})",
                part))
        fresh = [key for key in keys if key not in known]
        insert = (f"INSERT OR IGNORE INTO {table} ({', '.join(columns)}, origin) "
                  f"VALUES ({', '.join('?' for _ in columns)}, ?)")
        self.conn.execute("SAVEPOINT fold_rows")
        try:
            self.conn.executemany(insert, [(*rows[key], key) for key in fresh])
        except (sqlite3.Error, OverflowError):
            self.conn.execute("ROLLBACK TO fold_rows")
            fresh = [key for key in fresh if self._insert_one(insert, table, key, rows[key])]
        self.conn.execute("RELEASE fold_rows")
        return [rows[key] for key in fresh]

    def _insert_one(self, insert: str, table: str, key: str, values: list[Any]) -> bool:
        try:
            return self.conn.execute(insert, (*values, key)).rowcount > 0
        except (sqlite3.Error, OverflowError) as exc:
            self.skipped += 1
            log.warning("skipped row %s of %s from the shared ledger: %s", key, table, exc)
            return False

    def _fold_fact(self, entry: Entry, learner: Learner | None) -> int:
        data = entry.data
        kind = entry.kind
        if kind == "models":
            gpu, at = _typed(data, _MODELS_TYPES)
            models = data.get("models")
            if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
                raise ValueError(f"models is not a list of objects: {models!r}")
            self.store.save_models(gpu, models, at)
            if learner is not None:
                learner.learn_models(gpu, models)
        elif kind == "resume":
            gpu, seconds, at, reason = _typed(data, _RESUME_TYPES)
            ok = data.get("ok") is True
            self.store.record_resume(gpu, seconds, ok=ok, at=at, reason=reason)
            if learner is not None:
                learner.learn_resume(gpu, seconds, ok=ok)
        elif kind == "load":
            model, seconds, at = _typed(data, _LOAD_TYPES)
            self.store.record_load(model, seconds, at)
            if learner is not None:
                learner.learn_load(model, seconds)
        else:
            log.warning("unknown kind %r in the shared ledger; skipped", kind)
            self.skipped += 1
            return 0
        return 1

    async def _republish(self) -> None:
        """Publish again this store's rows of the last ``REPUBLISH_SECONDS`` (already
        stamped; the others keep each once)."""
        since = time.time() - REPUBLISH_SECONDS
        own = f"{self.origin}:%"
        entries: list[Entry] = []
        for table, columns, kind in (("request_log", _ROW_COLUMNS, "request"),
                                     ("gpu_timeline", _EVENT_COLUMNS, "event")):
            for r in self.conn.execute(
                    f"SELECT origin, {', '.join(columns)} FROM {table} "
                    "WHERE at >= ? AND origin LIKE ? ORDER BY rowid", (since, own)):
                ident = str(r[0]).rpartition(":")[2]
                entries.append(Entry(self.origin, ident, kind, list(r)[1:]))
        for start in range(0, len(entries), BATCH):
            await self.journal.append(self.origin, entries[start:start + BATCH])

    # -- helpers ---------------------------------------------------------------------------

    def _get(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM replica_state WHERE key = ?",
                                (key,)).fetchone()
        return None if row is None else str(row[0])

    def _mark(self, key: str, value: object) -> None:
        self.conn.execute(
            "INSERT INTO replica_state (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, str(value)))

    def _new_origin(self) -> str:
        origin = secrets.token_hex(6)
        self._mark("origin", origin)
        return origin

    @contextlib.contextmanager
    def _muted(self) -> Iterator[None]:
        """Facts folded in are not published again."""
        tap, self.store.tap = self.store.tap, None
        try:
            yield
        finally:
            self.store.tap = tap

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
