"""Budgets per key: GPU-hours per day, week or month, and the rule that enforces them.

The rule: a key past its budget is still served by a GPU that is already awake (a warm GPU
costs the same whether it serves or idles under a lease), but a request of that key that
would need a *wake* is refused with 429, the budget and its reset time, and ``Retry-After``.
The wake is the expensive part (minutes of billing before the first token, then the lease),
so it is the part a budget stops.

What a key has used is its attributed GPU-seconds (serving, waking, held; ``attribution``) in
the current period (UTC day, ISO week, calendar month): counted from the store once, then
kept current from the cost meter (``meter``) in the background loop, never per request;
``remaining`` (for the ``X-Gpuctl-Budget-Remaining`` header) is a dict lookup. Budgets are
set by ``gpuctl keys budget`` in the shared store and re-read every ``REFRESH_SECONDS``;
admin keys have none.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone

from gpuctl.engine.clock import Clock
from gpuctl.engine.meter import CostMeter
from gpuctl.engine.usage import period_end, period_start, window_attribution
from gpuctl.errors import Unavailable
from gpuctl.store import Store

__all__ = ["PERIODS", "REFRESH_SECONDS", "BudgetExceeded", "BudgetStatus", "Budgets",
           "budget_status"]

PERIODS = ("day", "week", "month")
#: How stale the used figures may be (engine clock seconds).
REFRESH_SECONDS = 30.0


class BudgetExceeded(Unavailable):
    """A key past its budget asked for something that needs a GPU to wake: 429."""

    http_status = 429


@dataclass(frozen=True)
class BudgetStatus:
    key_id: str
    gpu_seconds: float  # the budget
    per: str
    used: float
    resets_at: float  # wall-clock seconds

    @property
    def remaining(self) -> float:
        return max(0.0, self.gpu_seconds - self.used)


def budget_status(store: Store, now: float, until: float | None = None
                  ) -> dict[str, BudgetStatus]:
    """Every budgeted key's budget and use in the period holding wall time ``now``, counted
    from the period's start to ``until`` (default ``now``)."""
    end = now if until is None else until
    limits = store.ledger.budgets()
    used: dict[str, float] = defaultdict(float)
    for per in {p for _, p in limits.values()}:
        start = period_start(per, now)
        if end <= start:
            continue
        attribution, _, _ = window_attribution(store, start, end)
        for share, seconds in attribution.shares.items():
            if share.kind != "unattributed" and limits.get(share.key_id, (0, ""))[1] == per:
                used[share.key_id] += seconds
    return {
        key_id: BudgetStatus(key_id, seconds, per, used[key_id], period_end(per, now))
        for key_id, (seconds, per) in limits.items()
    }


class Budgets:
    """The engine's view of the budgets, kept current from the cost meter, and the check.

    What a key used is counted once from the store (from its period's start up to the
    meter's mark) when the budgets or a period change, then kept up to date from the meter's
    running per-key totals, so a refresh costs a small query, not an attribution.
    """

    def __init__(self, store: Store, clock: Clock, meter: CostMeter) -> None:
        self._store = store
        self._clock = clock
        self._meter = meter
        self._limits: dict[str, tuple[float, str]] = {}
        self._periods: dict[str, float] = {}
        self._base: dict[str, BudgetStatus] = {}
        self._snapshot: dict[str, float] = {}
        self._status: dict[str, BudgetStatus] = {}
        self._checked = float("-inf")

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the budgets (at most every ``REFRESH_SECONDS`` unless ``force``) and bring
        what each key used up to the meter."""
        now = self._clock.now()
        if force or now - self._checked >= REFRESH_SECONDS:
            self._checked = now
            wall = self._clock.wall()
            limits = self._store.ledger.budgets()
            periods = {per: period_start(per, wall) for per in PERIODS}
            if force or limits != self._limits or periods != self._periods:
                mark = self._meter.mark
                self._base = budget_status(self._store, wall, mark if mark is not None else wall)
                self._snapshot = dict(self._meter.totals.keys)
                self._limits, self._periods = limits, periods
        keys = self._meter.totals.keys
        self._status = {
            key_id: BudgetStatus(
                key_id, base.gpu_seconds, base.per,
                base.used + keys.get(key_id, 0.0) - self._snapshot.get(key_id, 0.0),
                base.resets_at)
            for key_id, base in self._base.items()
        }

    def remaining(self, key_id: str) -> float | None:
        """GPU-seconds left in the key's budget (None: the key has no budget). O(1)."""
        status = self._status.get(key_id)
        return None if status is None else status.remaining

    def check_wake(self, key_id: str) -> None:
        """Raise ``BudgetExceeded`` if ``key_id`` may not cause a wake now (call after the
        meter has advanced)."""
        if key_id not in self._status:
            return  # no budget (as of the last refresh, at most REFRESH_SECONDS ago)
        self.refresh()
        status = self._status.get(key_id)
        if status is None or status.remaining > 0:
            return
        reset = datetime.fromtimestamp(status.resets_at, tz=timezone.utc)
        raise BudgetExceeded(
            f"key {key_id} has used its budget of {status.gpu_seconds / 3600:g} GPU-hours per "
            f"{status.per} ({status.used / 3600:.2f} used); a GPU that is awake still serves "
            f"it, but none is awake for this model. The budget resets at "
            f"{reset.isoformat(timespec='minutes')}",
            retry_after=max(1.0, status.resets_at - self._clock.wall()),
            hint="Ask an admin to raise it with `gpuctl keys budget`.",
        )
