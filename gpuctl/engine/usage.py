"""``gpuctl usage`` and ``GET /admin/usage``: what the fleet billed, who used it, what it saved.

One function, ``usage_report``, reads the ledger of a store and returns the report both
faces print (the CLI on the local state dir, the gateway for ``--url``). Its JSON keys are a
promise (``UsageReport``). The figures for a window:

- ``billed_gpu_seconds``: the seconds GPUs were not paused (see ``attribution``);
- ``always_on_gpu_seconds``: what the fleet would have billed never pausing: each GPU the
  ledger knew in the window, from when it was first seen (or the window's start) to its end;
- ``savings``: 1 − billed / always-on;
- ``unattributed``: reason → seconds; ``rows``: GPU-seconds by kind, requests, tokens, waits
  and credits per user, GPU, model, day or hour (UTC).

A user (not an admin) gets their own rows and the fleet totals: the totals say what the
group pays, the rows what each member caused, and only admins see the other members.
Credits are GPU-hours × ``cost.flavours[flavour]`` (else ``cost.credits_per_gpu_hour``).
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Literal

from pydantic import BaseModel, Field

from gpuctl.config import CostConfig
from gpuctl.engine.attribution import HOUR, Attribution, ShareKey, attribute
from gpuctl.errors import UsageError
from gpuctl.store import RequestRow, Store, TimelineEvent
from gpuctl.store.ledger import DailyRollup

__all__ = ["BY", "GpuSeconds", "UsageReport", "UsageRow", "Waits", "parse_when",
           "usage_report"]

By = Literal["user", "gpu", "model", "day", "hour"]
BY: tuple[By, ...] = ("user", "gpu", "model", "day", "hour")
#: How long before a window a request may start and still wait, serve or hold a lease in it.
HORIZON = 86_400.0
DAY = 86_400.0
#: How far before a window the timeline is read, to know the phase the window begins in (a
#: GPU up for longer is read from its last change before that: its cause may be lost).
LOOKBACK = 7 * 86_400.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


class GpuSeconds(BaseModel):
    serving: float = 0.0
    waking: float = 0.0
    held: float = 0.0
    total: float = 0.0


class Waits(BaseModel):
    median_s: float | None = Field(None, description="queue time of the median request")
    p90_s: float | None = None
    cold: int = Field(0, description="requests that waited for a GPU to wake")


class UsageRow(BaseModel):
    key: str
    gpu_seconds: GpuSeconds = Field(default_factory=GpuSeconds)
    requests: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    waits: Waits = Field(default_factory=Waits)
    credits: float = 0.0


class UsageReport(BaseModel):
    """The report's JSON, keys fixed: ``gpuctl usage --json`` and ``GET /admin/usage``."""

    since: str
    until: str
    by: By
    billed_gpu_seconds: float
    always_on_gpu_seconds: float
    savings: float = Field(description="1 - billed / always-on, 0 when nothing was managed")
    unattributed: dict[str, float]
    rows: list[UsageRow]


