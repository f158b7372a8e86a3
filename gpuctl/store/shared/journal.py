"""The replicas' journal: one Redis stream of ledger rows and learnt facts, read by all.

``{ns}:journal`` is a stream; each entry is one fact a replica wrote to its own store and
shares: a request row, a GPU timeline event, a GPU's model list, a resume or a load time.
Its fields are ``o`` (the writing store's origin id), ``i`` (the fact's id in that store),
``k`` (the kind) and ``d`` (the fact as JSON). Every replica reads the stream from where it
stopped (``XRANGE`` from the last id it read, never blocking) and folds what others wrote
into its own store (``store.shared.ledger``), so every replica's store holds the group's
ledger; ``(o, i)`` is unique, so a fact read twice is kept once.

The stream is capped at ``KEEP_ENTRIES`` (approximate trim, cheap in Redis): a replica
that stays away longer than that many facts misses the oldest of them (its own rows are
never lost: they stay in its store). ``{ns}:journal:epoch`` is a random token set once:
a replica that finds it changed knows Redis lost the stream (restarted empty), and
publishes its recent rows again.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import redis.asyncio as aioredis

from gpuctl.store.shared.connect import text, unreachable

__all__ = ["KEEP_ENTRIES", "Entry", "Journal"]

#: About how many facts the stream keeps (a few hundred bytes each: ~0.5 GB at most).
KEEP_ENTRIES = 1_000_000


@dataclass(frozen=True, slots=True)
class Entry:
    """One shared fact: ``origin`` (the store that wrote it), ``ident`` (its id there),
    ``kind`` (``request``, ``event``, ``models``, ``resume``, ``load``), ``data`` (JSON)."""

    origin: str
    ident: str
    kind: str
    data: str

    @property
    def key(self) -> str:
        """Unique in the group: what a folded row keeps as its origin."""
        return f"{self.origin}:{self.ident}"


class Journal:
    """Append facts to the stream and read them back from a position."""

    def __init__(self, client: aioredis.Redis, *, namespace: str = "gpuctl",
                 keep: int = KEEP_ENTRIES) -> None:
        self._client = client
        self.key = f"{namespace}:journal"
        self.epoch_key = f"{namespace}:journal:epoch"
        self.keep = keep

    async def append(self, entries: list[Entry]) -> None:
        """Add ``entries`` in order, in one round trip."""
        if not entries:
            return
        with unreachable("publish ledger rows"):
            async with self._client.pipeline(transaction=False) as pipe:
                for e in entries:
                    pipe.xadd(self.key, {"o": e.origin, "i": e.ident, "k": e.kind, "d": e.data},
                              maxlen=self.keep, approximate=True)
                await pipe.execute()

    async def read(self, after: str, count: int) -> tuple[str, list[tuple[str, Entry]]]:
        """The stream's epoch token (made on first use: a new one means Redis lost the
        stream) and up to ``count`` entries after stream id ``after`` ("0-0": from the
        start), in one round trip."""
        with unreachable("read the shared ledger"):
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.set(self.epoch_key, secrets.token_hex(8), nx=True)
                pipe.get(self.epoch_key)
                pipe.xrange(self.key, min=f"({after}", max="+", count=count)
                _, epoch, raw = await pipe.execute()
        found: list[tuple[str, Entry]] = []
        for entry_id, fields in raw:
            f = {text(k): text(v) for k, v in fields.items()}
            found.append((text(entry_id), Entry(f.get("o", ""), f.get("i", ""),
                                                f.get("k", ""), f.get("d", "{}"))))
        return ("" if epoch is None else text(epoch)), found
