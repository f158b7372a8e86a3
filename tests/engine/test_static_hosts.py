"""The engine over fixed hosts (``provider = "static"``): routes, never wakes or pauses."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from gpuctl.cloud.base import Workspace
from gpuctl.cloud.static import StaticProvider
from gpuctl.config import Config
from gpuctl.engine import Engine, FakeClock, GpuState, ModelView
from gpuctl.errors import NotCloudManaged, Unavailable
from gpuctl.store import Store


class FixedNode:
    """A node that is up or down as the test says, with fixed models."""

    up: ClassVar[dict[str, bool]] = {}

    def __init__(self, ws: Workspace) -> None:
        self.base_url = ws.node_url or ""

    async def ready(self) -> bool:
        return self.up.get(self.base_url, False)

    async def tags(self) -> list[ModelView]:
        return [ModelView(name="llama3.2:latest", model="llama3.2:latest")]

    async def ps(self) -> list[dict[str, Any]]:
        return []


async def test_static_hosts_serve_but_are_never_woken_or_paused() -> None:
    clock = FakeClock()
    FixedNode.up = {"http://10.0.0.5:11434": True, "http://10.0.0.6:11434": False}
    cloud = StaticProvider(["10.0.0.5", "10.0.0.6"])
    store = Store.memory()
    engine = Engine(Config(), cloud, store, clock=clock, nodes=FixedNode)
    await engine.start()
    try:
        states = {g.name: g.state for g in engine.gpus()}
        assert states == {"10.0.0.5:11434": GpuState.IDLE, "10.0.0.6:11434": GpuState.STARTING}
        ticket = await engine.acquire("llama3.2", "alice")
        assert ticket.base_url == "http://10.0.0.5:11434"
        engine.release(ticket)
        assert (await engine.wake("10.0.0.5")).message.endswith("already running")
        with pytest.raises(NotCloudManaged):
            await engine.wake("10.0.0.6")
        with pytest.raises(NotCloudManaged):
            await engine.pause("10.0.0.5")
        await clock.advance(3600, step=10)
        assert engine.gpu("10.0.0.5").state is GpuState.IDLE  # no idle pause

        FixedNode.up["http://10.0.0.5:11434"] = False
        await clock.advance(10)
        with pytest.raises(Unavailable, match=r"no host with llama3\.2:latest is answering"):
            await engine.acquire("llama3.2", "alice")
    finally:
        await engine.stop()
        store.close()
