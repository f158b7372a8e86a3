"""A whole gateway world per test: real sockets on 127.0.0.1, the real engine on a fake clock.

``World`` holds the simulated cloud (``SimCloud`` on a ``FakeClock``), one simulated Ollama
server (``SimOllama`` under granian) per GPU, the real ``Engine``, the key store with an
admin and a user key, and the gateway itself as ``gpuctl serve`` runs it (granian, the raw
hot path and Quart behind it). Clients are the real ones
(httpx, ``ollama``, ``openai``). Cloud time moves only when a test advances the clock; the
only real-time waiting is for bytes on loopback sockets, always bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai

from gpuctl.cloud.base import CloudProvider
from gpuctl.cloud.surf import SurfProvider
from gpuctl.config import Config
from gpuctl.credentials import Credentials
from gpuctl.engine.clock import FakeClock
from gpuctl.engine.engine import Engine
from gpuctl.gateway.app import GatewayApp, create_app
from gpuctl.gateway.server import ServerSettings, running_gateway
from gpuctl.sim.cloud import SimCloud
from gpuctl.sim.ollama import SimOllama
from gpuctl.sim.servers import running
from gpuctl.sim.surf_api import SurfApiSim
from gpuctl.store import Store
from gpuctl.store.keys import KeyStore

NODE_TOKEN = "node-secret-token"
SURF_TOKEN = "surf-sim-token"


async def _no_wait(seconds: float) -> None:
    """The provider's retry backoff, not waited out (cloud time is the fake clock's)."""
    await asyncio.sleep(0)


@dataclass
class World:
    clock: FakeClock
    cloud: SimCloud
    nodes: dict[str, SimOllama]
    engine: Engine
    keys: KeyStore
    store: Store
    app: GatewayApp
    url: str
    admin_key: str
    user_key: str
    surf: SurfApiSim | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    closers: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)

    def ollama(self, key: str | None = None) -> ollama.AsyncClient:
        """The real ``ollama.AsyncClient`` pointed at the gateway, closed at teardown."""
        client = ollama.AsyncClient(host=self.url, headers=self.headers(key))
        self.closers.append(client.close)
        return client

    def openai(self, key: str | None = None, **options: Any) -> openai.AsyncOpenAI:
        """The real ``openai.AsyncOpenAI`` pointed at the gateway's /v1, closed at teardown."""
        client = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key or self.user_key,
                                    **options)
        self.closers.append(client.close)
        return client

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.user_key}"}

    def client(self, key: str | None = None, **options: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self.headers(key), timeout=10,
                                 **options)

    def gpu(self, name: str) -> Any:
        return self.engine.gpu(name)

    async def until(self, condition: Callable[[], bool], *, limit: float = 900,
                    step: float = 1.0) -> None:
        """Advance the fake clock until ``condition()`` holds (engine time, no sleeping)."""
        await self.clock.advance_until(condition, limit=limit, step=step)


@dataclass
class GpuSpec:
    name: str
    status: str = "running"
    models: tuple[str, ...] = ("llama3.2:latest",)
    chunks: int = 4
    #: Where the gateway finds the node, if not at its simulated Ollama server.
    url: str | None = None


WorldFactory = Callable[..., contextlib.AbstractAsyncContextManager[World]]


def world_factory(tmp_path: Path) -> WorldFactory:
    """``make_world(*gpus, slots=..., ...)``: an async context manager yielding a ``World``."""

    @contextlib.asynccontextmanager
    async def factory(*gpus: GpuSpec, slots: int = 2, max_queue: int = 64,
                      max_body_mb: float = 64, known: dict[str, list[str]] | None = None,
                      wait_notice: str = "thinking", drift: float = 0.0,
                      cloud_api: bool = False,
                      server: dict[str, Any] | None = None) -> AsyncIterator[World]:
        """``cloud_api``: the engine reaches the simulated cloud as gpuctl reaches SURF, the
        real ``SurfProvider`` over HTTP to ``SurfApiSim`` (``world.surf``: fault injection),
        its retry backoff not waited out."""
        gpus = gpus or (GpuSpec("gpu-1"),)
        clock = FakeClock(drift=drift)
        cloud = SimCloud(clock, resume_seconds=60, pause_seconds=30, ollama_seconds=5)
        config = Config.model_validate({
            "server": {"max_queue": max_queue, "queue_timeout_seconds": 900,
                       "max_body_mb": max_body_mb, "wait_notice": wait_notice,
                       **(server or {})},
            "gpu": {"slots": slots},
            "timing": {"reservation_minutes": 10, "fallback_reservation_minutes": 3,
                       "startup_timeout_seconds": 600, "ollama_readiness_wait_seconds": 120,
                       "poll_interval_seconds": 10},
        })
        store = Store.open(tmp_path / "state")
        keys = KeyStore.open(tmp_path / "state")
        _, admin_key = keys.create("admin", email="admin@example.org", admin=True)
        _, user_key = keys.create("alice", email="alice@example.org")
        nodes: dict[str, SimOllama] = {}
        async with contextlib.AsyncExitStack() as stack:
            for spec in gpus:
                node = SimOllama(list(spec.models), chunks=spec.chunks, token=NODE_TOKEN)
                node_url = await stack.enter_async_context(running(node))
                machine = cloud.add(spec.name, status=spec.status, models=spec.models,
                                    base_url=spec.url or node_url)
                nodes[spec.name] = node
                if known is not None and spec.name in known:
                    entries = [{"name": m, "model": m} for m in known[spec.name]]
                    store.save_models(machine.id, entries, clock.wall())
            provider: CloudProvider = cloud
            surf: SurfApiSim | None = None
            if cloud_api:
                surf = SurfApiSim(cloud=cloud, token=SURF_TOKEN)
                surf_url = await stack.enter_async_context(running(surf))
                provider = SurfProvider(f"{surf_url}/v1", SURF_TOKEN, sleep=_no_wait)
                stack.push_async_callback(provider.aclose)
            engine = Engine(config, provider, store, clock=clock, nodes=cloud.node)
            app = create_app(config, engine, keys, node_token=NODE_TOKEN)
            settings = ServerSettings.from_config(config, Credentials().setting_file)
            url = await stack.enter_async_context(running_gateway(app, settings=settings))
            world = World(clock, cloud, nodes, engine, keys, store, app, url, admin_key,
                          user_key, surf=surf)
            # The engine has started: ``running_gateway`` waits for the lifespan startup.
            try:
                yield world
            finally:
                for task in world.tasks:
                    task.cancel()
                await asyncio.gather(*world.tasks, return_exceptions=True)
                for close in world.closers:
                    await close()
        keys.close()
        store.close()

    return factory
