"""When to pause an idle GPU, and when to wake one before anyone asks: the pause policy.

``timing.pause_policy = "fixed"`` is the lease: a GPU stays up while someone's lease runs.
Every lease length is one point on the same trade between GPU-hours and people waiting for
a resume. ``"adaptive"`` learns the group's rhythm to do better than any one point:

- It keeps, per group of twin GPUs (the same models), the requests it has seen (from the
  request log at start, ``observe`` as it runs): who asked, when, for how long.
- Keep-alive, re-decided as the silence grows: from that history, ``arrivals`` forecasts
  the chance that no request has come t seconds from now, from who was active lately (each
  person's own gaps between requests: a think time of a minute or five, or the end of a
  session) and the rate of new sessions at this time of the week. An idle GPU stays up
  while, for some k, keeping it up until the next request or k seconds (the expected idle
  time) costs less than pausing now would should a request come within k (a pause and a
  resume, the break-even, plus ``WAIT_PENALTY`` break-evens for each request that would
  wait); else it pauses at once. So a known thinker is waited for through their think
  time, and a GPU whose users have all gone quiet past theirs at an hour when few sessions
  start is paused a minute after the last answer.
- Pre-warm: where history shows ``PILEUP`` or more requests piling up behind the wake that
  ended a long quiet (a batch started every Tuesday night), at the same time of the week
  in at least two weeks and half the weeks of history, a GPU of the group is woken a
  resume ahead of that window and kept up until the requests come or the window ends.
- Only the group's first GPU is the policy's: a second one (woken for a queue) keeps to
  the leases, as under the fixed policy.
- Bounds: never shorter than ``MIN_IDLE_SECONDS``, never longer than ``max_idle_minutes``;
  until it has seen a week of history it answers ``None`` (the engine keeps to the leases).

``[[schedule]]`` entries are what people know better: ``mode = "awake"`` keeps the matching
GPUs up (and wakes them) in the window, ``mode = "paused"`` pauses them as soon as they are
idle. Schedules apply under either policy.

Everything here is pure computation on wall-clock seconds; the engine asks, the waker acts.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

from gpuctl.config import Config, ScheduleEntry, minutes_of, parse_days
from gpuctl.engine.arrivals import SESSION_GAP, STEP, Forecast, learn_forecast

__all__ = [
    "MIN_IDLE_SECONDS",
    "PILEUP",
    "WAIT_PENALTY",
    "Decision",
    "PausePolicy",
    "Schedules",
    "Tables",
    "learn",
    "worth_keeping",
]

#: An idle GPU is never paused sooner than this (a pause and a resume take minutes).
MIN_IDLE_SECONDS = 60.0
#: History needed before the adaptive policy decides anything.
WEEK = 7 * 86_400.0
#: Requests kept per group (about a month of a busy group).
KEEP_REQUESTS = 100_000
#: A wake that this many requests would wait for is a pile-up worth pre-warming for.
PILEUP = 5
#: Pile-ups this close in the week (in different weeks) are one habit.
PREWARM_MARGIN = 900.0
#: A pre-warm window opens this long before the earliest pile-up of its habit.
PREWARM_LEAD = 300.0
#: A GPU that came up this long after a window began was not woken for it.
PREWARM_SLACK = 300.0
#: A gap at least this long is "quiet": any sensible policy paused through it.
QUIET_SECONDS = 1800.0
#: How often the tables are learnt again from what was observed.
RELEARN_SECONDS = 3600.0

#: What a request that waits for a wake costs, in break-evens of GPU time. Chosen on
#: synthetic weeks never judged (seed 4 of both shapes, ``tests/bench/bench_pausepolicy.py``):
#: 0.3 was the cheapest at which the group week made fewer requests wait than a 30-minute
#: lease; higher values buy fewer waits with GPU-hours.
WAIT_PENALTY = 0.3
#: The forecast re-decides to keep a GPU up at most this often (a decision is a few
#: hundred multiplications; the engine asks on every tick, ``poll_interval_seconds``).
#: Every second of delay is billed once per pause, so no more than half a default tick.
RECHECK_SECONDS = 5.0

Decision = bool | None  # True: pause now; False: keep up; None: no opinion (use leases)


@dataclass
class Tables:
    """What was learnt for one group of twins."""

    #: When the next request is likely to come (``arrivals``).
    forecast: Forecast
    #: Hour-of-week windows ((start, end) seconds after Monday 00:00 UTC) the group's first
    #: GPU should be warm in.
    prewarm: list[tuple[float, float]]
    span: float  # seconds of history learnt from


@dataclass
class _Gap:
    start: float
    length: float
    waiters: int  # requests that would wait for the wake if the GPU had been paused


def _gaps(busy: list[tuple[float, float]], resume: float) -> list[_Gap]:
    """The idle gaps between busy periods (some request running). A gap's ``waiters``: the
    requests arriving within a resume of its end, who would all have waited for the wake
    had the GPU been paused through it (later gaps that short included)."""
    events = sorted([(s, 1) for s, _ in busy] + [(e, -1) for _, e in busy],
                    key=lambda ev: (ev[0], ev[1]))
    gaps: list[_Gap] = []
    recent: deque[_Gap] = deque()  # gaps that ended less than a resume ago
    running = 0
    idle_from: float | None = None
    for at, step in events:
        running += step
        if step > 0:
            while recent and at > recent[0].start + recent[0].length + resume:
                recent.popleft()
            for gap in recent:
                gap.waiters += 1
            if running == 1 and idle_from is not None:
                gap = _Gap(idle_from, at - idle_from, 1)
                gaps.append(gap)
                recent.append(gap)
                idle_from = None
        elif running == 0:
            idle_from = at
    return gaps


def learn(
    requests: Iterable[tuple[str, float, float]], *, resume: float, max_idle: float,
    span: float, now: float,
) -> Tables:
    """The forecast and the pre-warm windows at ``now``, from (user, start, end) of a
    group's past requests (wall seconds); see the module docstring."""
    mine = list(requests)
    gaps = _gaps([(start, end) for _, start, end in mine], resume)
    return Tables(
        forecast=learn_forecast(mine, now=now, span=span, reach=SESSION_GAP + max_idle),
        prewarm=_prewarm_windows(gaps, span), span=span,
    )


