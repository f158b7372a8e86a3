"""An in-memory cloud with SURF's manners, on an injectable clock: the one simulated cloud.

``SimCloud`` implements ``CloudProvider`` without HTTP: workspaces walk paused → resuming →
running and running → pausing → paused, each step ending a set number of (clock) seconds
after it began, evaluated lazily on every read, so a test on a ``FakeClock`` moves the cloud
by moving the clock. For callers that cannot move a clock (a CLI test runs the real one),
``settle_after_reads=N`` ends a transition at the N-th read of the workspace instead: as
deterministic as a fake clock, with no waiting. Like SURF it refuses an action the current
status does not allow (``ActionRefused``), lets a resume fail (back to ``paused`` with a
failed action "Timeout waiting for VM to resume.", after ``failed_resume_seconds``), keeps
each workspace's action history, lets workspaces appear, vanish or be marked deleted, and can
fail the next calls. It counts every resume and pause it is asked for, refused ones
included, so a test can assert "exactly one resume".

The state machine lives only here. ``sim.surf_api.SurfApiSim`` is an HTTP face over a
``SimCloud`` (SURF's JSON shapes, pagination, auth, HTTP faults); it drives the cloud through
the synchronous ``*_now`` methods, from its own server thread, under its lock.

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
from gpuctl.engine.clock import Clock
from gpuctl.errors import ActionRefused, CloudError, CloudUnavailable, GpuNotFound, NodeError
from gpuctl.node.base import ModelView

__all__ = ["RESUME_FAILURE", "SimAction", "SimCloud", "SimMachine", "SimNodeProbe"]

RESUME_FAILURE = "Timeout waiting for VM to resume."
_ALLOWED = {
    "running": ("pause", "reboot", "update_nsgs", "update_storages"),
    "paused": ("resume", "update_nsgs", "update_storages"),
}


@dataclass
class SimAction:
    """One entry of a workspace's action history (SURF's ``workspace_actions``)."""

    id: int
    kind: str  # "resume" or "pause"
    status: str  # "pending", "success" or "failed"
    created: float  # wall-clock seconds
    updated: float | None = None
    error: str | None = None


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
    #: How long a resume that fails takes (None: ``resume_seconds``).
    failed_resume_seconds: float | None = None
    #: Reads left before the transition in progress ends (``settle_after_reads`` mode).
    reads_left: int | None = None
    host_name: str | None = None  # None: the name, lower-cased
    flavor: str = "gpu-a10-11core-88gb-50gb-2tb"
    size: str = "A10 - 1 GPU"
    #: SURF lists storage volumes and other non-Compute items beside workspaces.
    application_type: str = "Compute"
    #: Deleted workspaces still answer a GET (SURF keeps them) but are not listed.
    deleted: bool = False
    actions: list[SimAction] = field(default_factory=list)

    @property
    def host(self) -> str:
        return self.host_name or self.name.lower()

    @property
    def fqdn(self) -> str:
        return f"{self.host}.sim.surf-hosted.nl"

    @property
    def allowed_actions(self) -> tuple[str, ...]:
        return _ALLOWED.get(self.status, ())

    def workspace(self) -> Workspace:
        return Workspace(
            id=self.id,
            name=self.name,
            status=self.status,
            active=self.status == "running",
            ip=self.ip,
            fqdn=self.fqdn,
            host_name=self.host,
            flavor=self.flavor,
            size=self.size,
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
        ollama_seconds: float = 5.0, failed_resume_seconds: float | None = None,
        settle_after_reads: int | None = None,
    ) -> None:
        self.clock = clock
        self.resume_seconds = resume_seconds
        self.pause_seconds = pause_seconds
        self.ollama_seconds = ollama_seconds
        #: How long a failing resume takes, for machines added from now (None: as a resume).
        self.failed_resume_seconds = failed_resume_seconds
        #: When set, a transition started from now ends at this many reads of its workspace
        #: (the clock is ignored for it).
        self.settle_after_reads = settle_after_reads
        self.machines: dict[str, SimMachine] = {}
        self.resume_calls: Counter[str] = Counter()
        self.pause_calls: Counter[str] = Counter()
        self.list_calls = 0
        self._failures: list[CloudError] = []
        self._ids = itertools.count(1)
        self._action_ids = itertools.count(1)

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
            ip=options.pop("ip", f"10.0.{number // 250}.{number % 250 + 1}"),
            resume_seconds=options.pop("resume_seconds", self.resume_seconds),
            pause_seconds=options.pop("pause_seconds", self.pause_seconds),
            ollama_seconds=options.pop("ollama_seconds", self.ollama_seconds),
            failed_resume_seconds=options.pop("failed_resume_seconds",
                                              self.failed_resume_seconds),
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
        """The live Compute workspaces, as the SURF provider lists them (deleted ones and
        other application types left out)."""
        await self._call()
        self.list_calls += 1
        return [m.workspace() for m in self.machines_now()
                if not m.deleted and m.application_type == "Compute"]

    async def get_workspace(self, workspace_id: str) -> Workspace:
        await self._call()
        return self.machine_now(workspace_id).workspace()

    async def resume(self, workspace_id: str) -> Workspace:
        await self._call()
        return self.resume_now(workspace_id).workspace()

    async def pause(self, workspace_id: str) -> Workspace:
        await self._call()
        return self.pause_now(workspace_id).workspace()

    # -- the state machine, synchronously (also for the HTTP face) ---------------------------

    def machines_now(self) -> list[SimMachine]:
        """Every machine, deleted ones included, each read (settled) once, in the order
        they were added."""
        return [self._settle(m) for m in list(self.machines.values())]

    def machine_now(self, workspace_id: str) -> SimMachine:
        """One machine, read (settled); ``GpuNotFound`` if there is none with this id."""
        return self._settle(self._get(workspace_id))

    def resume_now(self, workspace_id: str) -> SimMachine:
        """Start a resume; counted even when refused (``ActionRefused``), as SURF sees it."""
        machine = self._settle(self._get(workspace_id, live=True))
        self.resume_calls[workspace_id] += 1
        if machine.status != "paused":
            raise ActionRefused(f"cannot resume a workspace that is {machine.status}")
        machine.status = "resuming"
        machine._will_fail = machine.failing_resumes > 0
        machine.failing_resumes = max(0, machine.failing_resumes - 1)
        seconds = machine.resume_seconds
        if machine._will_fail and machine.failed_resume_seconds is not None:
            seconds = machine.failed_resume_seconds
        self._begin(machine, "resume", seconds)
        return machine

    def pause_now(self, workspace_id: str) -> SimMachine:
        """Start a pause; counted even when refused (``ActionRefused``)."""
        machine = self._settle(self._get(workspace_id, live=True))
        self.pause_calls[workspace_id] += 1
        if machine.status != "running":
            raise ActionRefused(f"cannot pause a workspace that is {machine.status}")
        machine.status = "pausing"
        machine.running_since = None
        machine.loaded = []
        self._begin(machine, "pause", machine.pause_seconds)
        return machine

    async def aclose(self) -> None:
        return None

    # -- nodes -----------------------------------------------------------------------------------

    def node(self, ws: Workspace) -> SimNodeProbe:
        """A ``NodeFactory``: the engine's probe of the simulated Ollama on ``ws``."""
        return SimNodeProbe(self, ws.id)

    def node_ready(self, machine: SimMachine) -> bool:
        self._settle(machine, read=False)  # a probe of Ollama is not a read of the cloud
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

    def _get(self, workspace_id: str, *, live: bool = False) -> SimMachine:
        machine = self.machines.get(workspace_id)
        if machine is None or (live and machine.deleted):
            raise GpuNotFound(f"workspace {workspace_id} not found")
        return machine

    def _begin(self, machine: SimMachine, kind: str, seconds: float) -> None:
        machine.until = self.clock.now() + seconds
        machine.reads_left = self.settle_after_reads
        self._action(machine, kind, "pending")

    def _settle(self, machine: SimMachine, *, read: bool = True) -> SimMachine:
        """Finish a transition whose time (or, counting reads, whose read) has come."""
        if machine.until is None:
            return machine
        if machine.reads_left is not None:
            if not read:
                return machine
            machine.reads_left -= 1
            if machine.reads_left > 0:
                return machine
            ended_at = self.clock.now()
        elif self.clock.now() < machine.until:
            return machine
        else:
            ended_at = machine.until
        machine.until = None
        machine.reads_left = None
        if machine.status == "resuming":
            if machine._will_fail:
                machine.status = "paused"
                self._action(machine, "resume", "failed", RESUME_FAILURE, at=ended_at)
            else:
                machine.status = "running"
                machine.running_since = ended_at
                self._action(machine, "resume", "success", at=ended_at)
        elif machine.status == "pausing":
            machine.status = "paused"
            self._action(machine, "pause", "success", at=ended_at)
        return machine

    def _action(self, machine: SimMachine, kind: str, status: str,
                error: str | None = None, *, at: float | None = None) -> None:
        """Record an action starting ("pending") or the pending one ending; ``at``: when,
        on the monotonic clock (default: now), stamped in wall-clock time."""
        machine.last_action = kind
        machine.last_action_status = status
        machine.last_action_error = error
        now = self.clock.wall()
        if at is not None:
            now -= self.clock.now() - at
        latest = machine.actions[-1] if machine.actions else None
        if status != "pending" and latest is not None and latest.status == "pending":
            latest.status, latest.error, latest.updated = status, error, now
        else:
            machine.actions.append(SimAction(next(self._action_ids), kind, status, now,
                                             error=error))


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
