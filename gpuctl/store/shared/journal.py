"""The replicas' journal: one Redis stream of ledger rows and learnt facts, read by all.

``{ns}:journal`` is a stream; each entry carries a batch of facts one replica wrote to its
own store and shares: request rows, GPU timeline events, a GPU's model list, resume and
load times. Its fields are ``o`` (the writing store's origin id) and ``d``: a JSON list of
``[ident, kind, data]``, ``ident`` the fact's id in that store, ``data`` a request row or a
timeline event as a list in column order, or a fact as an object. Batches, not one entry per
fact: the ``redis`` client's cost is per command and per field, so a hundred rows in one
entry cost about what one row costs alone (``tests/bench/bench_sharing.py``). Every replica
reads the stream from where it stopped (``XRANGE`` from the last id it read, never
blocking) and folds what others wrote into its own store (``store.shared.ledger``);
``(origin, ident)`` is unique, so a fact read twice is kept once.

The stream keeps ``KEEP_SECONDS`` (a day; trimmed by entry id, which is Redis's clock in
milliseconds, approximately, which is cheap): a replica that stays away longer misses the
rows written before (its own rows are never lost: they stay in its store). A day of a busy
group's requests is a few hundred bytes each (``bench_sharing.py`` prints the figure).
``{ns}:journal:epoch`` is a random token set once: a replica that finds it changed knows
Redis lost the stream (restarted empty), and publishes its recent rows again.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from gpuctl.store.shared.connect import text, unreachable

__all__ = ["BATCH_FACTS", "KEEP_SECONDS", "Entry", "Journal"]

log = logging.getLogger(__name__)

#: How long the stream keeps what was written: a replica away longer misses rows.
KEEP_SECONDS = 86_400.0
#: Most facts in one stream entry.
BATCH_FACTS = 200


@dataclass(frozen=True, slots=True)
class Entry:
    """One shared fact: ``origin`` (the store that wrote it), ``ident`` (its id there),
    ``kind`` (``request``, ``event``, ``models``, ``resume``, ``load``), ``data`` (the fact,
    decoded JSON: checked by whoever takes it in)."""

    origin: str
    ident: str
    kind: str
    data: Any

    @property
    def key(self) -> str:
        """Unique in the group: what a folded row keeps as its origin."""
        return f"{self.origin}:{self.ident}"


class Journal:
    """Append facts to the stream and read them back from a position."""

    def __init__(self, client: aioredis.Redis, *, namespace: str = "gpuctl",
                 keep_seconds: float = KEEP_SECONDS) -> None:
        self._client = client
        self.key = f"{namespace}:journal"
        self.epoch_key = f"{namespace}:journal:epoch"
        self.keep_seconds = keep_seconds

    async def append(self, origin: str, facts: list[Entry]) -> None:
        """Add ``facts`` of store ``origin`` in order, ``BATCH_FACTS`` to an entry, in one
        round trip."""
        if not facts:
            return
        # The cut by the replica's clock: a clock off by minutes trims minutes early or late.
        minid = f"{max(0, int((time.time() - self.keep_seconds) * 1000))}-0"
        with unreachable("publish ledger rows"):
            async with self._client.pipeline(transaction=False) as pipe:
                for start in range(0, len(facts), BATCH_FACTS):
                    batch = [[f.ident, f.kind, f.data]
                             for f in facts[start:start + BATCH_FACTS]]
                    pipe.xadd(self.key, {"o": origin, "d": json.dumps(batch)},
                              minid=minid, approximate=True)
                await pipe.execute()

    async def read(self, after: str, count: int, *, skip: str | None = None,
                   ) -> tuple[str, list[tuple[str, list[Entry]]]]:
        """The stream's epoch token (made on first use: a new one means Redis lost the
        stream) and up to ``count`` entries after stream id ``after`` ("0-0": from the
        start), each with its facts, in one round trip. Entries of origin ``skip`` (the
        reader's own) come with no facts: they are not decoded at all."""
        with unreachable("read the shared ledger"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.set(self.epoch_key, secrets.token_hex(8), nx=True)
                pipe.get(self.epoch_key)
                pipe.xrange(self.key, min=f"({after}", max="+", count=count)
                _, epoch, raw = await pipe.execute()
        found: list[tuple[str, list[Entry]]] = []
        for entry_id, fields in raw:
            f = {text(k): text(v) for k, v in fields.items()}
            origin = f.get("o", "")
            if origin == skip:
                found.append((text(entry_id), []))
                continue
            try:
                batch = json.loads(f.get("d", "[]"))
                facts = [Entry(origin, str(ident), str(kind), data)
                         for ident, kind, data in batch]
            except (ValueError, TypeError) as exc:  # a broken or newer writer's entry
                log.warning("skipped entry %s of the shared ledger: %s", text(entry_id), exc)
                facts = []
            found.append((text(entry_id), facts))
        return ("" if epoch is None else text(epoch)), found
