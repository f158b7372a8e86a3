"""The engine's background tasks: started in one place, failures logged, stopped together.

Wakes, pauses, per-model suppliers, re-probes and closes of node clients run as tasks that
nobody awaits. Spawning them all through one ``Background`` keeps a strong reference to each
(the event loop keeps only weak ones), logs a failure that is not an expected ``GpuctlError``
instead of losing it, and gives ``Engine.stop`` the tasks still running. ``stopping`` is the
one flag every part of the engine reads so that nothing new starts while it stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from gpuctl.errors import GpuctlError

__all__ = ["Background"]

log = logging.getLogger(__name__)


class Background:
    """Every task the engine starts and does not await, and the flag that stops new ones."""

    def __init__(self) -> None:
        #: Set once by ``Engine.stop``; read before starting anything new.
        self.stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def running(self) -> list[asyncio.Task[Any]]:
        """The tasks spawned and not yet done."""
        return list(self._tasks)

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, GpuctlError):
                log.error("engine task failed", exc_info=exc)
