"""One GPU as the engine tracks it, and how its state follows from the cloud and the node.

The state is *derived*, never set by hand: from the cloud's status, whether the node's
Ollama answered the last probe, how many slots are in use, and which of our own cloud
actions is in flight. That is what keeps a periodic sync from flipping a GPU we are resuming
back to PAUSED (our resume in flight wins over a stale "paused"), or to ready before Ollama
answers (ready needs a successful probe), the races the service gpuctl replaces lost.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from gpuctl.cloud.base import TRANSITIONAL_STATUSES, Workspace
from gpuctl.engine.api import GpuState, ModelView, ProgressCallback

if TYPE_CHECKING:  # gpuctl.node.base imports the engine's api: no cycle at run time
    from gpuctl.node.base import NodeProbe

__all__ = ["ERROR_STATUSES", "Flight", "Gpu", "WakeStage", "derive_state", "normalize_model"]

#: The stages a wake goes through, as waiting callers are told.
WakeStage = Literal["resuming", "running", "ollama_ready"]

log = logging.getLogger(__name__)

#: Cloud statuses after which a GPU will not serve until someone repairs it.
ERROR_STATUSES = frozenset({"failed", "unhealthy", "deleted", "deleting", "unaccounted"})
_KNOWN_STATUSES = TRANSITIONAL_STATUSES | ERROR_STATUSES | {"running", "paused", "unknown"}
_warned_statuses: set[str] = set()


def normalize_model(name: str) -> str:
    """``llama3.2`` and ``llama3.2:latest`` name the same model, as in Ollama."""
    base = name.rsplit("/", 1)[-1]
    return name if ":" in base else f"{name}:latest"


@dataclass(eq=False)
class Flight:
    """One cloud action in flight on one GPU, shared by every caller who wants it."""

    kind: str  # "resume" or "pause"
    started: float
    accepted: asyncio.Future[None]
    task: asyncio.Task[None] | None = None
    stage: str = ""
    grace: bool = True
    #: Who wanted it, for the ledger: "gateway" (requests, idle pause), "probe" (to learn a
    #: GPU's models) or "hand" (``gpuctl resume``/``pause``, the admin API).
    cause: str = "gateway"
    #: The ledger holds this action (written before the cloud was asked, or adopted).
    recorded: bool = False
    listeners: list[ProgressCallback] = field(default_factory=list)
    #: Models whose queued requests wait for this wake (they are told its progress).
    models: set[str] = field(default_factory=set)

    @classmethod
    def begin(cls, kind: str, started: float, *, grace: bool = True, cause: str = "gateway",
              recorded: bool = False) -> Flight:
        """A new flight; nobody has to await whether the cloud ``accepted`` it."""
        accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        accepted.add_done_callback(_consume)
        return cls(kind=kind, started=started, accepted=accepted, grace=grace, cause=cause,
                   recorded=recorded)


def _consume(future: asyncio.Future[None]) -> None:
    """Mark a flight's outcome as seen, so asyncio does not warn when nobody awaited it."""
    if not future.cancelled():
        future.exception()


@dataclass(eq=False)
class Gpu:
    """The engine's mutable record of one workspace. Identity (``is``) matters: a GPU that
    leaves the cloud and comes back is a new record, so old tickets cannot touch new slots."""

    ws: Workspace
    slots: int
    #: The workspace id (fixed for the record's life; ``ws`` is replaced on every read).
    id: str = field(init=False)
    probe: NodeProbe | None = None
    #: Models on disk by normalised name; ``None`` while the GPU was never seen awake.
    models: dict[str, ModelView] | None = None
    loaded: set[str] = field(default_factory=set)
    ps: list[dict[str, Any]] = field(default_factory=list)
    node_ready: bool = False
    running_since: float | None = None
    in_use: int = 0
    state: GpuState = GpuState.PAUSED
    #: ``state.ready``, kept as a plain attribute because the router reads it constantly.
    ready: bool = False
    waking: Flight | None = None
    pausing: Flight | None = None
    #: Found running with a node that did not answer a short probe (``actions.NodeDown``):
    #: UNAVAILABLE until a probe succeeds or the cloud stops it.
    node_failed: bool = False
    grace_until: float = 0.0
    #: When the GPU last became idle (its last request ended, or it came up): the pause
    #: policy's clock for how long it has sat unused.
    idle_since: float = 0.0
    last_error: str | None = None
    probing: asyncio.Task[None] | None = None
    #: The models counted in the engine's per-model ready tally (``None``: not counted).
    counted: dict[str, ModelView] | None = None

    @property
    def name(self) -> str:
        return self.ws.name

    def __post_init__(self) -> None:
        self.id = self.ws.id

    def has(self, model: str) -> bool:
        return self.models is not None and model in self.models

    @property
    def free(self) -> int:
        return self.slots - self.in_use


def derive_state(gpu: Gpu, now: float, readiness_wait: float) -> GpuState:
    """The design's state table, with our own in-flight actions taking precedence."""
    if gpu.pausing is not None:
        return GpuState.PAUSING
    status = gpu.ws.status
    if status == "running" and gpu.node_ready:
        if gpu.in_use == 0:
            return GpuState.IDLE
        return GpuState.BUSY if gpu.in_use >= gpu.slots else GpuState.ACTIVE
    if gpu.waking is not None:
        return GpuState.STARTING
    if status == "running":
        if gpu.node_failed:
            return GpuState.UNAVAILABLE
        if gpu.running_since is not None and now - gpu.running_since > readiness_wait:
            return GpuState.UNAVAILABLE
        return GpuState.STARTING
    if status == "paused":
        return GpuState.PAUSED
    if status == "pausing":
        return GpuState.PAUSING
    if status in ERROR_STATUSES:
        return GpuState.UNAVAILABLE
    if status not in _KNOWN_STATUSES and status not in _warned_statuses:
        _warned_statuses.add(status)
        log.warning("workspace %s has unknown cloud status %r; treating it as in progress",
                    gpu.name, status)
    return GpuState.STARTING