def _week_seconds(wall: float) -> float:
    """Seconds since the last Monday 00:00 UTC (1970-01-05 was a Monday)."""
    return (wall - 4 * 86_400.0) % WEEK


def _in_windows(windows: list[tuple[float, float]], wall: float) -> bool:
    at = _week_seconds(wall)
    return any(start <= at < end or start <= at + WEEK < end for start, end in windows)


def _waiting_for_pileup(windows: list[tuple[float, float]], idle_since: float,
                       now: float) -> bool:
    """Inside a pre-warm window, and the GPU has been idle since about when it began (it
    was woken for the window, or idle before it): the requests it was warmed for have not
    come yet. Once they have, the keep-alive decides."""
    at = _week_seconds(now)
    for start, end in windows:
        for offset in (0.0, WEEK):
            if start <= at + offset < end:
                began = now - (at + offset - start)
                return idle_since <= began + PREWARM_SLACK
    return False


def _prewarm_windows(gaps: list[_Gap], span: float) -> list[tuple[float, float]]:
    """Where in the week a pile-up came after a quiet (``PILEUP`` or more requests arriving
    within a resume of the first), in at least two weeks and half the weeks of history (one
    week cannot tell a habit from a one-off; pile-ups count as the same habit within
    ``PREWARM_MARGIN`` of each other): the window spans the pile-ups of the habit and
    ``PREWARM_LEAD`` before the first, merged with its neighbours. Each window is GPU time
    spent idling until the pile-up comes, so it is no wider than history shows."""
    weeks = max(1, round(span / WEEK))
    events = [(_week_seconds(g.start + g.length), math.floor((g.start + g.length) / WEEK))
              for g in gaps if g.length >= QUIET_SECONDS and g.waiters >= PILEUP]
    windows: list[tuple[float, float]] = []
    for at, _ in events:
        near = [(at + _offset(other - at), week) for other, week in events
                if abs(_offset(other - at)) <= PREWARM_MARGIN]
        if len({week for _, week in near}) >= max(2, math.ceil(weeks / 2)):
            windows.append((min(t for t, _ in near) - PREWARM_LEAD,
                            max(t for t, _ in near) + PREWARM_LEAD))
    windows.sort()
    merged: list[tuple[float, float]] = []
    for start, end in windows:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return [(s + WEEK, e + WEEK) if s < 0 else (s, e) for s, e in merged]


