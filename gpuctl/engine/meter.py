"""The running cost counters: billed seconds per GPU, GPU-seconds per user, kind and key,
unattributed seconds per reason, since the gateway started.

Two readers need them often and cheaply: ``/metrics`` (Prometheus counters) and budgets
(what a key used this period). Both would be too slow recomputed from the store on every
poll, so the meter attributes time incrementally, in the background loop:

- Counters must never go down, while the attribution of a recent instant can still change (a
  request in flight has no row yet; it may turn "held" into "serving"). So the meter
  attributes only *closed* time: up to a watermark before which no request is still open
  (the arrival of the oldest request in a slot or in the queue, or now), each piece once.
- It keeps in memory only the request rows that can still matter after the watermark: rows
  still serving or waiting, cold rows for as long as a wake may last, and, per GPU and user,
  the one row whose lease reaches furthest (an old row only holds a lease). So each row is
  handled a bounded number of times, whatever the request rate, and the store is read only
  for the timeline (a few rows per GPU per day).

A wake still under way is split between the waiters known when each piece closes; ``gpuctl
usage`` splits it between all of them. Leases restored at start from before it count as
idle here (the usage report, reading the store, has their rows).
"""

from __future__ import annotations

from collections import defaultdict

from gpuctl.engine.attribution import attribute
from gpuctl.engine.clock import Clock
from gpuctl.engine.usage import LOOKBACK
from gpuctl.store import RequestRow, Store

__all__ = ["CostMeter", "CostTotals"]

#: The smallest piece worth an attribution run.
MIN_PIECE_SECONDS = 1.0


class CostTotals:
    """Running totals since the gateway started."""

    def __init__(self) -> None:
        self.billed: dict[str, float] = defaultdict(float)  # gpu id -> seconds
        self.users: dict[tuple[str, str], float] = defaultdict(float)  # (user, kind) -> s
        self.keys: dict[str, float] = defaultdict(float)  # key id -> attributed seconds
        self.unattributed: dict[str, float] = defaultdict(float)  # reason -> seconds


class CostMeter:
    """Attributes closed pieces of time as they close, into ``totals``."""

    def __init__(self, store: Store, clock: Clock, *, wake_seconds: float) -> None:
        self._store = store
        self._clock = clock
        #: How long after its wait a cold row may still claim part of a wake.
        self._wake_seconds = wake_seconds
        self._mark: float | None = None
        self._rows: list[RequestRow] = []
        self._leases: dict[tuple[str, str], RequestRow] = {}
        self.totals = CostTotals()
        #: Seconds to stay behind now: on a replica, other replicas' rows arrive a second or
        #: two late, and a piece of time is attributed once, so it must wait for them.
        self.lag = 0.0

    def start(self) -> None:
        """Count from now on (the gateway's start)."""
        self._mark = self._clock.wall()

    @property
    def mark(self) -> float | None:
        """Everything before this wall time is counted in ``totals``."""
        return self._mark

    def add(self, row: RequestRow) -> None:
        """A finished request's row (O(1))."""
        self._rows.append(row)

    def advance(self, oldest_open: float | None) -> None:
        """Attribute up to ``oldest_open`` (wall time of the oldest open request) or now."""
        mark = self._mark
        if mark is None:
            return
        until = self._clock.wall() - self.lag
        if oldest_open is not None:
            until = min(until, oldest_open)
        if until - mark < MIN_PIECE_SECONDS:
            return
        events = self._store.ledger.timeline(until, mark - LOOKBACK)
        rows = [*self._rows, *self._leases.values()]
        attribution = attribute(events, rows, mark, until)
        totals = self.totals
        for gpu_id, seconds in attribution.billed.items():
            totals.billed[gpu_id] += seconds
        for share, seconds in attribution.shares.items():
            if share.kind == "unattributed":
                totals.unattributed[share.reason] += seconds
            else:
                totals.users[(share.user, share.kind)] += seconds
                totals.keys[share.key_id] += seconds
        self._mark = until
        self._prune(until)

    def _prune(self, until: float) -> None:
        """Keep the rows that can still count after ``until``; one lease row per GPU, user."""
        keep: list[RequestRow] = []
        leases = self._leases
        for row in self._rows:
            start = row.served_at if row.served_at is not None else row.at
            waiting_until = row.at + row.queued_s
            if start + row.service_s >= until or waiting_until >= until or (
                row.wake_gpu is not None and waiting_until + self._wake_seconds >= until
            ):
                keep.append(row)
                continue  # still counted as itself; its lease is taken over when it goes
            if row.gpu_id is not None and row.served_at is not None:
                key = (row.gpu_id, row.user)
                held = leases.get(key)
                end = row.served_at + row.service_s + row.lease_s
                if end >= until and (
                    held is None or end >= (held.served_at or 0.0) + held.service_s + held.lease_s
                ):
                    leases[key] = row
        self._rows = keep
        for key, row in list(leases.items()):
            if (row.served_at or 0.0) + row.service_s + row.lease_s < until:
                del leases[key]
