"""When to pause an idle GPU, and when to wake one before anyone asks: the pause policy.

``timing.pause_policy = "fixed"`` is the lease: a GPU stays up while someone's lease runs.
Every lease length is one point on the same trade between GPU-hours and people waiting for
a resume. ``"adaptive"`` learns the group's rhythm to do better than any one point:

- It keeps, per group of twin GPUs (the same models), the requests it has seen (from the
  request log at start, ``observe`` as it runs) and derives the idle gaps between busy
  periods and when they began, by hour of the day (weekdays pooled, weekends pooled).
- For each such hour it picks how long an idle GPU stays up (``keep_alive``): the length
  that would have cost least over the gaps that began in that hour, counting for each gap
  either the idle time kept up, or a pause and a resume (the break-even, in GPU-seconds)
  plus a penalty for each request that would then have waited for the wake. So a GPU stays
  up through a gap when the next request was likely to come before the break-even point,
  and pauses at once when it was not. The penalty is tuned on the history itself: the
  smallest with which no more requests would have waited than under a fixed lease of
  ``timing.max_idle_minutes``. An hour with fewer than ``MIN_GAPS`` gaps gets the choice
  for all gaps together (one week of a few gaps an hour is mostly noise).
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

__all__ = [
    "MIN_IDLE_SECONDS",
    "PILEUP",
    "Decision",
    "PausePolicy",
    "Schedules",
    "Tables",
    "learn",
]

#: An idle GPU is never paused sooner than this (a pause and a resume take minutes).
MIN_IDLE_SECONDS = 60.0
#: An hour needs this many gaps in history to get a keep-alive of its own.
MIN_GAPS = 30
#: History needed before the adaptive policy decides anything.
WEEK = 7 * 86_400.0
#: Requests kept per group (about a month of a busy group).
KEEP_REQUESTS = 100_000
#: A wake that this many requests would wait for is a pile-up worth pre-warming for.
PILEUP = 5
#: A pre-warm window reaches this far either side of when the pile-up came.
PREWARM_MARGIN = 900.0
#: A GPU that came up this long after a window began was not woken for it.
PREWARM_SLACK = 300.0
#: A gap at least this long is "quiet": any sensible policy paused through it.
QUIET_SECONDS = 1800.0
#: How often the tables are learnt again from what was observed.
RELEARN_SECONDS = 3600.0
#: Keep-alive lengths tried per hour.
_CANDIDATES = (60.0, 120.0, 180.0, 300.0, 420.0, 600.0, 900.0, 1200.0, 1800.0, 2700.0, 3600.0)
#: Wait penalties tried (in break-evens): the smallest that meets the waiting target wins.
_PENALTIES = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0)

Decision = bool | None  # True: pause now; False: keep up; None: no opinion (use leases)


def _bucket(wall: float) -> int:
    """Hour of the day, weekdays 0–23 and weekends 24–47 (UTC)."""
    day, seconds = divmod(wall, 86_400.0)
    weekday = (int(day) + 3) % 7  # 1970-01-01 was a Thursday
    return int(seconds // 3600) + (24 if weekday >= 5 else 0)


@dataclass
class Tables:
    """What was learnt for one group of twins."""

    #: Per ``_bucket`` (hour of a weekday or of a weekend day, UTC): seconds an idle first
    #: GPU of the group stays up.
    keep_alive: list[float]
    #: Hour-of-week windows ((start, end) seconds after Monday 00:00 UTC) the group's first
    #: GPU should be warm in.
    prewarm: list[tuple[float, float]]
    penalty: float  # the wait penalty chosen, in break-evens (for the curious)
    span: float  # seconds of history learnt from

    def keep(self, since: float) -> float:
        """How long a GPU idle since ``since`` (wall seconds) stays up."""
        return self.keep_alive[_bucket(since)]


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
    busy: Iterable[tuple[float, float]], *, breakeven: float, resume: float, max_idle: float,
    span: float,
) -> Tables:
    """The keep-alive per hour and the pre-warm windows, from the busy intervals (start,
    end, wall seconds) of a group's past requests; see the module docstring."""
    gaps = _gaps(list(busy), resume)
    prewarm = _prewarm_windows(gaps, span)
    candidates = sorted({k for k in _CANDIDATES if MIN_IDLE_SECONDS <= k <= max_idle}
                        | {max(MIN_IDLE_SECONDS, max_idle)})
    target = sum(g.waiters for g in gaps if g.length > max_idle)
    per_bucket: dict[int, list[_Gap]] = {}
    for gap in gaps:
        per_bucket.setdefault(_bucket(gap.start), []).append(gap)
    best: tuple[list[float], float] | None = None
    for penalty in _PENALTIES:
        # An hour with too few gaps in history to tell it from the rest gets what suits
        # all the gaps together (one week of a few gaps an hour is mostly noise).
        pooled = min((_cost(gaps, c, breakeven, penalty * breakeven), c)
                     for c in candidates)[1] if gaps else max_idle
        keep = [pooled] * 48
        for bucket, items in per_bucket.items():
            if len(items) >= MIN_GAPS:
                keep[bucket] = min((_cost(items, c, breakeven, penalty * breakeven), c)
                                   for c in candidates)[1]
        cold = sum(g.waiters for g in gaps if g.length > keep[_bucket(g.start)])
        best = (keep, penalty)
        if cold <= target:
            break
    assert best is not None
    return Tables(keep_alive=best[0], prewarm=prewarm, penalty=best[1], span=span)


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
    week cannot tell a habit from a one-off): the window is ``PREWARM_MARGIN`` either side
    of it, merged with its neighbours."""
    weeks = max(1, round(span / WEEK))
    events = [(_week_seconds(g.start + g.length), math.floor((g.start + g.length) / WEEK))
              for g in gaps if g.length >= QUIET_SECONDS and g.waiters >= PILEUP]
    windows: list[tuple[float, float]] = []
    for at, _ in events:
        support = {week for other, week in events
                   if min(abs(other - at), WEEK - abs(other - at)) <= PREWARM_MARGIN}
        if len(support) >= max(2, math.ceil(weeks / 2)):
            windows.append((at - PREWARM_MARGIN, at + PREWARM_MARGIN))
    windows.sort()
    merged: list[tuple[float, float]] = []
    for start, end in windows:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return [(s + WEEK, e + WEEK) if s < 0 else (s, e) for s, e in merged]


def _cost(items: list[_Gap], keep: float, breakeven: float, penalty: float) -> float:
    """GPU-seconds (and wait penalties) of keeping an idle GPU up ``keep`` seconds through
    each gap of ``items``: the gap if it is shorter, else the time kept up, a pause and a
    resume, and the penalty for each request that then waits."""
    total = 0.0
    for gap in items:
        if gap.length <= keep:
            total += gap.length
        else:
            total += keep + breakeven + penalty * gap.waiters
    return total


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
        self._seen: deque[tuple[str, float, float]] = deque(maxlen=KEEP_REQUESTS)
        self._learnt: dict[tuple[str, ...], _Learnt] = {}
        self._first: float | None = None

    # -- learning -----------------------------------------------------------------------

    def observe(self, model: str, start: float, end: float) -> None:
        """One request for ``model`` kept a GPU busy from ``start`` to ``end`` (wall seconds):
        the engine's own observations, and the request log's at start."""
        if not self.adaptive:
            return
        self._first = start if self._first is None else min(self._first, start)
        self._seen.append((model, start, end))

    def tables(self, key: tuple[str, ...], now: float, breakeven: float, *,
               resume: float) -> Tables | None:
        """What was learnt for the group ``key`` (again every ``RELEARN_SECONDS``); ``None``
        under the fixed policy or before a week of history."""
        if not self.adaptive or self._first is None or now - self._first < WEEK:
            return None
        learnt = self._learnt.get(key)
        if learnt is None or now - learnt.at >= RELEARN_SECONDS:
            models = set(key)
            busy = [(start, end) for model, start, end in self._seen if model in models]
            max_idle = self._config.timing.max_idle_minutes * 60.0
            learnt = _Learnt(learn(busy, breakeven=breakeven, resume=resume,
                                   max_idle=max_idle, span=now - self._first), now)
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
        tables = self.tables(key, now, breakeven, resume=resume) if key else None
        if tables is None or level > 0:
            return None  # a second GPU woken for a queue: the leases decide
        idle = now - idle_since
        if idle < MIN_IDLE_SECONDS:
            return False
        if level == 0 and _waiting_for_pileup(tables.prewarm, idle_since, now):
            return False
        return idle >= min(tables.keep(idle_since),
                           self._config.timing.max_idle_minutes * 60.0)

    def wanted(self, key: tuple[str, ...], now: float, lead: float, breakeven: float) -> bool:
        """Should a GPU of the group ``key`` be up ``lead`` seconds from now (pre-warm)?"""
        tables = self.tables(key, now, breakeven, resume=lead)
        # Only as a window comes near: once in it, a GPU paused (or never woken) is not
        # woken again until the next window.
        return tables is not None and (
            _in_windows(tables.prewarm, now + lead) and not _in_windows(tables.prewarm, now)
        )

    def awake(self, name: str, gpu_id: str, now: float) -> bool:
        """A schedule wants this GPU up now."""
        return bool(self.schedules) and self.schedules.mode(name, gpu_id, now) == "awake"