def parse_when(text: str, now: float) -> float:
    """``7d``/``12h``/``30m`` before ``now``, a date (``2026-11-01``, UTC midnight) or an ISO
    time; epoch seconds. A ``UsageError`` says what is accepted."""
    match = _DURATION.match(text)
    if match:
        return max(0.0, now - float(match.group(1)) * _UNITS[match.group(2)])
    try:
        parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except (ValueError, OverflowError):
        raise UsageError(
            f"cannot read {text!r} as a time",
            hint="Use a duration (7d, 12h, 30m), a date (2026-11-01) or an ISO time "
                 "(2026-11-01T09:00Z).",
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def day_name(epoch: float) -> str:
    """The UTC day of ``epoch``, ``YYYY-MM-DD``."""
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%d")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="seconds")


def _hour_key(epoch: float, by: By) -> str:
    moment = datetime.fromtimestamp(epoch, tz=timezone.utc)
    return moment.strftime("%Y-%m-%d") if by == "day" else moment.strftime("%Y-%m-%dT%H:00Z")


def _share_key(key: ShareKey, by: By, names: Mapping[str, str]) -> str:
    if by == "user":
        return key.user
    if by == "gpu":
        return names.get(key.gpu_id, key.gpu_id)
    if by == "model":
        return key.model
    return _hour_key(key.hour, by)


def _row_key(row: RequestRow, by: By, names: Mapping[str, str]) -> str:
    if by == "user":
        return row.user
    if by == "gpu":
        return names.get(row.gpu_id, row.gpu_id) if row.gpu_id else "(no gpu)"
    if by == "model":
        return row.model or "(no model)"
    return _hour_key(row.at - row.at % HOUR, by)


def _managed(events: list[TimelineEvent], since: float, until: float) -> float:
    """GPU-seconds the ledger managed in ``[since, until)``: each GPU from when it was first
    seen (or the window's start) until it left (or the window's end). A fleet gpuctl began
    to manage an hour ago is compared with an hour of always-on, not with the whole window."""
    up_since: dict[str, float] = {}
    total = 0.0
    for e in events:  # in time order
        if e.at >= until:
            break
        at = max(e.at, since)
        if e.status == "gone":
            started = up_since.pop(e.gpu_id, None)
            if started is not None:
                total += at - started
        else:
            up_since.setdefault(e.gpu_id, at)
    return total + sum(until - started for started in up_since.values())


def _rate(cost: CostConfig, flavour: str) -> float:
    return cost.flavours.get(flavour, cost.credits_per_gpu_hour)


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1], 3)


def build_report(
    attribution: Attribution, requests: list[RequestRow], managed: float, *, by: By,
    cost: CostConfig, user: str | None = None, names: Mapping[str, str] | None = None,
    rollups: Sequence[DailyRollup] = (), since: float | None = None,
) -> UsageReport:
    """The report of an attribution; ``user`` limits the rows to one user's.

    ``rollups``: the days before the attribution's window whose rows were retired (see
    ``retention``); they add to the rows and totals, and ``since`` is then the report's start.
    """
    names = names or {}
    until = attribution.until
    since = attribution.since if since is None else since
    rows: dict[str, UsageRow] = defaultdict(lambda: UsageRow(key=""))
    billed = sum(attribution.billed.values())
    lost: dict[str, float] = defaultdict(float, attribution.unattributed())
    billed += _add_rollups(rows, lost, rollups, by, user)
    for key, seconds in attribution.shares.items():
        if key.kind == "unattributed" or (user is not None and key.user != user):
            continue
        row = rows[_share_key(key, by, names)]
        gs = row.gpu_seconds
        setattr(gs, key.kind, getattr(gs, key.kind) + seconds)
        gs.total += seconds
        row.credits += seconds / 3600.0 * _rate(cost, key.flavour)
    # Counted in plain lists first: a month holds ~100k rows, and each assignment to a
    # pydantic model field costs microseconds.
    waits: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    hour_names: dict[float, str] = {}
    for r in requests:
        if not since <= r.at < until or (user is not None and r.user != user):
            continue
        if by in ("day", "hour"):
            hour = r.at - r.at % HOUR
            name = hour_names.get(hour) or hour_names.setdefault(hour, _hour_key(hour, by))
        else:
            name = _row_key(r, by, names)
        c = counts[name]
        c[0] += 1
        c[1] += r.tokens_in
        c[2] += r.tokens_out
        c[3] += r.wake_gpu is not None
        waits[name].append(r.queued_s)
    for name, (n, tokens_in, tokens_out, cold) in counts.items():
        row = rows[name]
        row.requests += n
        row.tokens_in += tokens_in
        row.tokens_out += tokens_out
        row.waits.cold += cold
    out: list[UsageRow] = []
    for name, row in rows.items():
        row.key = name
        row.waits.median_s = _quantile(waits[name], 0.5)
        row.waits.p90_s = _quantile(waits[name], 0.9)
        gs = row.gpu_seconds
        gs.serving, gs.waking, gs.held, gs.total = (
            round(gs.serving, 3), round(gs.waking, 3), round(gs.held, 3), round(gs.total, 3))
        row.credits = round(row.credits, 4)
        out.append(row)
    if by in ("day", "hour"):
        out.sort(key=lambda r: r.key)
    else:
        out.sort(key=lambda r: (-r.gpu_seconds.total, r.key))
    always_on = managed
    return UsageReport(
        since=_iso(since), until=_iso(until), by=by,
        billed_gpu_seconds=round(billed, 3),
        always_on_gpu_seconds=round(always_on, 3),
        savings=round(1.0 - billed / always_on, 4) if always_on > 0 else 0.0,
        unattributed={k: round(v, 3) for k, v in sorted(lost.items())},
        rows=out,
    )


