"""The demo's running commentary: one readable line per thing that happens to the fleet.

A newcomer watching ``gpuctl serve --demo`` should see the lifecycle as it unfolds: a GPU
waking, ready, serving someone (and why that GPU), a lease running out, the GPU pausing.
``LifecycleLog`` derives the fleet events from successive ``Engine.gpus()`` snapshots (a
pure function of two snapshots, so it is tested without any clock); ``NarratedEngine`` adds
the one event snapshots cannot show reliably, each request granted, with the engine's own
reason; ``Narrator`` stamps the lines with the time of day and keeps them in order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from gpuctl.cloud.base import CloudProvider
from gpuctl.config import Config
from gpuctl.engine.api import GpuState, GpuView, ProgressCallback, Ticket
from gpuctl.engine.clock import Clock
from gpuctl.engine.engine import Engine, NodeFactory
from gpuctl.store import RequestRow, Store

__all__ = ["LifecycleLog", "NarratedEngine", "Narrator"]


class LifecycleLog:
    """Turns successive fleet snapshots into one readable line per lifecycle event."""

    def __init__(self) -> None:
        self._last: dict[str, GpuView] = {}
        self._woke_at: dict[str, float] = {}

    def update(self, gpus: Iterable[GpuView], now: float) -> list[str]:
        """The events since the previous snapshot, in GPU name order."""
        lines: list[str] = []
        for gpu in sorted(gpus, key=lambda g: g.name):
            before = self._last.get(gpu.id)
            self._last[gpu.id] = gpu
            if before is not None:
                lines += [f"{gpu.name}  {event}" for event in self._events(before, gpu, now)]
        return lines

    def _events(self, before: GpuView, after: GpuView, now: float) -> list[str]:
        # A lease running out is what lets a GPU pause: told first when seen together.
        gone = {lease.user for lease in before.leases} - {lease.user for lease in after.leases}
        events = [f"lease of {user} expired" for user in sorted(gone)]
        old, new = before.state, after.state
        if new is old:
            return events
        if new is GpuState.STARTING:
            self._woke_at[after.id] = now
            estimate = after.estimated_resume_seconds
            events.append("waking up" + (f" (about {estimate:.0f} s)" if estimate else ""))
        elif new.ready and not old.ready:
            woke = self._woke_at.pop(after.id, None)
            events.append("ready" + (f" after {now - woke:.1f} s" if woke is not None else "")
                          + f": {', '.join(after.models) or 'no models'}")
        elif new is GpuState.PAUSING:
            events.append("pausing: no lease, no request, nothing queued")
        elif new is GpuState.PAUSED:
            events.append("paused")
        elif new is GpuState.UNAVAILABLE:
            events.append(f"unavailable: {after.last_error or 'Ollama does not answer'}")
        return events


class Narrator:
    """Prints the lifecycle log with the time of day, from the watcher and from grants."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.log = LifecycleLog()

    def catch_up(self, gpus: Iterable[GpuView]) -> None:
        for line in self.log.update(gpus, time.monotonic()):
            self.tell(line)

    def tell(self, line: str) -> None:
        self.say(f"{time.strftime('%H:%M:%S')}  {line}")

    async def watch(self, engine: Engine, every: float) -> None:
        while True:
            self.catch_up(engine.gpus())
            await asyncio.sleep(every)


class NarratedEngine(Engine):
    """The engine, telling the demo's log which GPU serves each request, and why."""

    def __init__(self, config: Config, cloud: CloudProvider, store: Store, *, clock: Clock,
                 nodes: NodeFactory, narrator: Narrator | None = None) -> None:
        super().__init__(config, cloud, store, clock=clock, nodes=nodes)
        self.narrator = narrator

    async def acquire(
        self, model: str, user: str, *, progress: ProgressCallback | None = None,
        request: RequestRow | None = None,
    ) -> Ticket:
        ticket = await super().acquire(model, user, progress=progress, request=request)
        if self.narrator is not None:
            self.narrator.catch_up(self.gpus())  # "ready" before "serving", not after
            self.narrator.tell(
                f"{ticket.gpu_name}  serving {user}: {ticket.model} ({ticket.reason})")
        return ticket
