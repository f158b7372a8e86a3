"""What replicas share besides slots and keys: leases, the ledger, learnt models and history.

``Replica._run`` calls ``step`` a few times a second (``replicas.SYNC_SECONDS``); every
network round trip happens here, in the background, in batches, never on a request's path:

- **Leases** (``store.shared.leases``), every ``LEASE_SYNC_SECONDS``: when this engine's
  leases changed, they are merged into Redis (a later end wins); when any replica's
  changed, they are read back and merged into the engine's ``LeaseBook``
  (``Engine.merge_leases``), so the leader's idle pause keeps a GPU a user of another
  replica holds, and that user's requests here go back to it.
- **The ledger and learnt facts** (``store.shared.ledger``), every ``PUBLISH_SECONDS``:
  this store's new request rows, timeline events, model lists, resume and load times go to
  the journal; the other replicas' are folded into this store and into the engine's
  estimates and model catalog (``Engine.learn_*``), so a follower's estimate of a cold
  start uses the resume time the leader learnt.
- **Budgets** (``store.shared.budgets``), every ``LEASE_SYNC_SECONDS``: the group's
  budgets, when any changed, are written into this store, so a key's budget blocks its
  wakes on every replica, whichever host it was set on.
- **Cost counters**: other replicas' request rows go into the engine's running cost
  counters too (``/metrics``, budgets), which close time ``METER_LAG_SECONDS`` behind now
  so that those rows, a round or two late, are still counted.
- **One timeline writer**: the engine's ledger writes the GPU timeline only while this
  replica leads (``Ledger.leading``). A replica that takes the lead folds first, then
  re-reads each GPU's last event (``Ledger.resync``), so it neither repeats nor misses one.

Each part fails alone: Redis unreachable leaves the rows in this store and the leases in
memory, and the next step that reaches Redis sends them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from gpuctl.errors import Unavailable
from gpuctl.store.shared.budgets import SharedBudgets
from gpuctl.store.shared.connect import StoreUnreachable
from gpuctl.store.shared.journal import Journal
from gpuctl.store.shared.leader import LeaderLease
from gpuctl.store.shared.leases import SharedLeases
from gpuctl.store.shared.ledger import LedgerShare

if TYPE_CHECKING:
    from gpuctl.engine.engine import Engine

__all__ = ["PUBLISH_SECONDS", "SharedState"]

log = logging.getLogger(__name__)

#: How often the ledger is published and folded: the delay before another replica's
#: ``/admin/usage`` shows a request (plus the request log's flush, done here first).
PUBLISH_SECONDS = 1.0
#: How often leases are published (when they changed) and the others' merged in: leases
#: last minutes, and idle pause acts on minutes, so a second late is no news.
LEASE_SYNC_SECONDS = 1.0
#: Leases are published again this often even unchanged, so a Redis that restarted empty
#: has them back soon.
LEASES_AGAIN_SECONDS = 5.0
#: Most publish or fold calls in one round (each a batch of ``ledger.BATCH``; each awaits
#: Redis, so requests are served between them).
MAX_CALLS = 50
#: How far behind now the running cost counters (``/metrics``, budgets) close time, so
#: the other replicas' rows, a publish round or two late, are counted too.
METER_LAG_SECONDS = 10.0


class SharedState:
    """One replica's leases, ledger rows and learnt facts, kept in step with the group."""

    def __init__(self, engine: Engine, client: aioredis.Redis, lease: LeaderLease) -> None:
        self.engine = engine
        self.lease = lease
        self.leases = SharedLeases(client)
        self.budgets = SharedBudgets(client)
        self.ledger = LedgerShare(engine.store, Journal(client))
        self._published_leases = -1
        self._leases_at = float("-inf")
        self._last_publish = float("-inf")
        self._last_lease_sync = float("-inf")
        self._was_leader = False
        engine.ledger.leading = lambda: lease.is_leader
        engine.lag_meter(METER_LAG_SECONDS)

    async def step(self) -> None:
        """One round: leases every ``LEASE_SYNC_SECONDS``, the ledger every
        ``PUBLISH_SECONDS``."""
        leading = self.lease.is_leader
        if leading and not self._was_leader:
            await self._fold()  # the old leader's last events first
            self.engine.ledger.resync()
        self._was_leader = leading
        if time.monotonic() - self._last_lease_sync >= LEASE_SYNC_SECONDS:
            self._last_lease_sync = time.monotonic()
            await self.sync_leases()
            await self.sync_budgets()
        if time.monotonic() - self._last_publish >= PUBLISH_SECONDS:
            self._last_publish = time.monotonic()
            for _ in range(MAX_CALLS):  # small batches, the loop serving between them
                if not await self.ledger.publish():
                    break
            await self._fold()

    async def _fold(self) -> None:
        """Fold in what the journal has, batch by batch (a replica that joined late or came
        back catches up over a few rounds, never in one long pause of the event loop)."""
        for _ in range(MAX_CALLS):
            await self.ledger.fold(self.engine)
            if not self.ledger.behind:
                break

    async def sync_leases(self) -> None:
        """Publish this engine's leases if they changed; merge in everyone's."""
        engine = self.engine
        version = engine.lease_version
        wall = engine.clock.wall()
        if version != self._published_leases or (
                time.monotonic() - self._leases_at >= LEASES_AGAIN_SECONDS):
            await self.leases.publish(engine.lease_records(), wall)
            self._published_leases = version
            self._leases_at = time.monotonic()
        found = await self.leases.read(sorted(g.id for g in engine.glance()), wall)
        if found is None:  # no lease changed anywhere since the last read
            return
        before = engine.lease_version
        engine.merge_leases(found)
        if before == version:
            # Nothing of ours changed while we read: what we merged is what Redis has.
            self._published_leases = engine.lease_version

    async def sync_budgets(self) -> None:
        """Write the group's budgets into this store where they differ (the engine re-reads
        them at once), and add to Redis the ones of this store it has no record of."""
        found = await self.budgets.read()
        if found is None:  # no budget changed anywhere since the last read
            return
        ledger = self.engine.store.ledger
        local = ledger.budgets()
        missing = {key_id: b for key_id, b in local.items() if key_id not in found}
        if missing:
            await self.budgets.seed(missing)
        changed = [(key_id, b) for key_id, b in found.items() if local.get(key_id) != b]
        for key_id, budget in changed:
            seconds, per = budget if budget is not None else (None, "day")
            ledger.set_budget(key_id, seconds, per)
        if changed:
            log.info("budgets changed on another host: %s", ", ".join(k for k, _ in changed))
        # Re-read even when this store had them (``keys budget`` on this host writes both).
        self.engine.reload_budgets()

    async def close(self) -> None:
        """A clean stop: publish what is left, so the others have every row of ours."""
        with contextlib.suppress(Unavailable, *StoreUnreachable):
            await self.ledger.publish()
