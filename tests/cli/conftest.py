"""CLI fixtures: the simulated SURF API and an Ollama node on real loopback sockets, and a
runner that invokes ``gpuctl`` in-process with an injected ``AppContext``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from gpuctl.cli.context import AppContext
from gpuctl.cli.main import app
from gpuctl.sim.ollama import SimOllama
from gpuctl.sim.servers import ServerThread
from gpuctl.sim.surf_api import SurfApiSim

TOKEN = "sim-token"


@dataclass
class Cloud:
    """The simulated SURF API and one simulated Ollama node every workspace points at."""

    sim: SurfApiSim
    url: str
    node: SimOllama
    node_url: str

    @property
    def node_port(self) -> int:
        return int(self.node_url.rsplit(":", 1)[1])

    def env(self) -> dict[str, str]:
        return {
            "GPUCTL_CLOUD_API__BASE_URL": f"{self.url}/v1",
            "GPUCTL_CLOUD_API__MACHINE_NAME_FILTER": "gpu",
            "GPUCTL_GPU__OLLAMA_URL": f"http://{{ip}}:{self.node_port}",
            "GPUCTL_TIMING__POLL_INTERVAL_SECONDS": "0.02",
            "GPUCTL_API_TOKEN": TOKEN,
        }


@pytest.fixture
def cloud() -> Iterator[Cloud]:
    # A transition (resuming, pausing) ends at the 2nd read after the action: the CLI sees
    # the real walk paused -> resuming -> running without anyone waiting on a clock.
    sim = SurfApiSim(token=TOKEN, page_size=2, settle_after_reads=2)
    node = SimOllama(["llama3.2", "qwen2.5:7b"])
    with ServerThread(sim) as url, ServerThread(node) as node_url:
        yield Cloud(sim, url, node, node_url)


@dataclass
class Gpuctl:
    """Runs ``gpuctl ARGS`` in-process; ``env`` is what the command sees as its environment."""

    env: dict[str, str] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *args: str, input: str | None = None, **context: Any) -> Result:
        env = {**os.environ, **self.env}
        ctx = AppContext(env=env, **{**self.context, **context})
        runner = CliRunner()
        return runner.invoke(app, list(args), input=input, obj=ctx, env=self.env,
                             prog_name="gpuctl")


@pytest.fixture
def gpuctl() -> Gpuctl:
    return Gpuctl()


@pytest.fixture
def gpuctl_on(cloud: Cloud) -> Gpuctl:
    """``gpuctl`` pointed at the simulated cloud, with the token in the environment."""
    return Gpuctl(env=cloud.env())


NoSleep = Callable[[float], Any]


async def no_sleep(seconds: float) -> None:
    """Backoff that does not wait (the provider's ``sleep`` is injectable)."""
