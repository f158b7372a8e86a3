"""The one way a long-lived task is stopped: cancel it and wait until it has ended.

Every part that runs a loop of its own (sweepers, syncs, heartbeats) stops it on shutdown;
waiting for the cancellation to land matters, since a loop cancelled but not awaited may
still be writing when the part's next step (closing a connection, a store) runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["cancel_and_wait"]


async def cancel_and_wait(task: asyncio.Future[Any] | None) -> None:
    """Cancel ``task`` (None: nothing to stop) and wait until it has ended."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
