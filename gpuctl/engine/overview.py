"""The fleet at a glance: what the status page and ``gpuctl top`` show, in one snapshot.

``gpuctl status`` answers "what is each GPU"; the page answers "why am I waiting, and for how
long": a wake's stage and estimate, who is served where, who holds a lease until when, how
many wait per model. Times are wall-clock instants (``started_at``, ``expires_at``), not
durations, so a snapshot stays the same while nothing changes: the page counts down by
itself, and the gateway pushes a new snapshot only when something happened. Built from
read-only looks at the engine's records, as ``views`` builds ``GpuView``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

from pydantic import BaseModel, Field

from gpuctl.engine.api import GpuState
from gpuctl.engine.estimates import Estimator
from gpuctl.engine.fairqueue import FairQueue
from gpuctl.engine.fleet import Gpu
from gpuctl.engine.leases import LeaseBook

__all__ = ["ActionView", "FleetOverview", "GpuOverview", "LeaseAt", "QueueView", "overview"]

#: Instants are rounded to this many decimals so that two snapshots of an unchanged fleet
#: compare equal (the wall and monotonic clocks are read a few microseconds apart).
_DIGITS = 1


class ActionView(BaseModel):
    """A resume or pause in flight on one GPU."""

    kind: Literal["resume", "pause"]
    stage: str = Field("", description="resuming, running (Ollama starting), ollama_ready")
    started_at: float = Field(description="wall-clock seconds")
    estimate_seconds: float | None = Field(None, description="the whole resume, about")


class LeaseAt(BaseModel):
    user: str
    expires_at: float = Field(description="wall-clock seconds")


class GpuOverview(BaseModel):
    id: str
    name: str
    state: GpuState
    cloud_status: str
    flavor: str | None = None
    can_resume: bool = False
    can_pause: bool = False
    models: list[str] = Field(default_factory=list)
    loaded: list[str] = Field(default_factory=list)
    slots: int = 0
    slots_in_use: int = 0
    serving: list[str] = Field(default_factory=list, description="users with a request here")
    leases: list[LeaseAt] = Field(default_factory=list)
    action: ActionView | None = None
    estimated_resume_seconds: float | None = None
    last_error: str | None = None


class QueueView(BaseModel):
    """The requests waiting for one model."""

    model: str
    waiting: int
    users: list[str] = Field(default_factory=list, description="who waits, first in line first")
    since: float = Field(description="wall-clock seconds the longest waiter has waited since")
    estimate_seconds: float = Field(description="until the last in line is served, about")


class FleetOverview(BaseModel):
    at: float = Field(description="wall-clock seconds of the snapshot")
    gpus: list[GpuOverview] = Field(default_factory=list)
    queue: list[QueueView] = Field(default_factory=list)


def _instant(monotonic: float, now: float, wall: float) -> float:
    return round(wall + (monotonic - now), _DIGITS)


def overview(
    gpus: Iterable[Gpu], *, now: float, wall: float, leases: LeaseBook, queue: FairQueue,
    estimator: Estimator, serving: Mapping[str, list[str]],
    estimate: Mapping[str, float],
) -> FleetOverview:
    """A snapshot; ``serving``: GPU id -> users in flight; ``estimate``: model -> seconds."""
    cards = []
    for gpu in sorted(gpus, key=lambda g: g.name):
        flight = gpu.pausing or gpu.waking
        action = None
        if flight is not None:
            kind: Literal["resume", "pause"] = "pause" if flight is gpu.pausing else "resume"
            action = ActionView(
                kind=kind, stage=flight.stage, started_at=_instant(flight.started, now, wall),
                estimate_seconds=(round(estimator.resume_seconds(gpu.id), 1)
                                  if kind == "resume" else None))
        cards.append(GpuOverview(
            id=gpu.id, name=gpu.name, state=gpu.state, cloud_status=gpu.ws.status,
            flavor=gpu.ws.flavor, can_resume=gpu.ws.can_resume, can_pause=gpu.ws.can_pause,
            models=sorted(v.name for v in (gpu.models or {}).values()),
            loaded=sorted(gpu.loaded), slots=gpu.slots, slots_in_use=gpu.in_use,
            serving=sorted(set(serving.get(gpu.id, ()))),
            leases=[LeaseAt(user=lease.user, expires_at=_instant(lease.expires, now, wall))
                    for lease in sorted(leases.holders(gpu.id).values(), key=lambda x: x.user)],
            action=action,
            estimated_resume_seconds=round(estimator.resume_seconds(gpu.id), 1),
            last_error=gpu.last_error,
        ))
    lines = []
    for model in sorted(queue.models()):
        waiters = queue.waiters(model)
        if not waiters:
            continue
        lines.append(QueueView(
            model=model, waiting=len(waiters), users=[w.user for w in waiters],
            since=_instant(min(w.enqueued_at for w in waiters), now, wall),
            estimate_seconds=round(estimate.get(model, 0.0), 1),
        ))
    return FleetOverview(at=round(wall, _DIGITS), gpus=cards, queue=lines)
