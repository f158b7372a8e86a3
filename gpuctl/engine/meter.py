"""The cost counters of ``/metrics``: billed seconds per GPU, GPU-seconds per user and kind,
unattributed seconds per reason, since the gateway started.

Prometheus counters must never go down, while the attribution of a recent instant can still
change (a request in flight has no row yet; it may turn "held" into "serving"). So the meter
attributes only *closed* time: up to a watermark before which no request is still open (the
arrival of the oldest request in a slot or in the queue, or now), and adds each closed piece
to running totals once. A wake still under way is split between the waiters known when each
piece closes; ``gpuctl usage`` splits it between all of them. Run from the background loop
(every poll), never per request; each run reads only the rows near the new piece.
"""

from __future__ import annotations

from collections import defaultdict

from gpuctl.engine.clock import Clock
from gpuctl.engine.usage import window_attribution
from gpuctl.store import Store

__all__ = ["CostMeter", "CostTotals"]

#: The smallest piece worth an attribution run.
MIN_PIECE_SECONDS = 1.0


class CostTotals:
    """Running totals since the gateway started (read at scrape time)."""

    def __init__(self) -> None:
        self.billed: dict[str, float] = defaultdict(float)  # gpu id -> seconds
        self.users: dict[tuple[str, str], float] = defaultdict(float)  # (user, kind) -> s
        self.unattributed: dict[str, float] = defaultdict(float)  # reason -> seconds


class CostMeter:
    """Attributes closed pieces of time as they close, into ``totals``."""

    def __init__(self, store: Store, clock: Clock, *, horizon: float) -> None:
        self._store = store
        self._clock = clock
        self._horizon = horizon
        self._mark: float | None = None
        self.totals = CostTotals()

    def start(self) -> None:
        """Count from now on (the gateway's start)."""
        self._mark = self._clock.wall()

    def advance(self, oldest_open: float | None) -> None:
        """Attribute up to ``oldest_open`` (wall time of the oldest open request) or now."""
        if self._mark is None:
            return
        until = self._clock.wall()
        if oldest_open is not None:
            until = min(until, oldest_open)
        if until - self._mark < MIN_PIECE_SECONDS:
            return
        attribution, _, _ = window_attribution(self._store, self._mark, until,
                                               horizon=self._horizon)
        totals = self.totals
        for gpu_id, seconds in attribution.billed.items():
            totals.billed[gpu_id] += seconds
        for share, seconds in attribution.shares.items():
            if share.kind == "unattributed":
                totals.unattributed[share.reason] += seconds
            else:
                totals.users[(share.user, share.kind)] += seconds
        self._mark = until
