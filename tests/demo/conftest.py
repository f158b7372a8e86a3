"""Demo fixtures: the demo fleet in-process behind the real gateway, on real loopback sockets.

``start_demo(**timings)`` runs ``demo_fleet`` with timings shrunk to fractions of a second
(resumes of 0.2-0.3 s, no Ollama boot delay), serves it through the gateway exactly as
``gpuctl serve --demo`` does, and publishes it in ``$GPUCTL_HOME/cache/demo.json`` so
``gpuctl status --demo`` finds it. The clock is the real one, as in the demo: every wait in
these tests is for a condition, bounded, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import ollama
import openai
import pytest
from typer.testing import CliRunner, Result

from gpuctl.cli.context import AppContext
from gpuctl.cli.main import app
from gpuctl.cli.remote import DEMO_FILE, published_demo
from gpuctl.config import Config, cache_dir
from gpuctl.engine.api import GpuView
from gpuctl.gateway.app import GatewayApp, create_app
from gpuctl.gateway.server import running_gateway
from gpuctl.sim.demo import DemoFleet, DemoTimings, demo_fleet

#: Whole lifecycles in about a second of real time.
FAST = DemoTimings(resume_scale=0.05, pause_seconds=0.3, ollama_seconds=0.0,
                   poll_interval_seconds=0.05, word_seconds=0.0, watch_seconds=0.02)


@dataclass
class RunningDemo:
    fleet: DemoFleet
    url: str
    log: list[str] = field(default_factory=list)
    gateway: GatewayApp | None = None
    closers: list[Callable[[], Any]] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.fleet.key}"}

    def ollama(self) -> ollama.AsyncClient:
        client = ollama.AsyncClient(host=self.url, headers=self.headers)
        self.closers.append(client.close)
        return client

    def openai(self) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.fleet.key)
        self.closers.append(client.close)
        return client

    def gpu(self, name: str) -> GpuView:
        return self.fleet.engine.gpu(name)

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.log)


DemoFactory = Callable[..., contextlib.AbstractAsyncContextManager[RunningDemo]]


@pytest.fixture
def start_demo() -> DemoFactory:
    @contextlib.asynccontextmanager
    async def start(**timings: Any) -> AsyncIterator[RunningDemo]:
        log: list[str] = []
        async with demo_fleet(Config(), timings=replace(FAST, **timings),
                              say=log.append) as fleet:
            gateway = create_app(fleet.config, fleet.engine, fleet.keys)
            async with running_gateway(gateway) as url:
                demo = RunningDemo(fleet, url, log, gateway)
                with published_demo(cache_dir(os.environ) / DEMO_FILE, url, fleet.key):
                    # The first answer waits for the engine's start (the server's lifespan).
                    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                        assert (await client.get("/health")).status_code == 200
                    try:
                        yield demo
                    finally:
                        for close in demo.closers:
                            await close()

    return start


def gpuctl(*args: str) -> Result:
    """``gpuctl ARGS`` in-process, as a user runs it (``GPUCTL_HOME`` from the test)."""
    ctx = AppContext(env=dict(os.environ))
    return CliRunner().invoke(app, list(args), obj=ctx, prog_name="gpuctl")


async def gpuctl_beside(*args: str) -> Result:
    """``gpuctl ARGS`` from a thread, so the demo in this event loop can answer it."""
    return await asyncio.to_thread(gpuctl, *args)
