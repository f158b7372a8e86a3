"""Two or three ``gpuctl serve`` processes sharing one Redis, over a simulated SURF API and
simulated Ollama nodes, each a real HTTP server on loopback.

Each replica has its own state dir (its own SQLite ledger, as on separate hosts); the same
API key is imported into each. The GPUs start paused but were seen awake before (their
models are in each store), so a request for a model wakes its GPU.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conftest import served_url  # tests/conftest.py

from gpuctl.sim.ollama import SimOllama
from gpuctl.sim.servers import ServerThread
from gpuctl.sim.surf_api import SurfApiSim
from gpuctl.store import Store
from gpuctl.store.keys import KeyStore

TOKEN = "sim-token"
SECRET = "sk-replica-test-" + "x" * 32
#: A second user, for the tests of fairness between users (``prepare_state(..., bob=True)``).
SECRET_BOB = "sk-replica-bob-" + "y" * 32
#: An admin's key (``prepare_state(..., admin=True)``): the admin API, hand wakes.
SECRET_ADMIN = "sk-replica-root-" + "z" * 32
SLOTS = 2


def until(condition: Callable[[], bool], *, timeout: float = 30.0) -> None:
    """Wait, bounded, for real processes to get somewhere (real time, polled)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s")
        time.sleep(0.02)


@dataclass
class Fleet:
    sim: SurfApiSim
    sim_url: str
    nodes: dict[str, SimOllama]  # workspace id -> its node
    models: dict[str, str]  # workspace id -> its one model
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)


@contextlib.contextmanager
def fleet(gpus: int, *, resume_seconds: float = 1.0, chunks: int = 5,
          interval: float = 0.05) -> Iterator[Fleet]:
    sim = SurfApiSim(token=TOKEN, resume_seconds=resume_seconds, pause_seconds=1.0)
    with contextlib.ExitStack() as stack:
        sim_url = stack.enter_context(ServerThread(sim))
        nodes: dict[str, SimOllama] = {}
        models: dict[str, str] = {}
        for i in range(gpus):
            model = f"model{i}:latest"
            node = SimOllama([model], chunks=chunks, interval=interval)
            url = stack.enter_context(ServerThread(node))
            ws = sim.cloud.add(f"gpu-{i}", ip=url.removeprefix("http://"), models=[model])
            nodes[ws.id], models[ws.id] = node, model
        yield Fleet(sim, sim_url, nodes, models)


def warm(fleet: Fleet) -> tuple[str, str]:
    """The one GPU of ``fleet`` up from the start (no wake in the test): its id and model."""
    ((gpu_id, model),) = fleet.models.items()
    fleet.sim.cloud.resume_now(gpu_id)
    return gpu_id, model


def prepare_state(state: Path, fleet: Fleet, *, bob: bool = False,
                  admin: bool = False) -> None:
    state.mkdir(parents=True, exist_ok=True)
    keys_file = state / "api_keys.json"
    users = ({SECRET: {"name": "alice"}} | ({SECRET_BOB: {"name": "bob"}} if bob else {})
             | ({SECRET_ADMIN: {"name": "root", "role": "admin"}} if admin else {}))
    keys_file.write_text(json.dumps({"api_keys": users}))
    keys = KeyStore.open(state)
    keys.import_file(keys_file)
    keys.close()
    store = Store.open(state)
    for gpu_id, model in fleet.models.items():
        store.save_models(gpu_id, [{"name": model, "model": model}], 0.0)
    store.close()


def env(fleet: Fleet, redis_url: str, state: Path) -> dict[str, str]:
    return {
        "GPUCTL_CLOUD_API__BASE_URL": f"{fleet.sim_url}/v1",
        "GPUCTL_CLOUD_API__MACHINE_NAME_FILTER": "gpu",
        "GPUCTL_GPU__OLLAMA_URL": "http://{ip}",
        "GPUCTL_GPU__SLOTS": str(SLOTS),
        # One user sends everything here: let them fill a GPU, so the global count is tested.
        "GPUCTL_SERVER__MAX_SLOTS_PER_USER": str(SLOTS),
        "GPUCTL_TIMING__POLL_INTERVAL_SECONDS": "0.5",
        "GPUCTL_API_TOKEN": TOKEN,
        "GPUCTL_STORE__URL": redis_url,
        "GPUCTL_PATHS__STATE_DIR": str(state),
    }


@contextlib.contextmanager
def replicas(start: Callable[..., contextlib.AbstractContextManager[subprocess.Popen[str]]],
             fleet: Fleet, redis_url: str, home: Path, count: int,
             extra: dict[str, str] | None = None, *, bob: bool = False,
             admin: bool = False) -> Iterator[Fleet]:
    """``count`` gateway processes (``gpuctl_process``), their URLs in ``fleet.urls``;
    ``extra``: more environment (config) for every one; ``bob``: a second user's key too;
    ``admin``: an admin's key too."""
    with contextlib.ExitStack() as stack:
        for i in range(count):
            state = home / f"replica-{i}"
            prepare_state(state, fleet, bob=bob, admin=admin)
            proc = stack.enter_context(
                start("serve", "--port", "0",
                      env={**env(fleet, redis_url, state), **(extra or {})}))
            fleet.procs.append(proc)
            fleet.urls.append(served_url(proc))
        yield fleet
