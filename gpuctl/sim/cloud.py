"""An in-memory cloud with SURF's manners, on an injectable clock.

``SimCloud`` implements ``CloudProvider`` without HTTP: workspaces walk paused → resuming →
running and running → pausing → paused, each step ending a set number of (clock) seconds
after it began, evaluated lazily on every read, so a test on a ``FakeClock`` moves the cloud
by moving the clock. Like SURF it refuses an action the current status does not allow
(``ActionRefused``), lets a resume fail (back to ``paused`` with a failed action "Timeout
waiting for VM to resume."), lets workspaces appear and vanish, and can fail the next calls.
It counts every resume and pause it is asked for, so a test can assert "exactly one resume".

``SimCloud.node`` is a ``NodeFactory`` for the engine: each GPU's ``SimNodeProbe`` answers
only some seconds after its workspace is running, with the models the test gave it.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from gpuctl.cloud.base import Workspace
from gpuctl.engine.api import ModelView
from gpuctl.engine.clock import Clock
from gpuctl.errors import ActionRefused, CloudError, CloudUnavailable, GpuNotFound, NodeError

__all__ = ["RESUME_FAILURE", "SimCloud", "SimMachine", "SimNodeProbe"]

RESUME_FAILURE = "Timeout waiting for VM to resume."
_ALLOWED = {
    "running": ("pause", "reboot", "update_nsgs", "update_storages"),
    "paused": ("resume", "update_nsgs", "update_storages"),
}


@dataclass
class SimMachine:
    """One simulated workspace and the Ollama on it; tests may change any field."""

    id: str
    name: str
    status: str = "paused"
    ip: str | None = None
    resume_seconds: float = 120.0
    pause_seconds: float = 60.0
    ollama_seconds: float = 5.0
    models: list[str] = field(default_factory=lambda: ["llama3.2:latest"])
    loaded: list[str] = field(default_factory=list)
    ollama_up: bool = True
    base_url: str | None = None
    #: Upcoming resumes that fail (each after ``resume_seconds``), like SURF with no GPU free.
    failing_resumes: int = 0
    until: float | None = None
    running_since: float | None = None
    last_action: str | None = None
    last_action_status: str | None = None
    last_action_error: str | None = None
    _will_fail: bool = False

    def workspace(self) -> Workspace:
        return Workspace(
            id=self.id,
            name=self.name,
            status=self.status,
            active=self.status == "running",
            ip=self.ip,
            fqdn=f"{self.name.lower()}.sim.surf-hosted.nl",
            host_name=self.name.lower(),
            flavor="gpu-a10-11core-88gb-50gb-2tb",
            size="A10 - 1 GPU",
            allowed_actions=_ALLOWED.get(self.status, ()),
            last_action=self.last_action,
            last_action_status=self.last_action_status,
            last_action_error=self.last_action_error,
        )


class SimCloud:
    """A ``CloudProvider`` kept in memory; see the module docstring."""

    managed = True

    def __init__(
        self, clock: Clock, *, resume_seconds: float = 120.0, pause_seconds: float = 60.0,
        ollama_seconds: float = 5.0,
    ) -> None:
        self.clock = clock
        self.resume_seconds = resume_seconds
        self.pause_seconds = pause_seconds
        self.ollama_seconds = ollama_seconds
        self.machines: dict[str, SimMachine] = {}
        self.resume_calls: Counter[str] = Counter()
        self.pause_calls: Counter[str] = Counter()
        self.list_calls = 0
        self._failures: list[CloudError] = []
        self._ids = itertools.count(1)

    # -- steering (tests) ----------------------------------------------------------------------

    def add(
        self, name: str, *, id: str | None = None, status: str = "paused",
        models: Iterable[str] = ("llama3.2:latest",), **options: Any,
    ) -> SimMachine:
        number = next(self._ids)
        machine = SimMachine(
            id=id or f"ws-{number:04d}",
            name=name,
            status=status,
            ip=f"10.0.{number // 250}.{number % 250 + 1}",
            resume_seconds=options.pop("resume_seconds", self.resume_seconds),
            pause_seconds=options.pop("pause_seconds", self.pause_seconds),
            ollama_seconds=options.pop("ollama_seconds", self.ollama_seconds),
            models=list(models),
            **options,
        )
        if status == "running":
            machine.running_since = self.clock.now() - machine.ollama_seconds
        self.machines[machine.id] = machine
        return machine

    def remove(self, ref: str) -> None:
        del self.machines[self.find(ref).id]

    def find(self, ref: str) -> SimMachine:
        if ref in self.machines:
            return self.machines[ref]
        for machine in self.machines.values():
            if machine.name == ref:
                return machine
        raise KeyError(ref)

    def fail_next_resume(self, ref: str, count: int = 1) -> None:
        self.find(ref).failing_resumes += count

    def fail_calls(self, count: int = 1, error: CloudError | None = None) -> None:
        """The next ``count`` cloud calls raise ``error`` (default: a 503)."""
        self._failures += [error or CloudUnavailable("sim cloud: 503 Service Unavailable")] * count

    @property
    def total_resumes(self) -> int:
        return sum(self.resume_calls.values())

    @property
    def total_pauses(self) -> int:
        return sum(self.pause_calls.values())

    # -- CloudProvider -------------------------------------------------------------------------

    async def list_workspaces(self) -> list[Workspace]:
        await self._call()
        self.list_calls += 1
        return [self._settle(m).workspace() for m in self.machines.values()]

    async def get_workspace(self, workspace_id: str) -> Workspace:
        await self._call()
        return self._settle(self._get(workspace_id)).workspace()

    async def resume(self, workspace_id: str) -> Workspace:
        await self._call()
        machine = self._settle(self._get(workspace_id))
        self.resume_calls[workspace_id] += 1
        if machine.status != "paused":
            raise ActionRefused(f"cannot resume a workspace that is {machine.status}")
        machine.status = "resuming"
        machine.until = self.clock.now() + machine.resume_seconds
        machine._will_fail = machine.failing_resumes > 0
        machine.failing_resumes = max(0, machine.failing_resumes - 1)
        self._action(machine, "resume", "pending")
        return machine.workspace()

    async def pause(self, workspace_id: str) -> Workspace:
        await self._call()
        machine = self._settle(self._get(workspace_id))
        self.pause_calls[workspace_id] += 1
        if machine.status != "running":
            raise ActionRefused(f"cannot pause a workspace that is {machine.status}")
        machine.status = "pausing"
        machine.until = self.clock.now() + machine.pause_seconds
        machine.running_since = None
        machine.loaded = []
        self._action(machine, "pause", "pending")
        return machine.workspace()

    async def aclose(self) -> None:
        return None

    # -- nodes -----------------------------------------------------------------------------------

    def node(self, ws: Workspace) -> SimNodeProbe:
        """A ``NodeFactory``: the engine's probe of the simulated Ollama on ``ws``."""
        return SimNodeProbe(self, ws.id)

    def node_ready(self, machine: SimMachine) -> bool:
        self._settle(machine)
        return (
            machine.id in self.machines
            and machine.ollama_up
            and machine.status == "running"
            and machine.running_since is not None
            and self.clock.now() >= machine.running_since + machine.ollama_seconds
        )

    # -- internals -----------------------------------------------------------------------------

    async def _call(self) -> None:
        await asyncio.sleep(0)
        if self._failures:
            raise self._failures.pop(0)

    def _get(self, workspace_id: str) -> SimMachine:
        machine = self.machines.get(workspace_id)
        if machine is None:
            raise GpuNotFound(f"workspace {workspace_id} not found")
        return machine

    def _settle(self, machine: SimMachine) -> SimMachine:
        """Finish a transition whose time has come."""
        if machine.until is None or self.clock.now() < machine.until:
            return machine
        ended_at = machine.until
        machine.until = None
        if machine.status == "resuming":
            if machine._will_fail:
                machine.status = "paused"
                self._action(machine, "resume", "failed", RESUME_FAILURE)
            else:
                machine.status = "running"
                machine.running_since = ended_at
                self._action(machine, "resume", "success")
        elif machine.status == "pausing":
            machine.status = "paused"
            self._action(machine, "pause", "success")
        return machine

    @staticmethod
    def _action(machine: SimMachine, kind: str, status: str, error: str | None = None) -> None:
        machine.last_action = kind
        machine.last_action_status = status
        machine.last_action_error = error


