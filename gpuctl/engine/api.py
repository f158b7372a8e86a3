"""The engine's public face: the types the CLI and the gateway see, and nothing else.

``ModelView`` is the node layer's type (``gpuctl.node.base``), re-exported here because the
faces list models too; the engine imports the node layer, never the reverse.

Both faces call the same methods: ``gpuctl resume X --wait`` and ``POST /gpu/X/resume`` are
one ``Engine.wake`` call. Policy (which GPU, when to wake, when to pause) lives behind these
methods, never in a face.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Literal, NamedTuple

from pydantic import BaseModel, Field

from gpuctl.node.base import ModelView
from gpuctl.store.ledger import RequestRow

__all__ = [
    "ActionResult",
    "EngineMetrics",
    "GpuGlance",
    "GpuMetrics",
    "GpuState",
    "GpuView",
    "LeaseView",
    "ModelView",
    "Progress",
    "ProgressCallback",
    "RequestRow",
    "Ticket",
    "Usage",
]


class GpuState(str, Enum):
    PAUSED = "paused"
    STARTING = "starting"
    IDLE = "idle"
    ACTIVE = "active"
    BUSY = "busy"
    PAUSING = "pausing"
    UNAVAILABLE = "unavailable"

    @property
    def ready(self) -> bool:
        return self in (GpuState.IDLE, GpuState.ACTIVE, GpuState.BUSY)


class GpuGlance(NamedTuple):
    """A GPU's id, state and cloud status: what a replica's sync loop reads of every GPU,
    five times a second, without building a ``GpuView`` (a pydantic model) for each."""

    id: str
    state: GpuState
    cloud_status: str


class LeaseView(BaseModel):
    user: str
    expires_in_seconds: float


class GpuView(BaseModel):
    """A snapshot of one GPU for ``status``, ``discover`` and the admin API. Stable keys."""

    id: str
    name: str
    state: GpuState
    cloud_status: str
    ip: str | None = None
    fqdn: str | None = None
    flavor: str | None = None
    size: str | None = None
    can_resume: bool = False
    can_pause: bool = False
    models: list[str] = Field(default_factory=list, description="models on disk, as last seen")
    loaded: list[str] = Field(default_factory=list, description="models in memory (/api/ps)")
    slots: int = 0
    slots_in_use: int = 0
    queued: int = 0
    leases: list[LeaseView] = Field(default_factory=list)
    estimated_resume_seconds: float | None = None
    last_error: str | None = None
    base_url: str | None = Field(None, description="the node's Ollama URL, when known")


class ActionResult(BaseModel):
    """The outcome of a resume or pause, as both faces report it."""

    success: bool
    message: str
    gpu: GpuView
    elapsed_seconds: float = 0.0


class Progress(BaseModel):
    """What a waiting caller is told: why it waits, where it stands, and for about how long."""

    stage: Literal["queued", "resuming", "running", "ollama_ready", "loading"]
    gpu_id: str | None = None
    gpu_name: str | None = None
    position: int | None = Field(None, description="1 = next in line; queued requests only")
    estimate_seconds: float | None = None
    elapsed_seconds: float = 0.0
    message: str = ""


ProgressCallback = Callable[[Progress], None]


class Ticket(BaseModel):
    """A slot on one GPU, granted to one request. Hand it back with ``Engine.release``."""

    id: int
    gpu_id: str
    gpu_name: str
    base_url: str = Field(description="the node's Ollama URL, e.g. http://10.0.0.5:11434")
    model: str
    user: str
    reason: str = Field(description="why this GPU: 'leased to you, model loaded, 1/4 slots'")
    waited_seconds: float = 0.0


class Usage(BaseModel):
    """What one served request cost, for the usage ledger."""

    tokens_in: int = 0
    tokens_out: int = 0
    load_seconds: float | None = Field(
        None, description="Ollama's load_duration (ns / 1e9) when it had to load the model"
    )


class GpuMetrics(BaseModel):
    """One GPU's gauges for ``/metrics``."""

    id: str
    name: str
    state: GpuState
    slots: int
    slots_in_use: int
    queued: int = 0
    leases: int = 0


class EngineMetrics(BaseModel):
    """Counters since start and gauges now, for the gateway's Prometheus ``/metrics``."""

    wakes: int = Field(0, description="cloud resumes the engine sent")
    wake_failures: int = 0
    pauses: int = Field(0, description="cloud pauses the engine sent")
    resume_durations: list[float] = Field(
        default_factory=list, description="seconds from resume to Ollama ready, oldest first"
    )
    requests_granted: int = 0
    requests_rejected: int = Field(0, description="queue full or wait limit passed")
    queue_depth: int = 0
    gpus: list[GpuMetrics] = Field(default_factory=list)
