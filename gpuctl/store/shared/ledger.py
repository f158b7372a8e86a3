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
from collections.abc import Iterator, Sequence
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
#: Each column's type as the dataclass declares it (``str | None`` may be null).
_ROW_TYPES = tuple((f.name, str(f.type)) for f in fields(RequestRow))
_EVENT_TYPES = (("gpu_id", "str"), ("at", "float"), ("status", "str"), ("cause", "str"),
                ("flavour", "str"))


def _typed(data: Any, columns: tuple[tuple[str, str], ...]) -> list[Any]:
    """``data``'s values in column order, each of its column's type (finite numbers), or
    ``ValueError``: another store's row is checked before it enters this one's ledger."""
    if not isinstance(data, dict):
        raise ValueError("not an object")
    values: list[Any] = []
    for name, kind in columns:
        value = data.get(name)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if value is None and kind.endswith("| None"):
            values.append(None)
        elif kind.startswith("float") and number and math.isfinite(float(value or 0)):
            values.append(float(value or 0))
        elif (kind.startswith("str") and isinstance(value, str)) or (
                kind.startswith("int") and number and isinstance(value, int)):
            values.append(value)
        else:
            raise ValueError(f"{name} is not a {kind}: {value!r}")
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
        entries = ([Entry(self.origin, f"r{r[0]}", "request",
                          dict(zip(_ROW_COLUMNS, r[1:], strict=True))) for r in rows]
                   + [Entry(self.origin, f"t{e[0]}", "event",
                            dict(zip(_EVENT_COLUMNS, e[1:], strict=True))) for e in events]
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
        epoch, found = await self.journal.read(self._get("journal_read") or "0-0", count)
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
        new = 0
        facts: list[Entry] = []
        with self._transaction():
            for entry_id, batch in found:
                for entry in batch:
                    if entry.origin == self.origin:
                        break  # a batch of ours
                    if entry.kind in ("request", "event"):
                        with self._skipping(entry_id, entry):
                            new += self._fold_row(entry, learner)
                    else:
                        facts.append(entry)
            self._mark("journal_read", found[-1][0])
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

    def _fold_row(self, entry: Entry, learner: Learner | None) -> int:
        data = entry.data
        if entry.kind == "request":
            values = _typed(data, _ROW_TYPES)
            cur = self.conn.execute(
                f"INSERT OR IGNORE INTO request_log ({', '.join(_ROW_COLUMNS)}, origin) "
                f"VALUES ({', '.join('?' for _ in _ROW_COLUMNS)}, ?)", (*values, entry.key))
            if not cur.rowcount:
                return 0
            row = RequestRow(*values)
            if row.gpu_id is not None and row.served_at is not None:
                # A request that held a slot there: the user's totals (``keys list``) too,
                # as the serving replica's own store counts it.
                self.store.record_usage(row.user, tokens_in=row.tokens_in,
                                        tokens_out=row.tokens_out, gpu_seconds=row.service_s,
                                        at=row.served_at + row.service_s)
            if learner is not None:
                learner.learn_request(row)
            return 1
        cur = self.conn.execute(
            f"INSERT OR IGNORE INTO gpu_timeline ({', '.join(_EVENT_COLUMNS)}, origin) "
            "VALUES (?, ?, ?, ?, ?, ?)", (*_typed(data, _EVENT_TYPES), entry.key))
        return int(cur.rowcount > 0)

    def _fold_fact(self, entry: Entry, learner: Learner | None) -> int:
        data = entry.data
        kind = entry.kind
        if kind == "models":
            gpu, at = _typed(data, (("gpu", "str"), ("at", "float")))
            models = data.get("models")
            if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
                raise ValueError(f"models is not a list of objects: {models!r}")
            self.store.save_models(gpu, models, at)
            if learner is not None:
                learner.learn_models(gpu, models)
        elif kind == "resume":
            gpu, seconds, at, reason = _typed(data, (
                ("gpu", "str"), ("seconds", "float"), ("at", "float"), ("reason", "str | None")))
            ok = data.get("ok") is True
            self.store.record_resume(gpu, seconds, ok=ok, at=at, reason=reason)
            if learner is not None:
                learner.learn_resume(gpu, seconds, ok=ok)
        elif kind == "load":
            model, seconds, at = _typed(data, (
                ("model", "str"), ("seconds", "float"), ("at", "float")))
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
                entries.append(Entry(self.origin, ident, kind,
                                     dict(zip(columns, tuple(r)[1:], strict=True))))
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
