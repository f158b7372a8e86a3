"""What the gateway does between SIGTERM and exit: nobody waiting is dropped without a word.

The HTTP server stops accepting and gives the requests it serves up to ``grace`` seconds to
finish (``cli/serve.py``). Requests that were relaying keep relaying. Requests still waiting
for a GPU or a slot are the ones at risk (fault run 2 of issue 9: at the 30 s limit six held
requests were cut with no answer, and nothing was logged). So, beside the server's own
drain:

1. at once, the waiters not expected to be served within the grace (a wake taking minutes)
   are answered ``503 {"error": "gateway restarting"}`` with ``Retry-After`` (on a stream
   already started: an error event or line, see ``proxy._Call._fail``), and so is every new
   request from now on (``Engine.turn_away``);
2. the others keep their place while they may still be served, until ``ANSWER_MARGIN``
   seconds before the grace ends; then they are answered the same way;
3. the end is logged with what happened to each: finished, told to come back, or cut at
   the grace limit (still relaying when it ended).

A resume in flight is not cancelled here: it stays recorded in the store, the cloud carries
on, and the next start adopts it. Start and end are logged at WARNING because ``serve``
configures no logging: WARNING is what reaches stderr (an operator restarting the gateway
wants to see that it drained, and how).

``cli/serve.py`` runs ``drain(gw, grace, server.finish(grace))`` once the server stopped
accepting, so the server's own drain (``served_done``) and this one share the grace.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gpuctl.gateway.context import Gateway

__all__ = ["ANSWER_MARGIN", "DrainReport", "drain"]

log = logging.getLogger(__name__)

#: Seconds before the grace ends by which every waiter has its answer (writing a 503 takes
#: microseconds; the margin is for a loop busy with hundreds of streams).
ANSWER_MARGIN = 3.0
#: How often the drain looks at the engine's counts (real seconds; bounded by the grace).
_POLL = 0.05


@dataclass(frozen=True)
class DrainReport:
    """What became of the requests the gateway had when it was told to stop."""

    seconds: float
    finished: int
    turned_away: int
    cut: int


async def drain(gw: Gateway, grace: float,
                served_done: Awaitable[Any] | None = None) -> DrainReport:
    """Answer every waiter before ``grace`` seconds pass; return once nothing is in flight
    (or ``served_done``, the server's own drain, completes) or the grace has passed."""
    engine = gw.engine
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + grace
    answer_at = start + max(0.0, grace - min(ANSWER_MARGIN, grace / 3))
    relaying, waiting = engine.in_flight(), engine.queue_depth()
    granted_before = engine.metrics().requests_granted
    turned_before = engine.turned_away()
    log.warning("draining for up to %g s: %d request%s in flight, %d waiting for a GPU",
                grace, relaying, "" if relaying == 1 else "s", waiting)
    engine.turn_away(unless_within=answer_at - loop.time())
    await _until(lambda: not engine.queue_depth(), answer_at)
    engine.turn_away()
    if served_done is not None:
        done = asyncio.ensure_future(served_done)
        await asyncio.wait({done}, timeout=max(0.0, end - loop.time()))
    await _until(lambda: not engine.in_flight(), end)
    cut = engine.in_flight()
    granted = engine.metrics().requests_granted - granted_before
    report = DrainReport(
        seconds=loop.time() - start,
        finished=relaying + granted - cut,
        turned_away=engine.turned_away() - turned_before,
        cut=cut,
    )
    log.warning("drained in %.1f s: %d finished, %d told to retry (gateway restarting), "
                "%d cut at the %g s limit", report.seconds, report.finished,
                report.turned_away, report.cut, grace)
    return report


async def _until(done: Callable[[], bool], deadline: float) -> None:
    """Look at ``done`` every ``_POLL`` s until it holds or ``deadline`` (loop time) passes.
    Polled rather than evented: it happens once per process life, and bounded."""
    loop = asyncio.get_running_loop()
    while True:
        if done() or loop.time() >= deadline:
            return
        await asyncio.sleep(_POLL)