def _offset(delta: float) -> float:
    """``delta`` seconds of the week, folded to the nearest way round (-half a week..)."""
    return (delta + WEEK / 2) % WEEK - WEEK / 2


def worth_keeping(survival: list[float], cost: float) -> bool:
    """Keep an idle GPU up: for some k, staying up until the next request or k seconds
    (expected time up: the area under ``survival`` to k) costs less than what pausing now
    costs should a request come within k (``cost``: a pause, a resume and the waits)."""
    area = 0.0
    for k in range(1, len(survival)):
        area += survival[k - 1] * STEP
        if area < (1.0 - survival[k]) * cost:
            return True
    return False


class Schedules:
    """The ``[[schedule]]`` entries, asked "what does a schedule say of this GPU now?"."""

    def __init__(self, entries: Iterable[ScheduleEntry]) -> None:
        self._entries = [
            (e, parse_days(e.days), minutes_of(e.from_), minutes_of(e.until), ZoneInfo(e.timezone))
            for e in entries
        ]

    def __bool__(self) -> bool:
        return bool(self._entries)

    def mode(self, gpu_name: str, gpu_id: str, wall: float) -> str | None:
        """``"awake"``, ``"paused"`` or ``None`` for this GPU at ``wall``; the last match wins."""
        found: str | None = None
        for entry, days, begin, end, zone in self._entries:
            if entry.gpus and not any(g in (gpu_name, gpu_id) for g in entry.gpus):
                continue
            local = datetime.fromtimestamp(wall, timezone.utc).astimezone(zone)
            minute = local.hour * 60 + local.minute
            weekday = local.weekday()
            if begin <= end:
                inside = weekday in days and begin <= minute < end
            else:  # past midnight: "22:00" to "06:00" belongs to the day it began
                inside = (weekday in days and minute >= begin) or (
                    (weekday - 1) % 7 in days and minute < end)
            if inside:
                found = entry.mode
        return found


@dataclass
class _Learnt:
    tables: Tables
    at: float


