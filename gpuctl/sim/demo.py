"""The fleet behind ``gpuctl serve --demo``: the real engine on three simulated GPUs.

A newcomer should see the whole lifecycle in a minute or two without a cloud account, a GPU,
a config file or a keyring: a request wakes a paused GPU, the GPU serves, its lease runs
out, it pauses. So ``demo_fleet`` builds everything the gateway needs from nothing:

- a ``SimCloud`` on the real clock with three paused workspaces that resume in a few seconds;
- one ``SimOllama`` per GPU on a loopback port, streaming a readable answer word by word,
  behind a ``PoweredNode`` gate that answers only while its workspace is running and
  Ollama has had time to start (a paused GPU's node is down, as on SURF);
- the real ``Engine``, probing those very servers with the real ``NodeClient``, so what the
  engine believes a GPU has and what the gateway proxies to are one and the same;
- a store and key store in a fresh temporary directory with one admin key, so the demo never
  reads credentials and never touches the user's own keys or state. The store is seeded as
  if the fleet had been seen before (its models, how long each GPU takes to resume), so the
  first request wakes the right GPU at once and the estimates it is told are true.

While it runs, the demo narrates the fleet's lifecycle (``gpuctl.sim.narration``). The
gateway itself is not built here: ``gpuctl serve`` (and the tests) serve the engine and
key store this module yields, exactly as for a real fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpuctl.config import Config, PathsConfig, TimingConfig
from gpuctl.engine.clock import SystemClock
from gpuctl.engine.engine import Engine
from gpuctl.node.client import NodeClient
from gpuctl.sim.asgi import Receive, Scope, Send
from gpuctl.sim.cloud import SimCloud
from gpuctl.sim.narration import NarratedEngine, Narrator
from gpuctl.sim.ollama import SimOllama
from gpuctl.sim.servers import running
from gpuctl.store import Store
from gpuctl.store.keys import KeyStore

if TYPE_CHECKING:
    from gpuctl.cloud.base import Workspace
    from gpuctl.node.base import NodeProbe

__all__ = [
    "DEMO_GPUS",
    "DemoFleet",
    "DemoGpu",
    "DemoTimings",
    "PoweredNode",
    "demo_fleet",
    "try_commands",
]

#: Who the demo key belongs to; the lifecycle log says "serving demo".
DEMO_USER = "demo"

#: What every simulated model answers, one word per streamed chunk.
ANSWER = (
    "Hello! This is {model} on {gpu}, a simulated GPU. gpuctl picked this GPU for you "
    "(waking it if it was paused) and streams this answer word by word. The GPU is leased "
    "to you now: it stays awake while you use it and pauses about {lease} after your last "
    "request."
)


@dataclass(frozen=True)
class DemoGpu:
    """One simulated GPU: its name, the models on it, and how long its resume takes."""

    name: str
    models: tuple[str, ...]
    resume_seconds: float


DEMO_GPUS: tuple[DemoGpu, ...] = (
    DemoGpu("gpu-1", ("llama3.2:latest", "qwen2.5:7b"), 4.0),
    DemoGpu("gpu-2", ("llama3.2:latest",), 5.0),
    DemoGpu("gpu-3", ("mistral:latest", "nomic-embed-text:latest"), 6.0),
)


@dataclass(frozen=True)
class DemoTimings:
    """Short enough to watch a whole lifecycle; tests shrink them further."""

    #: Multiplies every ``DemoGpu.resume_seconds``.
    resume_scale: float = 1.0
    pause_seconds: float = 2.0
    #: From "running" to Ollama answering.
    ollama_seconds: float = 1.0
    reservation_minutes: float = 1.0
    fallback_reservation_minutes: float = 0.5
    poll_interval_seconds: float = 1.0
    #: Pace of the streamed answer, seconds per word.
    word_seconds: float = 0.12
    #: How often the lifecycle log looks at the engine.
    watch_seconds: float = 0.5


class PoweredNode:
    """A ``SimOllama`` that is switched on only while its simulated workspace runs.

    While the workspace is paused, resuming, pausing, or running but still booting Ollama,
    every request (``GET /`` included, which is what readiness probes ask) gets a 503, and
    the models Ollama had in memory are forgotten, as after a real pause.
    """

    def __init__(self, node: SimOllama, cloud: SimCloud, workspace_id: str) -> None:
        self.node = node
        self.cloud = cloud
        self.workspace_id = workspace_id

    @property
    def up(self) -> bool:
        machine = self.cloud.machines.get(self.workspace_id)
        return machine is not None and self.cloud.node_ready(machine)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.up:
            self.node.loaded.clear()
            body = b'{"error":"the GPU is not running"}'
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json; charset=utf-8"),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.node(scope, receive, send)


@dataclass
class DemoFleet:
    """What ``demo_fleet`` yields: the engine and key store to serve, and the parts behind."""

    config: Config
    engine: Engine
    keys: KeyStore
    store: Store
    cloud: SimCloud
    nodes: dict[str, SimOllama]
    #: An admin key of the demo's own key store (shown to the user; valid for this run only).
    key: str
    state_dir: Path
    gpus: tuple[DemoGpu, ...]
    timings: DemoTimings
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def intro(self, url: str) -> list[str]:
        """What ``serve --demo`` prints at start: the fleet, the URL, the key, three commands."""
        lease = _minutes(self.timings.reservation_minutes)
        width = max(len(", ".join(g.models)) for g in self.gpus)
        lines = [f"gpuctl demo: {len(self.gpus)} simulated GPUs, all paused "
                 "(no cloud account, GPU or config needed)"]
        for gpu in self.gpus:
            wake = gpu.resume_seconds * self.timings.resume_scale + self.timings.ollama_seconds
            lines.append(f"  {gpu.name}  {', '.join(gpu.models):<{width}}  "
                         f"wakes in about {wake:.0f} s")
        lines += [
            f"A request wakes a paused GPU that has its model, and is held until it is ready. "
            f"Each user's lease keeps the GPU awake until {lease} after their last request; "
            "then it pauses.",
            "",
            f"Gateway:  {url}  (Ollama API; OpenAI API under {url}/v1)",
            f"Demo key: {self.key}",
            f"Page:     {url}/ui/  (the fleet live in a browser: sign in with the demo key)",
            "",
            "Try it from another terminal:",
        ]
        for comment, command in try_commands(url, self.key):
            lines += [f"  # {comment}", f"  {command}", ""]
        lines.append("Watch the fleet: gpuctl top --demo (or status --demo)    "
                     "Stop the demo: Ctrl-C")
        return lines


def try_commands(url: str, key: str) -> list[tuple[str, str]]:
    """Three commands to paste, each a (comment, command line) pair, each waking a GPU
    or reusing one: curl and the ``ollama`` client ask gpu-1's models, ``openai`` gpu-3's."""
    ask = "[{'role': 'user', 'content': 'Hello!'}]"
    curl = (
        f"curl -iN {url}/api/chat -H 'Authorization: Bearer {key}' "
        """-d '{"model": "llama3.2", "messages": [{"role": "user", "content": "Hello!"}]}'"""
    )
    with_ollama = (
        "python3 -c \"import ollama; "
        f"c = ollama.Client(host='{url}', headers={{'Authorization': 'Bearer {key}'}}); "
        "[print(part.message.content, end='', flush=True) for part in "
        f"c.chat(model='qwen2.5:7b', messages={ask}, stream=True)]; print()\""
    )
    with_openai = (
        "python3 -c \"import openai; "
        f"c = openai.OpenAI(base_url='{url}/v1', api_key='{key}'); "
        "[print(chunk.choices[0].delta.content or '', end='', flush=True) for chunk in "
        f"c.chat.completions.create(model='mistral', messages={ask}, stream=True)]; print()\""
    )
    return [
        ("curl, the Ollama API: one JSON line per word, after \"thinking\" lines while a GPU "
         "wakes (-i shows the headers; X-Gpuctl-Gpu names the GPU when none had to wake)",
         curl),
        ("the ollama Python client; first: python3 -m pip install ollama "
         "(into this python3, not gpuctl's pipx environment)", with_ollama),
        ("the openai Python client on /v1; first: python3 -m pip install openai", with_openai),
    ]


def _minutes(minutes: float) -> str:
    if minutes >= 1:
        return f"{minutes:g} min"
    return f"{minutes * 60:.0f} s"


def _config(base: Config, timings: DemoTimings, state_dir: Path) -> Config:
    """The user's config (server address, slots, queue limits) with the demo's timings."""
    return base.model_copy(update={
        "timing": TimingConfig(
            reservation_minutes=timings.reservation_minutes,
            fallback_reservation_minutes=timings.fallback_reservation_minutes,
            startup_timeout_seconds=60,
            ollama_readiness_wait_seconds=30,
            poll_interval_seconds=timings.poll_interval_seconds,
        ),
        "gpu": base.gpu.model_copy(update={"auto_pause": True}),
        "paths": PathsConfig(state_dir=str(state_dir)),
    })


def _answer(gpu: str, lease: str) -> str:
    # ``{model}`` stays for SimOllama to fill in per request.
    return ANSWER.replace("{gpu}", gpu).replace("{lease}", lease)


@contextlib.asynccontextmanager
async def demo_fleet(
    config: Config,
    *,
    timings: DemoTimings | None = None,
    gpus: Sequence[DemoGpu] = DEMO_GPUS,
    say: Callable[[str], None] | None = None,
) -> AsyncIterator[DemoFleet]:
    """Start the simulated fleet; yield the engine and key store for a gateway to serve.

    ``say`` receives the lifecycle log, one timestamped line per event, while the block runs
    (the engine's requests included).
    Serving the gateway starts the engine; everything else is torn down on exit, and the
    temporary state directory (store and key store) is deleted.
    """
    timings = timings or DemoTimings()
    clock = SystemClock()
    with tempfile.TemporaryDirectory(prefix="gpuctl-demo-") as tmp:
        state = Path(tmp)
        demo_config = _config(config, timings, state)
        store = Store.open(state)
        keys = KeyStore.open(state)
        try:
            _, key = keys.create(DEMO_USER, email="demo@example.org", admin=True)
            cloud = SimCloud(clock, pause_seconds=timings.pause_seconds,
                             ollama_seconds=timings.ollama_seconds)
            urls: dict[str, str] = {}
            nodes: dict[str, SimOllama] = {}
            async with contextlib.AsyncExitStack() as stack:
                for spec in gpus:
                    machine = cloud.add(spec.name, models=spec.models,
                                        resume_seconds=spec.resume_seconds * timings.resume_scale)
                    node = SimOllama(list(spec.models), interval=timings.word_seconds,
                                     text=_answer(spec.name,
                                                  _minutes(timings.reservation_minutes)))
                    url = await stack.enter_async_context(
                        running(PoweredNode(node, cloud, machine.id)))
                    machine.base_url = urls[machine.id] = url
                    nodes[spec.name] = node
                    _seen_before(store, machine.id, node, machine.resume_seconds
                                 + machine.ollama_seconds, clock.wall())

                def probe(ws: Workspace) -> NodeProbe:
                    return NodeClient(urls[ws.id])

                narrator = Narrator(say) if say is not None else None
                engine = NarratedEngine(demo_config, cloud, store, clock=clock, nodes=probe,
                                        narrator=narrator)
                fleet = DemoFleet(demo_config, engine, keys, store, cloud, nodes, key, state,
                                  tuple(gpus), timings)
                if narrator is not None:
                    fleet.tasks.append(asyncio.ensure_future(
                        narrator.watch(engine, timings.watch_seconds)))
                try:
                    yield fleet
                finally:
                    for task in fleet.tasks:
                        task.cancel()
                    await asyncio.gather(*fleet.tasks, return_exceptions=True)
        finally:
            keys.close()
            store.close()


def _seen_before(store: Store, gpu_id: str, node: SimOllama, resume: float, at: float) -> None:
    """Seed the store as after an earlier run: the GPU's models and its resume time."""
    entries: list[dict[str, Any]] = list(node.models.values())
    store.save_models(gpu_id, entries, at)
    store.record_resume(gpu_id, resume, ok=True, at=at)
