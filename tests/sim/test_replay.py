"""Replays through the real engine on virtual time: what they bill, who waits, the verdict."""

from __future__ import annotations

import asyncio

import pytest

from gpuctl.config import Config
from gpuctl.engine import VirtualClock
from gpuctl.errors import ConfigError, UsageError
from gpuctl.sim.replay import FleetSpec, GpuSpec, offline_optimum, replay
from gpuctl.sim.study import apply, parse_sets, run_study, settings_grid
from gpuctl.sim.workload import DAY, Request

ONE = FleetSpec.twins(1, ["m:latest"], resume_s=120, pause_s=60, ollama_s=5)


def lease(minutes: float) -> Config:
    return Config.model_validate({"timing": {"reservation_minutes": minutes}})


async def test_the_virtual_clock_wakes_sleepers_in_deadline_order() -> None:
    clock = VirtualClock()
    woke: list[tuple[str, float]] = []

    async def nap(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append((name, clock.now()))
        if name == "a":  # a sleeper woken may sleep again; time follows it
            await clock.sleep(5)
            woke.append(("a again", clock.now()))

    tasks = [asyncio.ensure_future(nap("b", 30)), asyncio.ensure_future(nap("a", 10))]
    await clock.run_until(100)
    assert woke == [("a", 10), ("a again", 15), ("b", 30)]
    assert clock.now() == 100
    await asyncio.gather(*tasks)


async def test_the_virtual_clock_stops_at_the_deadline_with_sleepers_left() -> None:
    clock = VirtualClock()
    task = asyncio.ensure_future(clock.sleep(500))
    await clock.run_until(60)
    assert clock.now() == 60 and not task.done()
    await clock.run_until(500)
    assert task.done()


def test_the_optimum_bridges_gaps_shorter_than_break_even() -> None:
    # break-even 185 s: a 100 s gap is bridged, a 1,000 s gap is not.
    requests = [Request(0, "a", "m:latest", 10), Request(110, "a", "m:latest", 10),
                Request(1120, "a", "m:latest", 10)]
    assert offline_optimum(requests, ONE, slots=4) == pytest.approx((120 + 185) + (10 + 185))


def test_the_optimum_counts_a_second_gpu_only_while_one_is_full() -> None:
    two = FleetSpec.twins(2, ["m:latest"])
    requests = [Request(0, f"u{i}", "m:latest", 100) for i in range(5)]  # 5 > 4 slots
    assert offline_optimum(requests, two, slots=4) == pytest.approx(2 * (100 + 185))
    assert offline_optimum(requests[:4], two, slots=4) == pytest.approx(100 + 185)


def test_the_optimum_sends_each_model_to_the_gpus_that_have_it() -> None:
    fleet = FleetSpec((GpuSpec("a", ("x:latest",)), GpuSpec("b", ("y:latest",))))
    requests = [Request(0, "u", "x:latest", 50), Request(0, "v", "y:latest", 50)]
    assert offline_optimum(requests, fleet, slots=4) == pytest.approx(2 * (50 + 185))


async def test_one_request_bills_the_resume_the_work_the_lease_and_the_pause() -> None:
    outcome = await replay([Request(0, "alice", "m:latest", 10)], lease(2), ONE)
    # resume 125 s (cloud + Ollama), 10 s of work, a 120 s lease, the next 10 s tick, and a
    # 60 s pause: about 325 s, on one GPU, in a one-day window.
    assert 315 <= outcome.gpu_hours * 3600 <= 335
    assert outcome.cold_waits == 1 and outcome.resumes == 1
    assert 125 <= outcome.wait_max_s <= 127
    assert outcome.always_on_hours == pytest.approx(24)
    assert outcome.window_hours == pytest.approx(24)


async def test_a_longer_lease_bridges_a_gap_a_shorter_one_does_not() -> None:
    requests = [Request(0, "alice", "m:latest", 10), Request(600, "alice", "m:latest", 10)]
    short = await replay(requests, lease(2), ONE)
    long = await replay(requests, lease(10), ONE)
    assert (short.cold_waits, short.resumes) == (2, 2)
    assert (long.cold_waits, long.resumes) == (1, 1)
    assert long.wait_median_s > 100 and short.wait_median_s > 100


async def test_a_model_no_gpu_has_is_refused_not_hung() -> None:
    outcome = await replay([Request(0, "alice", "nope:latest", 10)], lease(2), ONE)
    assert outcome.refused == 1 and outcome.resumes == 0 and outcome.gpu_hours == 0


def test_sets_parse_into_a_grid_and_bad_keys_are_refused() -> None:
    sets = parse_sets(["timing.reservation_minutes=2,5", "gpu.slots=2,4"])
    grid = settings_grid(sets, [])
    assert len(grid) == 4 and {"timing.reservation_minutes": "5", "gpu.slots": "2"} in grid
    for bad in ("timing.nope=1", "reservation_minutes=1", "timing.reservation_minutes",
                "timing.reservation_minutes=,"):
        with pytest.raises(UsageError):
            parse_sets([bad])
    with pytest.raises(UsageError, match="at most"):
        settings_grid(parse_sets(["gpu.slots=" + ",".join(str(n) for n in range(1, 66))]), [])
    with pytest.raises(ConfigError, match="reservation_minutes"):
        apply(Config(), {"timing.reservation_minutes": "-3"})


async def test_a_study_marks_the_front_and_recommends_the_cheapest_no_worse_for_waits() -> None:
    # One user, a question every 4 minutes for an hour, then silence: a 5-minute lease
    # bridges every gap; a 2-minute lease pauses between questions; 30 minutes is waste.
    requests = [Request(i * 240.0, "alice", "m:latest", 20) for i in range(15)]
    grid = settings_grid(parse_sets(["timing.reservation_minutes=2,5,30"]), [])
    result = await run_study(lease(10), requests, ONE, grid, source="test")
    rows = {r.label: r for r in result.settings}
    assert list(rows) == ["current config", "lease 2 min", "lease 5 min", "lease 30 min"]
    assert rows["current config"].current
    assert rows["lease 5 min"].waited_for_wake == rows["current config"].waited_for_wake == 1
    # 2 minutes: a cold question ends 145 s in, so the next (at 240 s) finds the lease
    # still on; the one after that finds the GPU paused: every other question waits.
    assert rows["lease 2 min"].waited_for_wake == 8
    assert rows["lease 5 min"].gpu_hours < rows["current config"].gpu_hours
    assert rows["lease 5 min"].pareto and rows["lease 2 min"].pareto
    assert not rows["lease 30 min"].pareto and not rows["current config"].pareto
    assert result.recommended == "lease 5 min" and rows["lease 5 min"].recommended
    saved = rows["current config"].gpu_hours - rows["lease 5 min"].gpu_hours
    assert result.saved_gpu_hours == pytest.approx(saved, abs=1e-3)
    assert saved == pytest.approx(5 / 60, abs=0.01)  # a 10-min lease idles 5 min longer
    assert "Switch to lease 5 min" in result.verdict
    assert result.window_hours == 24 and result.requests == 15 and DAY == 86_400


async def test_history_before_the_window_reaches_the_adaptive_policy() -> None:
    # Eight days of a question every two hours: the adaptive policy learns that nobody
    # comes back soon and pauses after a minute; the fixed lease keeps the GPU 10 minutes.
    history = [Request(-n * 7200.0, "alice", "m:latest", 10) for n in range(96, 0, -1)]
    one = [Request(0, "alice", "m:latest", 10)]
    fixed = await replay(one, lease(10), ONE, history=history)
    adaptive = await replay(one, Config.model_validate(
        {"timing": {"reservation_minutes": 10, "pause_policy": "adaptive"}}), ONE,
        history=history)
    assert fixed.gpu_hours * 3600 > 790
    assert adaptive.gpu_hours * 3600 < 300
    assert fixed.cold_waits == adaptive.cold_waits == 1
