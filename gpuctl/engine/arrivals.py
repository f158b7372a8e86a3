"""When will the next request for a group of GPUs come? The adaptive pause policy's forecast.

A lease cannot tell "she is reading the answer and asks again in five minutes" from
"everyone has gone home". This forecast can, from two things the request log shows:

- **Who was active lately, and how each of them pauses.** Per user, the gaps between the end
  of one request and the arrival of their next: think times within a session (stable per
  person, seconds to minutes) and the long gaps that end a session. A user silent for σ
  seconds returns within t with the chance (S(σ) − S(σ+t)) / S(σ), S being the share of their
  gaps longer than that: the chance falls as the silence grows past their think time. A
  user with few gaps in history borrows the group's (``PRIOR`` gaps' worth).
- **How often new sessions start at this time of the week.** A request whose user had been
  silent ``SESSION_GAP`` or more (or had never asked) starts a session; their rate per
  ``BIN`` of the week is learnt from history, half from that bin of the week (Monday 9:00
  is not Tuesday 9:00) and half from the same time on days of the same kind (weekdays,
  weekends), which steadies an estimate from a few weeks. Users active lately are counted
  above, so the rate is scaled to the share of users who were not.

``Forecast.survival`` combines them: the chance that no request has come t seconds from now,
on a grid of ``STEP`` seconds. Everything is tabulated when learnt, so a decision is a few
hundred multiplications (the replayer asks on every engine tick).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = ["BIN", "SESSION_GAP", "STEP", "Forecast", "learn_forecast"]

#: Grid of the survival functions, seconds.
STEP = 15.0
#: A user silent this long has left: their next request starts a new session.
SESSION_GAP = 1800.0
#: Session-start rates are learnt per this many seconds of the week.
BIN = 900.0
#: A user's own gaps weigh against this many of the group's (pooled) gaps.
PRIOR = 20.0
#: Users with fewer gaps than this borrow the group's table outright.
MIN_OWN_GAPS = 5
#: At most this many users get a table of their own (the most recently active): a gateway
#: with thousands of keys keeps the forecast's memory and relearning time bounded.
MAX_USERS = 500
#: A gap's weight halves with each this many seconds of age: habits drift, and what a
#: person did this week says more than what they did three weeks ago.
HALF_LIFE = 2 * 86_400.0
WEEK = 7 * 86_400.0
_BINS = int(WEEK // BIN)
_PER_DAY = int(86_400.0 // BIN)


def _week_bin(wall: float) -> int:
    """Which ``BIN`` of the week (Monday 00:00 UTC first; 1970-01-05 was a Monday)."""
    return int(((wall - 4 * 86_400.0) % WEEK) // BIN) % _BINS


@dataclass
class Forecast:
    """What was learnt of one group's arrivals; see the module docstring."""

    #: Per user, S(j·STEP) for j = 0 .. ``steps``: the share of their gaps longer than that.
    users: dict[str, list[float]]
    #: The same for all users' gaps together (for users unseen in history).
    pooled: list[float]
    #: New sessions per second, per ``BIN`` of the week.
    rate: list[float]
    #: Distinct users in history (the share of users not active lately scales ``rate``).
    people: int

    def session_rate(self, wall: float) -> float:
        """New sessions per second expected at ``wall``."""
        return self.rate[_week_bin(wall)]

    def survival(self, silent: Mapping[str, float], wall: float, horizon: float) -> list[float]:
        """The chance that no request comes within j·STEP of ``wall``, j = 0 .. horizon/STEP.

        ``silent``: the users active within ``SESSION_GAP``, each with the seconds since
        their last request ended.
        """
        count = int(horizon // STEP) + 1
        out = [1.0] * count
        for user, since in silent.items():
            table = self.users.get(user, self.pooled)
            last = len(table) - 1
            first = min(last, int(since // STEP))
            base = table[first]
            if base <= 0.0:
                continue  # never this silent before: the table says nothing more
            for j in range(1, count):
                out[j] *= table[min(last, first + j)] / base
        share = max(0.0, 1.0 - len(silent) / self.people) if self.people else 1.0
        if share > 0.0:
            hazard = 0.0
            for j in range(1, count):
                hazard += self.rate[_week_bin(wall + (j - 1) * STEP)] * share * STEP
                out[j] *= math.exp(-hazard)
        return out


def learn_forecast(
    requests: Iterable[tuple[str, float, float]], *, now: float, span: float, reach: float,
) -> Forecast:
    """The forecast at ``now`` from (user, start, end) of past requests (wall seconds),
    ``span`` seconds of history; survival tables reach ``reach`` seconds of silence."""
    steps = int(reach // STEP) + 1
    by_user: dict[str, list[tuple[float, float]]] = {}
    for user, start, end in requests:
        by_user.setdefault(user, []).append((start, end))
    gaps: dict[str, list[tuple[float, float]]] = {}
    starts = [0.0] * _BINS
    for user, items in by_user.items():
        items.sort()
        mine: list[tuple[float, float]] = []
        last_end = items[0][1]
        for start, end in items[1:]:
            gap = max(0.0, start - last_end)
            mine.append((gap, 0.5 ** (max(0.0, now - start) / HALF_LIFE)))
            if gap >= SESSION_GAP:
                starts[_week_bin(start)] += 1.0
            last_end = max(last_end, end)
        gaps[user] = sorted(mine)
    pooled = _survival(sorted(g for mine in gaps.values() for g in mine), steps)
    regulars = sorted((u for u, mine in gaps.items() if len(mine) >= MIN_OWN_GAPS),
                      key=lambda u: by_user[u][-1][0], reverse=True)[:MAX_USERS]
    users = {user: _mixed(_survival(gaps[user], steps), _weight(gaps[user]), pooled)
             for user in regulars}
    return Forecast(users=users, pooled=pooled, rate=_rates(starts, span), people=len(by_user))


def _weight(gaps: list[tuple[float, float]]) -> float:
    return sum(w for _, w in gaps)


def _survival(gaps: list[tuple[float, float]], steps: int) -> list[float]:
    """S(j·STEP) of sorted, weighted ``gaps``: the weight of gaps longer, over all."""
    total = _weight(gaps)
    if total <= 0.0:
        return [1.0] * steps
    longer = [0.0] * (len(gaps) + 1)  # longer[i]: weight of gaps[i:]
    for i in range(len(gaps) - 1, -1, -1):
        longer[i] = longer[i + 1] + gaps[i][1]
    keys = [g for g, _ in gaps]
    return [longer[bisect.bisect_right(keys, j * STEP)] / total for j in range(steps)]


def _mixed(own: list[float], weight: float, prior: list[float]) -> list[float]:
    """A user's survival, shrunk towards the group's by ``PRIOR`` gaps' worth."""
    return [(weight * a + PRIOR * b) / (weight + PRIOR) for a, b in zip(own, prior, strict=True)]


def _rates(starts: list[float], span: float) -> list[float]:
    """Sessions per second per bin of the week: half that bin's own count, half the mean of
    the same bin on days of the same kind (weekday or weekend)."""
    weeks = max(1.0, span / WEEK)
    rate = []
    for b in range(_BINS):
        day, slot = divmod(b, _PER_DAY)
        kind = range(5) if day < 5 else range(5, 7)
        same = sum(starts[d * _PER_DAY + slot] for d in kind) / len(kind)
        rate.append((0.5 * starts[b] + 0.5 * same) / (weeks * BIN))
    return rate
