"""Retention: request rows older than ``ledger.keep_days`` become daily roll-ups, kept for good.

Once an hour the background loop rolls up every whole UTC day that has fallen out of the
retention window and is not rolled up yet: per user, GPU and model (requests, tokens, cold
waits, GPU-seconds by kind, credits at the prices of the day), per unattributed reason, and
a ``fleet`` marker for the day itself. Then, in the same transaction, it deletes those days'
request rows. The timeline is small and kept whole, so billed and always-on figures stay
exact for any window; user rows before the retention horizon come from the roll-ups, per
whole day (an hour's grouping shows them per day, and their waits have no median).
"""

from __future__ import annotations

from datetime import datetime, timezone

from gpuctl.config import CostConfig
from gpuctl.engine.usage import DAY, By, build_report, day_name, window_attribution
from gpuctl.store import Store
from gpuctl.store.ledger import DailyRollup

__all__ = ["retained_from", "retire_old_rows"]

_ROLLED: tuple[By, ...] = ("user", "gpu", "model")


def _day_floor(epoch: float) -> float:
    return epoch - epoch % DAY


def retained_from(store: Store) -> float | None:
    """The first instant not rolled up (midnight after the last rolled-up day), if any."""
    last = store.ledger.last_rollup_day()
    if last is None:
        return None
    day = datetime.strptime(last, "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp()
    return day + DAY


def retire_old_rows(store: Store, *, keep_days: float, cost: CostConfig, now: float) -> int:
    """Roll up the days older than ``keep_days`` not rolled up yet; returns rows deleted."""
    cutoff = _day_floor(now - keep_days * DAY)
    start = retained_from(store)
    if start is None:
        firsts = [t for t in (store.ledger.oldest_request(), store.ledger.first_event())
                  if t is not None]
        if not firsts:
            return 0
        start = _day_floor(min(firsts))
    rollups: list[DailyRollup] = []
    day = start
    while day < cutoff:
        rollups += _rollups(store, day, cost)
        day += DAY
    if not rollups:
        return 0
    return store.ledger.retire(cutoff, rollups)


def _rollups(store: Store, day: float, cost: CostConfig) -> list[DailyRollup]:
    attribution, requests, managed = window_attribution(store, day, day + DAY)
    name = day_name(day)
    out = [DailyRollup(name, "fleet", "")]
    for by in _ROLLED:
        report = build_report(attribution, requests, managed, by=by, cost=cost)
        for row in report.rows:
            gs = row.gpu_seconds
            out.append(DailyRollup(name, by, row.key, row.requests, row.tokens_in,
                                   row.tokens_out, row.waits.cold, gs.serving, gs.waking,
                                   gs.held, row.credits))
    for reason, seconds in attribution.unattributed().items():
        out.append(DailyRollup(name, "reason", reason, unattributed=seconds))
    return out
