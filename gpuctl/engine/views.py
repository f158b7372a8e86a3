"""What the faces see: snapshots of the engine's records as the public pydantic models.

Kept apart from the engine so that the shapes the CLI and the gateway print (stable keys for
``--json`` and the admin API) are built in one place, from read-only looks at the records.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gpuctl.engine.api import GpuMetrics, GpuView, LeaseView, ModelView
from gpuctl.engine.estimates import Estimator
from gpuctl.engine.fairqueue import FairQueue
from gpuctl.engine.fleet import Gpu
from gpuctl.engine.leases import LeaseBook
from gpuctl.errors import GpuNotFound, UsageError

__all__ = ["find_gpu", "gpu_metrics", "gpu_view", "ps_entries", "union_models"]


def find_gpu(gpus: Mapping[str, Gpu], ref: str) -> Gpu:
    """A GPU by workspace id, exact name, or unique name prefix."""
    gpu = gpus.get(ref)
    if gpu is not None:
        return gpu
    exact = [g for g in gpus.values() if g.name == ref]
    if len(exact) == 1:
        return exact[0]
    matches = exact or [g for g in gpus.values() if g.name.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise GpuNotFound(f"no GPU with id or name '{ref}'")
    names = ", ".join(sorted(g.name for g in matches))
    raise UsageError(
        f"'{ref}' matches {len(matches)} GPUs: {names}",
        hint="Give more of the name, or the workspace id.",
    )


def _queued(gpu: Gpu, queue: FairQueue) -> int:
    models = gpu.models or {}
    return sum(queue.depth(m) for m in queue.models() if m in models)


def gpu_view(
    gpu: Gpu, *, now: float, leases: LeaseBook, queue: FairQueue, estimator: Estimator
) -> GpuView:
    ws = gpu.ws
    return GpuView(
        id=gpu.id,
        name=gpu.name,
        state=gpu.state,
        cloud_status=ws.status,
        ip=ws.ip,
        fqdn=ws.fqdn,
        flavor=ws.flavor,
        size=ws.size,
        can_resume=ws.can_resume,
        can_pause=ws.can_pause,
        models=sorted(v.name for v in (gpu.models or {}).values()),
        loaded=sorted(gpu.loaded),
        slots=gpu.slots,
        slots_in_use=gpu.in_use,
        queued=_queued(gpu, queue),
        leases=[
            LeaseView(user=lease.user, expires_in_seconds=max(0.0, lease.expires - now))
            for lease in sorted(leases.holders(gpu.id).values(), key=lambda x: x.user)
        ],
        estimated_resume_seconds=round(estimator.resume_seconds(gpu.id), 1),
        last_error=gpu.last_error,
        base_url=gpu.probe.base_url if gpu.probe is not None else None,
    )


def gpu_metrics(gpu: Gpu, *, leases: LeaseBook, queue: FairQueue) -> GpuMetrics:
    return GpuMetrics(
        id=gpu.id, name=gpu.name, state=gpu.state, slots=gpu.slots, slots_in_use=gpu.in_use,
        queued=_queued(gpu, queue), leases=len(leases.holders(gpu.id)),
    )


def union_models(gpus: Iterable[Gpu]) -> list[ModelView]:
    """Every model any GPU has, or had when last seen; a ready GPU's listing wins."""
    union: dict[str, ModelView] = {}
    for gpu in sorted(gpus, key=lambda g: (not g.ready, g.name)):
        for name, view in (gpu.models or {}).items():
            union.setdefault(name, view)
    return [union[name] for name in sorted(union)]


def ps_entries(gpus: Iterable[Gpu]) -> list[dict[str, Any]]:
    """The ``/api/ps`` entries of the ready GPUs, as their nodes last listed them."""
    return [
        dict(entry)
        for gpu in sorted(gpus, key=lambda g: g.name)
        if gpu.ready
        for entry in gpu.ps
    ]
