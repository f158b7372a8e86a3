"""The engine's side of the calls that are not inference: model management and ``/api/show``.

``pull``, ``push``, ``create``, ``copy``, ``delete`` and blobs change nodes; which nodes is
policy, so it is decided here and the gateway only relays: the GPUs an admin names (woken
together, not one after another), else every ready GPU, narrowed to those that have the model
when there is one. GPUs are compared by id: two snapshots of one GPU differ as soon as the
clock moves (a lease's seconds left), which once dropped every leased GPU from the list.

``/api/show`` goes to a ready GPU with the model; its answers are remembered by model so a
sleeping fleet can still describe its models (listing must never wake a GPU), and failing
that, the model's details as last listed make a short answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from gpuctl.engine.catalog import ModelCatalog
from gpuctl.engine.fleet import Gpu, normalize_model
from gpuctl.engine.views import find_gpu, union_models
from gpuctl.errors import NodeError, Unavailable

__all__ = ["FAILOVER_ATTEMPTS", "Management", "route_again"]

#: Tries per inference request when nodes fail before answering (each on another GPU if one
#: is ready): inference has no side effects, so a request no byte of which reached the client
#: can be routed again.
FAILOVER_ATTEMPTS = 3

Wake = Callable[[Gpu], Awaitable[object]]


class Management:
    """Chooses the GPUs of a management call and keeps the ``/api/show`` answers."""

    def __init__(self, gpus: Mapping[str, Gpu], catalog: ModelCatalog, wake: Wake) -> None:
        self._gpus = gpus
        self._catalog = catalog
        self._wake = wake
        self._shown: dict[str, bytes] = {}

    async def targets(self, model: str | None, names: Sequence[str]) -> list[Gpu]:
        """The GPUs named (woken together if asleep), else every ready GPU, those with
        ``model`` first choice. ``Unavailable`` when nothing is running and none is named."""
        if names:
            chosen: list[Gpu] = []
            for ref in names:
                gpu = find_gpu(self._gpus, ref)
                if gpu not in chosen:
                    chosen.append(gpu)
            await asyncio.gather(*(self._wake(g) for g in chosen if not g.ready))
        else:
            chosen = sorted((g for g in self._gpus.values() if g.ready), key=lambda g: g.name)
            if model is not None:
                holders = self._catalog.holders(normalize_model(model))
                chosen = [g for g in chosen if g.id in holders] or chosen
            if not chosen:
                raise Unavailable(
                    "no GPU is running; name one in the X-Gpuctl-Gpu header to wake it",
                    retry_after=60,
                )
        for gpu in chosen:
            if gpu.probe is None:
                raise NodeError(f"{gpu.name} has no address yet")
        return chosen

    def remember_show(self, model: str, body: bytes) -> None:
        """Keep a node's ``/api/show`` answer for ``model``."""
        self._shown[normalize_model(model)] = body

    def shown(self, model: str) -> bytes | None:
        """What a node last said about ``model``; else a short answer from the details the
        model was last listed with; None when no GPU ever had it."""
        name = normalize_model(model)
        cached = self._shown.get(name)
        if cached is not None:
            return cached
        for known in union_models(self._gpus.values()):
            if normalize_model(known.name) == name:
                answer: dict[str, Any] = {
                    "license": "", "modelfile": "", "parameters": "", "template": "",
                    "details": known.details, "model_info": {}, "capabilities": [],
                }
                if known.modified_at:
                    answer["modified_at"] = known.modified_at
                return json.dumps(answer, separators=(",", ":")).encode()
        return None


def route_again(attempt: int, *, answered: bool) -> bool:
    """Whether a request whose node failed should go to another GPU (``attempt`` from 1)."""
    return not answered and attempt < FAILOVER_ATTEMPTS
