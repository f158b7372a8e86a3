"""The pause policy: what it learns from history, schedules, and the engine acting on it."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from gpuctl.config import Config, ScheduleEntry
from gpuctl.engine import GpuState
from gpuctl.engine.arrivals import MAX_USERS, SESSION_GAP, STEP, learn_forecast
from gpuctl.engine.pausepolicy import (
    PausePolicy,
    Schedules,
    _gaps,
    _in_windows,
    learn,
    worth_keeping,
)
from gpuctl.store.ledger import RequestRow

from .world import Fleet

HOUR = 3600.0
DAY = 86_400.0
#: Monday 2027-01-11 00:00 UTC.
MONDAY = datetime(2027, 1, 11, tzinfo=timezone.utc).timestamp()


def at(day: int, hour: float) -> float:
    return MONDAY + day * DAY + hour * HOUR


def test_gaps_lie_between_busy_periods_and_count_who_would_wait() -> None:
    busy = [(0.0, 10.0), (5.0, 12.0), (100.0, 110.0), (150.0, 160.0), (1000.0, 1010.0)]
    gaps = _gaps(busy, resume=125.0)
    assert [(g.start, g.length) for g in gaps] == [(12.0, 88.0), (110.0, 40.0), (160.0, 840.0)]
    # the request that ended the first gap, and the one at 150 s, came within a resume of it
    assert [g.waiters for g in gaps] == [2, 1, 1]


def sessions(user: str, think: float, days: range, hours: tuple[float, ...] = (9, 14),
             count: int = 12) -> list[tuple[str, float, float]]:
    """``user`` works in sessions of ``count`` 10-second questions ``think`` seconds apart."""
    out = []
    for day in days:
        for hour in hours:
            out += [(user, at(day, hour) + n * (think + 10), at(day, hour) + n * (think + 10) + 10)
                    for n in range(count)]
    return out


def test_a_persons_think_time_is_learnt_and_their_return_grows_unlikely_past_it() -> None:
    past = sessions("alice", 240, range(7)) + sessions("bob", 30, range(7), hours=(10, 15))
    forecast = learn_forecast(past, now=at(7, 0), span=7 * DAY, reach=3600)
    # Right after alice's answer: she very likely asks again within her 4-minute think time.
    just = forecast.survival({"alice": 0.0}, at(7, 3), 600)
    assert just[int(300 // STEP)] < 0.25
    # Ten minutes of silence: past her think time, her session has most likely ended.
    quiet = forecast.survival({"alice": 600.0}, at(7, 3), 600)
    assert quiet[int(300 // STEP)] > 0.75
    # Bob thinks for 30 s: two silent minutes say far more of him than of alice.
    bob = forecast.survival({"bob": 120.0}, at(7, 3), 300)[-1]
    alice = forecast.survival({"alice": 120.0}, at(7, 3), 300)[-1]
    assert alice < 0.3 and bob > alice + 0.2


def test_new_sessions_are_expected_when_history_starts_them() -> None:
    past = sessions("alice", 60, range(14), hours=(9,))  # every day at 9:00, nothing else
    forecast = learn_forecast(past, now=at(14, 0), span=14 * DAY, reach=3600)
    assert forecast.session_rate(at(14, 9)) > 0
    assert forecast.session_rate(at(14, 3)) == 0
    # Nobody active lately: at 3:00 nothing is expected; at 8:59 someone likely comes.
    assert forecast.survival({}, at(14, 3), 1800)[-1] == 1.0
    assert forecast.survival({}, at(14, 8.99), 1800)[-1] < 1.0


def test_a_flood_of_keys_keeps_the_forecast_and_the_policy_bounded() -> None:
    # Thousands of one-off users (a leaked key spread around, a class each with a key)
    # and more regulars than the cap: tables only for the most recently active regulars.
    past = [(f"once{n}", at(0, 9) + n, at(0, 9) + n + 1) for n in range(5_000)]
    for n in range(MAX_USERS + 50):
        past += [(f"regular{n}", at(1, 9) + n + k * 100, at(1, 9) + n + k * 100 + 5)
                 for k in range(6)]
    forecast = learn_forecast(past, now=at(7, 0), span=7 * DAY, reach=3600)
    assert len(forecast.users) == MAX_USERS
    assert "once1" not in forecast.users and f"regular{MAX_USERS + 49}" in forecast.users
    assert forecast.people == 5_000 + MAX_USERS + 50
    policy = PausePolicy(adaptive())
    for user, start, end in past:
        policy.observe("m", start, end, user)
    policy.observe("m", at(8, 9), at(8, 9) + 5, "alice")
    policy.observe("m", at(8, 9), at(8, 9) + 5, "bob")
    policy.pause_idle(key=("m",), name="g", gpu_id="g", idle_since=at(8, 9) + 5,
                      now=at(8, 9) + 120, breakeven=185, resume=125, level=0)
    # Everyone silent past a session gap is forgotten by the live view; alice and bob stay.
    assert set(policy._last) == {"alice", "bob"}
    assert at(8, 9) + 120 - at(1, 10) > SESSION_GAP


def test_keeping_up_is_worth_it_only_when_a_request_is_likely_before_break_even() -> None:
    sure_soon = [1.0] + [0.0] * 40  # a request comes within one step
    never = [1.0] * 41
    half_late = [1.0] * 20 + [0.5] * 21  # maybe, but only after 5 minutes
    assert worth_keeping(sure_soon, cost=185)
    assert not worth_keeping(never, cost=185)
    assert not worth_keeping(half_late, cost=185)  # 5 idle minutes for half a resume
    assert worth_keeping(half_late, cost=2000)  # ... unless waking is dear


def a_week_with_a_tuesday_batch(week: int, hour: float) -> list[tuple[float, float]]:
    base = week * 7 * DAY
    busy = [(base + at(0, 9), base + at(0, 9) + 10)]
    start = base + at(1, hour)
    busy += [(start + n * 5, start + n * 5 + 4) for n in range(40)]  # back to back
    busy += [(base + at(6, 12), base + at(6, 12) + 10)]
    return busy


def users(busy: list[tuple[float, float]]) -> list[tuple[str, float, float]]:
    return [("carol", start, end) for start, end in busy]


def test_a_pileup_after_a_quiet_in_two_weeks_gets_a_prewarm_window() -> None:
    busy = a_week_with_a_tuesday_batch(0, 22.0) + a_week_with_a_tuesday_batch(1, 22.1)
    tables = learn(users(busy), resume=125, max_idle=1800, span=14 * DAY, now=at(14, 0))
    # 22:00 and 22:06 seen: warm from five minutes before the first to after the last
    assert _in_windows(tables.prewarm, at(1, 21.95)) and _in_windows(tables.prewarm, at(1, 22.1))
    assert not _in_windows(tables.prewarm, at(1, 21.8))  # no wider than history shows
    assert not _in_windows(tables.prewarm, at(2, 21.95))
    assert not _in_windows(tables.prewarm, at(1, 20))


def test_one_week_cannot_tell_a_habit_from_a_one_off() -> None:
    tables = learn(users(a_week_with_a_tuesday_batch(0, 22.0)), resume=125, max_idle=1800,
                   span=7 * DAY, now=at(7, 0))
    assert tables.prewarm == []
    moved = a_week_with_a_tuesday_batch(0, 22.0) + a_week_with_a_tuesday_batch(1, 15.0)
    tables = learn(users(moved), resume=125, max_idle=1800, span=14 * DAY, now=at(14, 0))
    assert tables.prewarm == []


@pytest.mark.parametrize(("entry", "when", "expected"), [
    (dict(days="mon-fri", until="18:00", **{"from": "08:00"}), at(0, 7.99), None),
    (dict(days="mon-fri", until="18:00", **{"from": "08:00"}), at(0, 8.0), "awake"),
    (dict(days="mon-fri", until="18:00", **{"from": "08:00"}), at(5, 9.0), None),
    # Amsterdam is UTC+1 in January: 08:00 there is 07:00 UTC
    (dict(days="mon", until="09:00", timezone="Europe/Amsterdam", **{"from": "08:00"}),
     at(0, 7.5), "awake"),
    # overnight: Friday 22:00 to Saturday 06:00 belongs to Friday
    (dict(days="fri", until="06:00", mode="paused", **{"from": "22:00"}), at(5, 3), "paused"),
    (dict(days="fri", until="06:00", mode="paused", **{"from": "22:00"}), at(4, 3), None),
    (dict(days="sat-sun", gpus=["gpu-b"]), at(5, 12), None),  # another GPU's
])
def test_schedules_match_days_hours_zones_and_gpus(
    entry: dict[str, object], when: float, expected: str | None
) -> None:
    schedules = Schedules([ScheduleEntry.model_validate(entry)])
    assert schedules.mode("gpu-a", "ws-1", when) == expected


def adaptive(**timing: object) -> Config:
    return Config.model_validate({"timing": {"pause_policy": "adaptive", **timing}})


def test_the_fixed_policy_and_a_short_history_have_no_opinion() -> None:
    fixed = PausePolicy(Config())
    young = PausePolicy(adaptive())
    for policy in (fixed, young):
        policy.observe("m", at(0, 9), at(0, 9) + 10, "alice")
        policy.observe("m", at(5, 9), at(5, 9) + 10, "alice")
        assert policy.pause_idle(key=("m",), name="g", gpu_id="g", idle_since=at(5, 10),
                                 now=at(5, 11), breakeven=185, resume=125, level=0) is None


def test_decisions_stay_within_a_minute_and_max_idle() -> None:
    policy = PausePolicy(adaptive(max_idle_minutes=20))
    for n in range(8 * 480):  # a question every 3 minutes, day and night, for 8 days
        start = at(0, 0) + n * 180
        policy.observe("m", start, start + 5, "alice")
    last = at(0, 0) + (8 * 480 - 1) * 180 + 5  # alice's last question ended here

    def decide(idle: float, level: int = 0) -> bool | None:
        return policy.pause_idle(key=("m",), name="g", gpu_id="g", idle_since=last,
                                 now=last + idle, breakeven=185, resume=125, level=level)

    assert decide(30) is False  # never under a minute
    assert decide(90) is False  # she asks every 3 minutes: worth waiting for
    assert decide(20 * 60) is True  # never past max_idle_minutes
    assert decide(90, level=1) is None  # a second GPU keeps to the leases


def test_a_known_thinker_is_waited_for_and_a_gpu_nobody_returns_to_is_paused() -> None:
    policy = PausePolicy(adaptive())
    for user, start, end in (sessions("alice", 150, range(8)) + sessions("bob", 20, range(8))):
        policy.observe("m", start, end, user)
    key = ("m",)

    def decide(user: str, idle: float) -> bool | None:
        ended = at(8, 9.5)
        policy.observe("m", ended - 10, ended, user)
        return policy.pause_idle(key=key, name="g", gpu_id="g", idle_since=ended,
                                 now=ended + idle, breakeven=185, resume=125, level=0)

    # Alice thinks 2.5 minutes between questions: kept up through it, the clock moving, and
    # let go once she has been silent well past it (her session is over).
    assert [decide("alice", idle) for idle in (60, 90, 120)] == [False] * 3
    assert decide("alice", 400) is True
    fresh = PausePolicy(adaptive())
    for user, start, end in sessions("bob", 20, range(8)):
        fresh.observe("m", start, end, user)
    policy = fresh
    # Bob asks again within seconds or not at all: after a minute of silence he is gone.
    assert decide("bob", 60) is True


# -- the engine acting on it (fake clock; it starts on Friday 2027-01-15 08:00 UTC) ---------

def history(fleet: Fleet, every: float, days: float) -> list[tuple[str, float, float, str]]:
    now = fleet.clock.wall()
    count = int(days * DAY / every)
    return [("llama3.2:latest", now - n * every, now - n * every + 10, "alice")
            for n in range(count, 0, -1)]


async def test_adaptive_pauses_soon_where_history_says_nobody_comes_back(fleet: Fleet) -> None:
    fleet.configure(timing={"pause_policy": "adaptive"})
    fleet.cloud.add("gpu-a", status="running")
    engine = await fleet.start()
    engine.learn_from(history(fleet, every=2 * HOUR, days=8))  # two hours between questions
    engine.release(await engine.acquire("llama3.2", "alice"))
    await fleet.advance(50)
    assert fleet.cloud.total_pauses == 0  # never before a minute
    await fleet.advance(30)
    assert fleet.cloud.total_pauses == 1  # not the 10-minute lease


async def test_adaptive_waits_for_a_known_thinker_then_lets_the_gpu_go(fleet: Fleet) -> None:
    fleet.configure(timing={"pause_policy": "adaptive", "reservation_minutes": 30})
    fleet.cloud.add("gpu-a", status="running")
    engine = await fleet.start()
    now = fleet.clock.wall()  # Friday 08:00
    past = []
    for day in range(1, 9):  # eight mornings of a session: 12 questions 3 minutes apart
        begin = now - day * DAY
        past += [("llama3.2:latest", begin + n * 190, begin + n * 190 + 10, "alice")
                 for n in range(12)]
    engine.learn_from(past)
    for _ in range(3):  # her session today: each question finds the GPU up
        ticket = await engine.acquire("llama3.2", "alice")
        assert ticket.waited_seconds == 0
        engine.release(ticket)
        await fleet.advance(170, step=10)  # she thinks for three minutes
        assert fleet.cloud.total_pauses == 0
    # Then she stops: once she is silent well past her think time the GPU is paused, long
    # before her 30-minute lease would have let it go.
    took = await fleet.until(lambda: fleet.cloud.total_pauses == 1, limit=1800,
                             step=10)
    assert took < 600


async def test_adaptive_keeps_to_the_lease_until_it_has_a_week_of_history(fleet: Fleet) -> None:
    fleet.configure(timing={"pause_policy": "adaptive"})
    fleet.cloud.add("gpu-a", status="running")
    engine = await fleet.start()
    engine.learn_from(history(fleet, every=2 * HOUR, days=5))
    engine.release(await engine.acquire("llama3.2", "alice"))
    await fleet.advance(590)
    assert fleet.cloud.total_pauses == 0
    await fleet.advance(20)
    assert fleet.cloud.total_pauses == 1


async def test_an_awake_schedule_wakes_the_gpu_ahead_and_lets_it_go_after(fleet: Fleet) -> None:
    fleet.config = fleet.config.model_copy(update={"schedule": [ScheduleEntry.model_validate(
        {"gpus": ["gpu-a"], "days": "fri", "from": "08:10", "until": "08:30"})]})
    fleet.cloud.add("gpu-a")
    fleet.cloud.add("gpu-b")
    engine = await fleet.start()
    await fleet.advance(6 * 60, step=10)  # 08:06: a resume (180 s expected) not yet due
    assert fleet.cloud.total_resumes == 0
    await fleet.advance(4 * 60, step=10)  # 08:10
    assert engine.gpu("gpu-a").state is GpuState.IDLE
    assert engine.gpu("gpu-b").state is GpuState.PAUSED
    await fleet.advance(19 * 60, step=10)  # 08:29: kept up, nobody used it
    assert fleet.cloud.total_pauses == 0
    await fleet.advance(2 * 60, step=10)
    assert fleet.cloud.total_pauses == 1


async def test_a_paused_schedule_pauses_an_idle_gpu_despite_its_lease(fleet: Fleet) -> None:
    fleet.config = fleet.config.model_copy(update={"schedule": [ScheduleEntry.model_validate(
        {"days": "mon-sun", "from": "08:00", "until": "09:00", "mode": "paused"})]})
    fleet.cloud.add("gpu-a", status="running")
    engine = await fleet.start()
    ticket = await engine.acquire("llama3.2", "alice")
    await fleet.advance(60)
    assert fleet.cloud.total_pauses == 0  # never with a request in flight
    engine.release(ticket)
    await fleet.advance(20)
    assert fleet.cloud.total_pauses == 1


async def test_a_habit_seen_two_weeks_running_finds_a_warm_gpu(fleet: Fleet) -> None:
    fleet.configure(timing={"pause_policy": "adaptive"})
    machine = fleet.cloud.add("gpu-a")
    fleet.store.save_models(machine.id, [{"name": "llama3.2:latest",
                                          "model": "llama3.2:latest"}], 0)
    engine = await fleet.start()
    now = fleet.clock.wall()  # Friday 08:00 UTC
    past: list[tuple[str, float, float, str]] = []
    for weeks_ago in (2, 1):
        batch = now - weeks_ago * 7 * DAY + 30 * 60  # Friday 08:30, after a quiet night
        past.append(("llama3.2:latest", batch - 10 * HOUR, batch - 10 * HOUR + 5, "bob"))
        past += [("llama3.2:latest", batch + n * 5, batch + n * 5 + 4, "bob")
                 for n in range(40)]
    engine.learn_from(past)
    await fleet.advance(20 * 60, step=10)  # 08:20: the window (from 08:25) is a resume off
    assert fleet.cloud.total_resumes == 0
    await fleet.advance(9 * 60, step=10)  # 08:29: woken ahead, kept up in the window
    assert engine.gpu("gpu-a").state is GpuState.IDLE
    await fleet.advance(60, step=10)  # 08:30: the batch comes
    ticket = await engine.acquire("llama3.2", "bob")
    assert ticket.waited_seconds == 0
    engine.release(ticket)


async def test_the_request_log_is_the_policys_memory_across_restarts(fleet: Fleet) -> None:
    fleet.configure(timing={"pause_policy": "adaptive"})
    fleet.cloud.add("gpu-a", status="running")
    for start in (wall for _, wall, _, _ in history(fleet, every=2 * HOUR, days=8)):
        fleet.store.ledger.add_request(RequestRow(
            at=start, key_id="k", user="alice", route="/api/chat", model="llama3.2:latest",
            gpu_id="x", status=200, served_at=start, service_s=10.0))
    engine = await fleet.start()
    engine.release(await engine.acquire("llama3.2", "alice"))
    await fleet.advance(80)
    assert fleet.cloud.total_pauses == 1  # learnt: nobody comes back soon; not the lease