class PausePolicy:
    """The engine's pause policy; see the module docstring.

    A group is the sorted models of a GPU (twins share one); a request counts for every
    group that has its model.
    """

    def __init__(self, config: Config) -> None:
        self._config = config
        self.adaptive = config.timing.pause_policy == "adaptive"
        self.schedules = Schedules(config.schedule)
        self._seen: deque[tuple[str, float, float, str]] = deque(maxlen=KEEP_REQUESTS)
        #: Per user, per model: when their last request ended (wall seconds).
        self._last: dict[str, dict[str, float]] = {}
        #: Per (group, idle since): when the forecast last said "keep it up".
        self._kept: dict[tuple[tuple[str, ...], float], float] = {}
        self._learnt: dict[tuple[str, ...], _Learnt] = {}
        self._first: float | None = None

    # -- learning -----------------------------------------------------------------------

    def observe(self, model: str, start: float, end: float, user: str = "") -> None:
        """One request of ``user`` for ``model`` kept a GPU busy from ``start`` to ``end``
        (wall seconds): the engine's own observations, and the request log's at start."""
        if not self.adaptive:
            return
        self._first = start if self._first is None else min(self._first, start)
        self._seen.append((model, start, end, user))
        last = self._last.setdefault(user, {})
        if end > last.get(model, -math.inf):
            last[model] = end

    def tables(self, key: tuple[str, ...], now: float, *, resume: float) -> Tables | None:
        """What was learnt for the group ``key`` (again every ``RELEARN_SECONDS``); ``None``
        under the fixed policy or before a week of history."""
        if not self.adaptive or self._first is None or now - self._first < WEEK:
            return None
        learnt = self._learnt.get(key)
        if learnt is None or now - learnt.at >= RELEARN_SECONDS:
            models = set(key)
            mine = [(user, start, end) for model, start, end, user in self._seen
                    if model in models]
            max_idle = self._config.timing.max_idle_minutes * 60.0
            learnt = _Learnt(learn(mine, resume=resume, max_idle=max_idle,
                                   span=now - self._first, now=now), now)
            self._learnt[key] = learnt
        return learnt.tables

    # -- deciding -----------------------------------------------------------------------

    def pause_idle(
        self, *, key: tuple[str, ...], name: str, gpu_id: str, idle_since: float, now: float,
        breakeven: float, resume: float, level: int,
    ) -> Decision:
        """Should an idle GPU (no request, nobody queued for it) be paused now?

        ``idle_since``/``now``: wall seconds; ``level``: how many GPUs of the group are up
        and were used more recently. ``None``: no opinion, the leases decide.
        """
        mode = self.schedules.mode(name, gpu_id, now) if self.schedules else None
        if mode == "awake" or self.awake(name, gpu_id, now + resume):
            return False  # in an awake window, or woken ahead of one
        if mode == "paused":
            return True
        tables = self.tables(key, now, resume=resume) if key else None
        if tables is None or level > 0:
            return None  # a second GPU woken for a queue: the leases decide
        idle = now - idle_since
        if idle < MIN_IDLE_SECONDS:
            return False
        if level == 0 and _waiting_for_pileup(tables.prewarm, idle_since, now):
            return False
        max_idle = self._config.timing.max_idle_minutes * 60.0
        if idle >= max_idle:
            return True
        since = round(idle_since, 1)  # the engine derives it anew on every tick
        kept = self._kept.get((key, since))
        if kept is not None and now - kept < RECHECK_SECONDS:
            return False
        forecast = tables.forecast
        survival = forecast.survival(self._silent(key, now), now, max_idle - idle)
        cost = breakeven * (1.0 + WAIT_PENALTY * (1.0 + forecast.session_rate(now) * resume))
        if worth_keeping(survival, cost):
            if len(self._kept) > 64:
                self._kept.clear()
            self._kept[(key, since)] = now
            return False
        return True

    def _silent(self, key: tuple[str, ...], now: float) -> dict[str, float]:
        """The users whose last request for a model of ``key`` ended within
        ``SESSION_GAP``, with how long ago. Users silent longer are forgotten here (their
        return is a new session, which the forecast's rate covers), so this stays as small
        as the set of people active in the last half hour."""
        out: dict[str, float] = {}
        gone = []
        for user, models in self._last.items():
            latest = max(models.values())
            if now - latest >= SESSION_GAP:
                gone.append(user)
                continue
            ended = max((models.get(m, -math.inf) for m in key), default=-math.inf)
            if now - ended < SESSION_GAP:
                out[user] = max(0.0, now - ended)
        for user in gone:
            del self._last[user]
        return out

    def wanted(self, key: tuple[str, ...], now: float, lead: float, breakeven: float) -> bool:
        """Should a GPU of the group ``key`` be up ``lead`` seconds from now (pre-warm)?"""
        tables = self.tables(key, now, resume=lead)
        # Only as a window comes near: once in it, a GPU paused (or never woken) is not
        # woken again until the next window.
        return tables is not None and (
            _in_windows(tables.prewarm, now + lead) and not _in_windows(tables.prewarm, now)
        )

    def awake(self, name: str, gpu_id: str, now: float) -> bool:
        """A schedule wants this GPU up now."""
        return bool(self.schedules) and self.schedules.mode(name, gpu_id, now) == "awake"