class SimNodeProbe:
    """The engine's view of one simulated node (``NodeProbe``), following its workspace."""

    def __init__(self, cloud: SimCloud, workspace_id: str) -> None:
        self.cloud = cloud
        self.workspace_id = workspace_id
        machine = cloud.machines.get(workspace_id)
        name = machine.name.lower() if machine else workspace_id
        self.base_url = (machine.base_url if machine and machine.base_url
                         else f"http://{name}.sim:11434")
        self.probes = 0
        self.closed = False

    def _machine(self) -> SimMachine | None:
        return self.cloud.machines.get(self.workspace_id)

    async def ready(self) -> bool:
        await asyncio.sleep(0)
        self.probes += 1
        machine = self._machine()
        return machine is not None and self.cloud.node_ready(machine)

    async def tags(self) -> list[ModelView]:
        machine = self._up()
        return [
            ModelView(
                name=m, model=m, size=2_000_000_000,
                digest=hashlib.sha256(m.encode()).hexdigest(),
                details={"format": "gguf", "family": m.split(":")[0]},
            )
            for m in machine.models
        ]

    async def ps(self) -> list[dict[str, Any]]:
        machine = self._up()
        return [{"name": m, "model": m, "size": 2_000_000_000, "size_vram": 2_000_000_000}
                for m in machine.loaded]

    async def aclose(self) -> None:
        self.closed = True

    def _up(self) -> SimMachine:
        machine = self._machine()
        if machine is None or not self.cloud.node_ready(machine):
            raise NodeError(f"{self.base_url} is not answering")
        return machine
