"""A simulated fleet on a fake clock: the engine's whole world, built per test."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

from gpuctl.config import Config
from gpuctl.engine import Engine, FakeClock, Ticket
from gpuctl.sim.cloud import SimCloud
from gpuctl.store import Store

T = TypeVar("T")


class Fleet:
    """Clock, cloud, store and engine(s) for one scenario."""

    def __init__(self, state_dir: Path) -> None:
        self.clock = FakeClock()
        self.cloud = SimCloud(self.clock, resume_seconds=120, pause_seconds=60, ollama_seconds=5)
        self.state_dir = state_dir
        self.store = Store.open(state_dir)
        self.engines: list[Engine] = []
        self.stores: list[Store] = [self.store]
        self.config = Config.model_validate(
            {
                "server": {"max_queue": 256, "queue_timeout_seconds": 900},
                "gpu": {"slots": 4},
                "timing": {
                    "reservation_minutes": 10,
                    "fallback_reservation_minutes": 3,
                    "startup_timeout_seconds": 600,
                    "ollama_readiness_wait_seconds": 120,
                    "poll_interval_seconds": 10,
                },
            }
        )

    def configure(self, **sections: dict[str, Any]) -> None:
        data = self.config.model_dump()
        for section, values in sections.items():
            data[section].update(values)
        self.config = Config.model_validate(data)

    def reopen(self) -> Store:
        """A second connection to the same database, as a restarted process would open."""
        store = Store.open(self.state_dir)
        self.stores.append(store)
        return store

    async def start(self, *, store: Store | None = None) -> Engine:
        engine = Engine(
            self.config, self.cloud, store or self.store, clock=self.clock, nodes=self.cloud.node
        )
        await engine.start()
        self.engines.append(engine)
        return engine

    async def advance(self, seconds: float, step: float = 1.0) -> None:
        await self.clock.advance(seconds, step=step)

    def spawn(self, awaitable: Awaitable[T]) -> asyncio.Task[T]:
        return asyncio.ensure_future(awaitable)

    async def until(self, condition: Any, *, limit: float = 3600, step: float = 1.0) -> float:
        """Advance the clock until ``condition()`` holds; returns the clock seconds it took."""
        return await self.clock.advance_until(condition, limit=limit, step=step)

    async def close(self) -> None:
        for engine in self.engines:
            await engine.stop()
        for store in self.stores:
            store.close()


def done_tickets(tasks: list[asyncio.Task[Ticket]]) -> list[Ticket]:
    return [t.result() for t in tasks if t.done() and not t.cancelled() and t.exception() is None]
