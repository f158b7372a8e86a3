"""Per-request limits the HTTP server does not keep for us: write stalls, clients' shares.

granian bounds heads (``server.header_timeout_seconds``) and connections in total
(``server.max_connections``); these two need to know what a request is doing, so they live
in the app:

* ``StallWatch``: a client that stops reading makes ``send`` wait (granian's backpressure;
  reading from the node pauses too, see ``upstream``). That is right for a moment and wrong
  for ever: the stream holds a GPU slot. Each stream notes when its current ``send`` began;
  one sweeper for all streams (not a timer per chunk: the hot path stays one attribute
  write per chunk) cancels any stream whose ``send`` has waited longer than
  ``server.stall_timeout_seconds``. Cancelling frees the slot and closes the node connection.
* ``ClientShare``: requests in flight per client address, capped at
  ``server.max_connections_per_client``; past it a request is answered 429 at once, before
  its body is read. (Idle connections never reach the app; ``max_connections`` bounds them.)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from gpuctl.tasks import cancel_and_wait

__all__ = ["ClientShare", "StallWatch", "Stallable"]

log = logging.getLogger(__name__)


class Stallable(Protocol):
    #: ``loop.time()`` when the current ``send`` began; 0.0 while not sending.
    sending_since: float

    def stalled(self) -> None: ...


class StallWatch:
    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.streams: set[Stallable] = set()
        self.cancelled = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._sweep())

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        every = max(0.1, self.limit / 4)
        while True:
            await asyncio.sleep(every)
            self.check(loop.time())

    def check(self, now: float) -> int:
        """Cancel the streams stalled at ``now``; return how many."""
        stalled = [s for s in self.streams
                   if s.sending_since and now - s.sending_since > self.limit]
        for stream in stalled:
            self.streams.discard(stream)
            stream.stalled()
        if stalled:
            self.cancelled += len(stalled)
            log.warning("cancelled %d stream(s) whose client stopped reading for %.0f s",
                        len(stalled), self.limit)
        return len(stalled)


class ClientShare:
    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: no limit
        self.counts: dict[str, int] = {}

    def enter(self, client: str) -> bool:
        """Count a request from ``client``; False (and not counted) past the limit."""
        count = self.counts.get(client, 0)
        if self.limit and count >= self.limit:
            return False
        self.counts[client] = count + 1
        return True

    def leave(self, client: str) -> None:
        count = self.counts.get(client, 0) - 1
        if count > 0:
            self.counts[client] = count
        else:
            self.counts.pop(client, None)
