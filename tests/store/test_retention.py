"""Retention: old request rows become daily roll-ups, and reports read the same after."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpuctl.config import Config, CostConfig
from gpuctl.engine import Engine, FakeClock
from gpuctl.engine.retention import retire_old_rows
from gpuctl.engine.usage import DAY, UsageReport, usage_report
from gpuctl.sim.cloud import SimCloud
from gpuctl.store import RequestRow, Store, TimelineEvent

NOW = 1_800_000_000.0 - 1_800_000_000.0 % DAY + 12 * 3600  # noon, UTC
COST = CostConfig(credits_per_gpu_hour=10)


def _day_of_work(store: Store, day: float, user: str) -> None:
    """ws-1 woken at 09:00 for ``user``, served 5 min, leased 10 min, paused at 09:30."""
    t = day + 9 * 3600
    for at, status, cause in ((t, "resuming", "gateway"), (t + 120, "ready", "observed"),
                              (t + 1500, "pausing", "gateway"), (t + 1800, "paused", "observed")):
        store.ledger.add_event(TimelineEvent("ws-1", at, status, cause, "a10"))
    store.ledger.add_request(RequestRow(
        at=t - 1, key_id="key_" + user, user=user, route="/api/chat", model="llama3.2",
        gpu_id="ws-1", status=200, queued_s=121, wake_gpu="ws-1", served_at=t + 120,
        service_s=300, lease_s=600, tokens_in=3, tokens_out=4))


def _rows(report: UsageReport) -> dict[str, tuple[float, int, int, int]]:
    return {r.key: (round(r.gpu_seconds.total, 2), r.requests, r.tokens_out, r.waits.cold)
            for r in report.rows}


def test_a_report_reads_the_same_before_and_after_its_rows_are_rolled_up(
    tmp_path: Path,
) -> None:
    store = Store.open(tmp_path)
    store.ledger.add_event(TimelineEvent("ws-1", NOW - 200 * DAY, "paused", "outside"))
    today = NOW - NOW % DAY
    for back, user in ((120, "ann"), (100, "bob"), (95, "ann"), (10, "bob"), (0, "ann")):
        _day_of_work(store, today - back * DAY, user)
    store.flush()
    windows = [(today - 130 * DAY, NOW), (today - 100 * DAY, today - 90 * DAY)]
    before = {(w, by): usage_report(store, since=w[0], until=w[1], by=by, cost=COST)
              for w in windows for by in ("user", "gpu", "model", "day")}
    deleted = retire_old_rows(store, keep_days=90, cost=COST, now=NOW)
    assert deleted == 3
    assert len(store.requests(0, NOW + DAY)) == 2
    assert retire_old_rows(store, keep_days=90, cost=COST, now=NOW) == 0  # nothing twice
    for (window, by), old in before.items():
        new = usage_report(store, since=window[0], until=window[1], by=by, cost=COST)
        assert new.billed_gpu_seconds == pytest.approx(old.billed_gpu_seconds)
        assert new.unattributed == pytest.approx(old.unattributed)
        assert new.always_on_gpu_seconds == old.always_on_gpu_seconds
        assert _rows(new) == _rows(old), (window, by)
        assert sum(r.credits for r in new.rows) == pytest.approx(
            sum(r.credits for r in old.rows), abs=1e-3)
    store.close()


async def test_the_background_loop_retires_rows_past_keep_days(tmp_path: Path) -> None:
    clock = FakeClock()
    cloud = SimCloud(clock)
    store = Store.open(tmp_path)
    old = clock.wall() - 3 * DAY
    store.ledger.add_request(RequestRow(at=old, key_id="k", user="ann", route="/api/chat",
                                        model="m"))
    config = Config.model_validate({"ledger": {"keep_days": 1}})
    engine = Engine(config, cloud, store, clock=clock, nodes=cloud.node)
    await engine.start()
    try:
        engine.tick()
        assert store.requests(0, clock.wall() + 1) == []
        (rollup,) = [r for r in store.ledger.rollups("0", "9") if r.by == "user"]
        assert (rollup.key, rollup.requests) == ("ann", 1)
    finally:
        await engine.stop()
        store.close()
