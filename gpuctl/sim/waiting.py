"""Bounded waiting for tests and benchmarks over real loopback sockets.

Engine time needs no waiting (advance the fake clock: ``FakeClock.advance_until``), but
bytes crossing a loopback socket and being handled take real time, however short. Tests wait
for that with ``eventually``: poll a condition until it holds, failing after a bound (never a
fixed sleep that hopes to be long enough).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["eventually"]


async def eventually(condition: Callable[[], bool], *, timeout: float = 10.0,
                     poll: float = 0.005) -> None:
    """Return once ``condition()`` holds; ``AssertionError`` after ``timeout`` real seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout:g} s")
        await asyncio.sleep(poll)
