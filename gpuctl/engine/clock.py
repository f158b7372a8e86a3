"""Time for the engine, injected so tests and the simulator run hours of fleet life in ms.

All waiting in the engine goes through a ``Clock``: ``sleep`` and ``timeout``. ``SystemClock``
is the real one; ``FakeClock`` only moves when a test calls ``advance``, waking the sleepers
whose deadline has come, in deadline order, and letting the event loop run between them;
with ``drift`` it also moves a little at every reading, as a real clock does between two
calls (a clock that never moved between two readings once hid a bug: two snapshots of
the same GPU compared equal only because their lease expiries were computed at one instant).
``VirtualClock`` is for replays (``gpuctl simulate``): its time jumps straight to the next
sleeper's deadline as soon as nothing on the event loop can run, so a day of fleet life costs
only the work done in it, not a fixed number of loop rounds per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

__all__ = ["Clock", "FakeClock", "SystemClock", "VirtualClock", "wait_with_timeout"]

T = TypeVar("T")


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds, for durations and deadlines."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch, for timestamps that are persisted or shown."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class FakeClock:
    """A clock that moves only when told. ``sleep`` parks until ``advance`` passes its deadline."""

    def __init__(self, start: float = 1_000.0, wall_start: float = 1_800_000_000.0, *,
                 drift: float = 0.0) -> None:
        self._now = start
        #: Seconds each ``now()`` adds, so no two readings are equal (0: a still clock).
        self.drift = drift
        self._wall_offset = wall_start - start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        self._now += self.drift
        return self._now

    def wall(self) -> float:
        return self._now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        await fut

    @property
    def sleepers(self) -> int:
        """How many sleeps are pending (cancelled ones included until their deadline)."""
        return sum(1 for _, _, fut in self._sleepers if not fut.done())

    async def settle(self, rounds: int = 50) -> None:
        """Let every ready task run until the loop has nothing left to do at this instant."""
        for _ in range(rounds):
            await asyncio.sleep(0)

    async def advance_until(self, condition: Callable[[], bool], *, limit: float,
                            step: float = 1.0) -> float:
        """Move time forward ``step`` by ``step`` until ``condition()`` holds; returns the
        clock seconds that took. ``TimeoutError`` past ``limit`` seconds of clock time."""
        start = self._now
        await self.settle()
        while not condition():
            if self._now - start > limit:
                raise TimeoutError(f"condition not met within {limit:g} s of clock time")
            await self.advance(step)
        return self._now - start

    async def advance(self, seconds: float, *, step: float | None = None) -> None:
        """Move time forward by ``seconds``, waking sleepers in deadline order.

        With ``step``, time moves in increments of at most ``step``, which lets periodic loops
        observe the intermediate instants as a real clock would.
        """
        target = self._now + seconds
        await self.settle()
        while True:
            next_deadline = self._sleepers[0][0] if self._sleepers else None
            limit = min(target, self._now + step) if step is not None else target
            if next_deadline is not None and next_deadline <= limit:
                self._now = max(self._now, next_deadline)
                while self._sleepers and self._sleepers[0][0] <= self._now:
                    _, _, fut = heapq.heappop(self._sleepers)
                    if not fut.done():
                        fut.set_result(None)
                await self.settle()
                continue
            self._now = limit
            await self.settle()
            if self._now >= target:
                return


class VirtualClock(FakeClock):
    """Discrete-event time: ``run_until`` moves to each deadline once the loop is quiet.

    "Quiet" means the event loop's ready queue holds nothing but the driver itself: every
    task woken at this instant has run until it waits on something. That is read from the
    loop's ready queue (``_ready``, a private attribute every CPython loop since 3.4 has);
    a loop without one gets ``FakeClock``'s fixed rounds instead. Only for code that does no
    real I/O: a socket's readiness is never waited for. It is a ``FakeClock`` (same time,
    same sleepers) that drives itself instead of being advanced by a test.
    """

    def __init__(self, start: float = 0.0, wall_start: float = 1_800_000_000.0) -> None:
        super().__init__(start, wall_start)  # FakeClock's time and sleepers; a still clock

    async def quiet(self) -> None:
        """Return once every task runnable at this instant has run."""
        ready = getattr(asyncio.get_running_loop(), "_ready", None)
        await asyncio.sleep(0)
        if ready is None:
            for _ in range(50):
                await asyncio.sleep(0)
            return
        while ready:  # noqa: ASYNC110 - nothing to wait on: this *is* the scheduler's idle test
            await asyncio.sleep(0)

    async def run_until(self, deadline: float) -> None:
        """Move time to ``deadline``, waking every sleeper due on the way in order."""
        heap = self._sleepers
        while True:
            await self.quiet()
            while heap and heap[0][2].done():  # cancelled sleeps
                heapq.heappop(heap)
            if not heap or heap[0][0] > deadline:
                self._now = max(self._now, deadline)
                return
            self._now = max(self._now, heap[0][0])
            while heap and heap[0][0] <= self._now:
                _, _, fut = heapq.heappop(heap)
                if not fut.done():
                    fut.set_result(None)


async def wait_with_timeout(clock: Clock, awaitable: Awaitable[T], timeout: float | None) -> T:
    """Await ``awaitable``, but give up after ``timeout`` seconds of *clock* time.

    Raises ``TimeoutError`` (and cancels the awaitable) when the clock runs out first.
    """
    task = asyncio.ensure_future(awaitable)
    if timeout is None:
        return await task
    timer = asyncio.ensure_future(clock.sleep(timeout))
    try:
        done, _ = await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        timer.cancel()
        raise
    if task in done:
        timer.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise TimeoutError(f"timed out after {timeout:g} s")
