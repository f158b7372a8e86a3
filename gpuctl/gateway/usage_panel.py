"""The status page's usage panels, read from the ledger: today, this month, your requests,
and for admins a chart of GPU-hours per day by user against the always-on line.

Everything comes from ``engine.usage`` (the ledger's attributed report, the one ``gpuctl
usage`` prints) and ``engine.requests``; this module only picks the windows and who sees
what: a user gets the fleet totals and their own rows and requests, an admin every row and
the chart. A report attributes every billed GPU-second of its window, which is not free
(a busy month: about a second, in a thread), so answers are cached per viewer, today's for
``CACHE_SECONDS`` and the month and chart for ``SLOW_CACHE_SECONDS``, and built one at a
time: a hundred open pages cost one build, not a hundred.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from gpuctl.engine.usage import UsageReport, day_name, period_start
from gpuctl.gateway.context import EngineFace
from gpuctl.store.keys import ApiKey

__all__ = ["CACHE_SECONDS", "CHART_DAYS", "RECENT_REQUESTS", "SLOW_CACHE_SECONDS",
           "UsagePanels"]

#: Today's figures and requests are this fresh at worst; the page asks a second after a change.
CACHE_SECONDS = 5.0
#: This month and the admin chart (16 reports, each in a thread) move slowly: this fresh.
SLOW_CACHE_SECONDS = 60.0
#: Days in the admin chart, today included.
CHART_DAYS = 14
#: Your own requests shown, newest first.
RECENT_REQUESTS = 20
DAY = 86_400.0


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec="seconds")


def _report(report: UsageReport) -> dict[str, Any]:
    return {
        "billed_hours": round(report.billed_gpu_seconds / 3600, 3),
        "always_on_hours": round(report.always_on_gpu_seconds / 3600, 3),
        "savings": report.savings,
        "rows": [{"user": row.key, "requests": row.requests, "tokens_in": row.tokens_in,
                  "tokens_out": row.tokens_out,
                  "gpu_hours": round(row.gpu_seconds.total / 3600, 3),
                  "credits": round(row.credits, 2), "cold": row.waits.cold}
                 for row in report.rows],
    }


class UsagePanels:
    """What ``GET /ui/usage`` answers, per viewer, cached briefly and built one at a time."""

    def __init__(self, engine: EngineFace, *,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.monotonic = monotonic
        self._fast: dict[str, tuple[float, dict[str, Any]]] = {}
        self._slow: dict[str, tuple[float, dict[str, Any]]] = {}
        self._building = asyncio.Lock()

    async def for_key(self, key: ApiKey) -> dict[str, Any]:
        user = None if key.is_admin else key.name
        viewer = user or ""
        async with self._building:  # a hundred pages asking at once build it once
            now = self.engine.overview().at  # the engine's clock is the ledger's
            fast = await self._cached(self._fast, viewer, CACHE_SECONDS,
                                      lambda: self._today(user, now))
            slow = await self._cached(self._slow, viewer, SLOW_CACHE_SECONDS,
                                      lambda: self._longer(user, now))
        return {**fast, **slow}

    async def _cached(self, cache: dict[str, tuple[float, dict[str, Any]]], viewer: str,
                      ttl: float, build: Callable[[], Awaitable[dict[str, Any]]],
                      ) -> dict[str, Any]:
        asked = self.monotonic()
        hit = cache.get(viewer)
        if hit is not None and asked - hit[0] < ttl:
            return hit[1]
        answer = await build()
        if len(cache) > 1024:  # one entry per user who opened the page; bounded
            cache.clear()
        cache[viewer] = (asked, answer)
        return answer

    async def _today(self, user: str | None, now: float) -> dict[str, Any]:
        today = period_start("day", now)
        report = await self.engine.usage(since=_iso(today), by="user", user=user)
        # Up to and with ``now``: a request that arrived this very second is today's too.
        mine = [r for r in self.engine.requests(today, now + 1)
                if user is None or r.user == user]
        return {
            "at": round(now, 1),
            "today": _report(report),
            "requests": [
                {"at": round(r.at, 1), "user": r.user, "model": r.model, "gpu": r.gpu_id,
                 "queued_s": round(r.queued_s, 1), "cold": r.cold,
                 "service_s": round(r.service_s, 1), "tokens_out": r.tokens_out,
                 "outcome": r.outcome}
                for r in reversed(mine[-RECENT_REQUESTS:])
            ],
        }

    async def _longer(self, user: str | None, now: float) -> dict[str, Any]:
        month = await self.engine.usage(since=_iso(period_start("month", now)), by="user",
                                        user=user)
        answer: dict[str, Any] = {"month": _report(month)}
        if user is None:
            today = period_start("day", now)
            answer["days"] = [await self._day(today - i * DAY, now)
                              for i in range(CHART_DAYS - 1, -1, -1)]
        return answer

    async def _day(self, start: float, now: float) -> dict[str, Any]:
        report = await self.engine.usage(since=_iso(start), until=_iso(min(start + DAY, now)),
                                         by="user")
        return {
            "day": day_name(start),
            "always_on_hours": round(report.always_on_gpu_seconds / 3600, 3),
            "billed_hours": round(report.billed_gpu_seconds / 3600, 3),
            "users": {row.key: round(row.gpu_seconds.total / 3600, 3) for row in report.rows},
        }