def _add_rollups(rows: dict[str, UsageRow], lost: dict[str, float],
                 rollups: Sequence[DailyRollup], by: By, user: str | None) -> float:
    """Add retired days to ``rows`` and ``lost``; returns the seconds they billed."""
    source = "user" if by in ("user", "day", "hour") else by
    billed = 0.0
    for r in rollups:
        if r.by == "reason":
            lost[r.key] += r.unattributed
            billed += r.unattributed
            continue
        if r.by == "user":
            billed += r.serving + r.waking + r.held
        if r.by != source or (user is not None and (r.by != "user" or r.key != user)):
            continue
        row = rows[r.day if by in ("day", "hour") else r.key]
        gs = row.gpu_seconds
        gs.serving += r.serving
        gs.waking += r.waking
        gs.held += r.held
        gs.total += r.serving + r.waking + r.held
        row.requests += r.requests
        row.tokens_in += r.tokens_in
        row.tokens_out += r.tokens_out
        row.waits.cold += r.cold
        row.credits += r.credits
    return billed


def window_attribution(store: Store, since: float, until: float, *,
                       horizon: float = HORIZON,
                       ) -> tuple[Attribution, list[RequestRow], float]:
    """Attribute ``[since, until)`` from ``store``'s ledger (rows not yet flushed included)."""
    events = store.ledger.timeline(until, since - LOOKBACK)
    requests = store.requests(since - horizon, until)
    return attribute(events, requests, since, until), requests, _managed(events, since, until)


def usage_report(
    store: Store, *, since: float, until: float, by: str = "user", cost: CostConfig,
    user: str | None = None, names: Mapping[str, str] | None = None,
) -> UsageReport:
    """The usage report of ``store`` for ``[since, until)`` grouped ``by``."""
    if by not in BY:
        raise UsageError(f"cannot group by {by!r}", hint=f"Use one of: {', '.join(BY)}.")
    if until <= since:
        raise UsageError("--until must be later than --since")
    # Days whose rows were retired are read from their roll-ups (whole days).
    last = store.ledger.last_rollup_day()
    rollups: list[DailyRollup] = []
    start = since
    if last is not None and day_name(since) <= last:
        rollups = store.ledger.rollups(day_name(since), min(day_name(until), last) + "~")
        start = min(until, _midnight_after(last))
    attribution, requests, managed = window_attribution(store, start, until)
    if start > since:
        managed = _managed(store.ledger.timeline(until, since - LOOKBACK), since, until)
    return build_report(attribution, requests, managed, by=by, cost=cost,
                        user=user, names=names, rollups=rollups, since=since)


def _midnight_after(day: str) -> float:
    return datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp() + DAY


def period_start(per: str, now: float) -> float:
    """The start (UTC) of the budget period holding ``now``: day, ISO week or month."""
    moment = datetime.fromtimestamp(now, tz=timezone.utc)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if per == "week":
        day -= timedelta(days=day.weekday())
    elif per == "month":
        day = day.replace(day=1)
    return day.timestamp()


def period_end(per: str, now: float) -> float:
    """When the budget period holding ``now`` ends (its reset time)."""
    start = datetime.fromtimestamp(period_start(per, now), tz=timezone.utc)
    if per == "day":
        return (start + timedelta(days=1)).timestamp()
    if per == "week":
        return (start + timedelta(days=7)).timestamp()
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    return start.replace(year=year, month=month).timestamp()
