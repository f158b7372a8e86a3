"""Discovery: which workspaces make up the fleet, and what their nodes say.

Each refresh lists the cloud's workspaces (every page), adds the new ones, drops the ones
gone and takes in a fresh read of the rest; then it probes the running nodes (ready, tags,
ps), at most ``PROBE_CONCURRENCY`` at once. It is the only code that adds GPUs to the
engine's roster or removes them, and the only code that talks to the nodes, whose clients it
opens when a workspace gets an address and closes when the address changes or the GPU goes.
The models a node listed are saved, so a GPU paused since is still known to have them.

A probe or a read may change a GPU's state, so each one ends with the roster's ``refile``
(recompute the state, re-index the GPU), and a probe or a refresh with the engine's
``drain`` (give the GPU's free slots to waiters).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from gpuctl.cloud.base import CloudProvider, Workspace
from gpuctl.config import Config
from gpuctl.engine.background import Background
from gpuctl.engine.catalog import ModelCatalog
from gpuctl.engine.clock import Clock
from gpuctl.engine.fleet import Gpu, normalize_model
from gpuctl.engine.leases import reservation_seconds
from gpuctl.engine.roster import Roster
from gpuctl.errors import GpuctlError
from gpuctl.node.base import ModelView, NodeProbe
from gpuctl.node.client import NodeClient
from gpuctl.store import Store

__all__ = ["PROBE_CONCURRENCY", "Discovery", "NodeFactory", "default_nodes"]

log = logging.getLogger(__name__)

NodeFactory = Callable[[Workspace], NodeProbe]

#: How many nodes are probed at once during a refresh.
PROBE_CONCURRENCY = 16


def default_nodes(config: Config, token: str | None) -> NodeFactory:
    """HTTP node clients over ``gpu.ollama_url``, sending ``token`` (found by the caller's
    ``Credentials``: the engine never reads the process environment for a secret)."""
    template = config.gpu.ollama_url

    def make(ws: Workspace) -> NodeProbe:
        return NodeClient.for_workspace(ws, template, token=token)

    return make


class Discovery:
    """Keeps the roster in line with the cloud's list, and each GPU in line with its node.

    Apart from the engine because it is all I/O (cloud pages, node probes, client
    lifetimes) and runs in the background loop, never on a request's path.
    """

    def __init__(
        self,
        config: Config,
        cloud: CloudProvider,
        *,
        clock: Clock,
        store: Store,
        nodes: NodeFactory,
        roster: Roster,
        catalog: ModelCatalog,
        background: Background,
        drain: Callable[[Gpu], None],
        resupply: Callable[[], None],
    ) -> None:
        self._config = config
        self._cloud = cloud
        self._clock = clock
        self._store = store
        self._nodes = nodes
        self._roster = roster
        self._gpus = roster.gpus
        self._refile = roster.refile
        self._catalog = catalog
        self._background = background
        self._drain = drain
        #: Called when a GPU leaves: the models queued for it need supplying elsewhere.
        self._resupply = resupply
        self._known = store.known_models()
        self._empty_before = False

    async def refresh(self, *, probe: bool = True) -> None:
        """Re-discover the fleet (every page) and, unless ``probe=False``, probe the nodes."""
        workspaces = await self._cloud.list_workspaces()
        if not workspaces and self._gpus and not self._empty_before:
            # A cloud API glitch can list nothing; believe it only when it says so twice.
            self._empty_before = True
            log.warning("the cloud listed no workspaces; keeping the fleet until it agrees")
            return
        self._empty_before = not workspaces
        seen: set[str] = set()
        for ws in workspaces:
            seen.add(ws.id)
            gpu = self._gpus.get(ws.id)
            if gpu is None:
                self._add(ws)
            else:
                self.apply_workspace(gpu, ws)
        for gpu_id in [g for g in self._gpus if g not in seen]:
            self._drop(self._gpus[gpu_id], "vanished from the cloud")
        if probe:
            limit = asyncio.Semaphore(PROBE_CONCURRENCY)

            async def one(gpu: Gpu) -> None:
                async with limit:
                    await self.probe(gpu)

            await asyncio.gather(
                *(one(g) for g in list(self._gpus.values()) if g.ws.status == "running")
            )
        for gpu in list(self._gpus.values()):
            self._refile(gpu)
            self._drain(gpu)

    def _add(self, ws: Workspace) -> Gpu:
        gpu = Gpu(ws=ws, slots=self._config.gpu.slots)
        known = self._known.get(ws.id)
        if known is not None:
            self._catalog.set_models(gpu, [ModelView.model_validate(m) for m in known])
        self._roster.add(gpu)
        self.apply_workspace(gpu, ws)
        return gpu

    def _drop(self, gpu: Gpu, reason: str) -> None:
        log.warning("%s %s", gpu.name, reason)
        gpu.last_error = reason
        gpu.node_ready = False
        self._roster.drop(gpu)
        self._background.spawn(close_probe(gpu.probe))
        self._resupply()

    def apply_workspace(self, gpu: Gpu, ws: Workspace) -> bool:
        """Take in a fresh read of ``ws``; False when the GPU is no longer in the fleet."""
        if self._gpus.get(gpu.id) is not gpu:
            return False
        old = gpu.ws
        gpu.ws = ws
        address = (ws.ip, ws.fqdn, ws.host_name, ws.node_url)
        if gpu.probe is None or address != (old.ip, old.fqdn, old.host_name, old.node_url):
            if gpu.probe is not None:
                self._background.spawn(close_probe(gpu.probe))
                gpu.probe = None
            if any(address):
                try:
                    gpu.probe = self._nodes(ws)
                except GpuctlError as exc:  # e.g. the URL template needs a field not set yet
                    gpu.last_error = str(exc)
        now = self._clock.now()
        if ws.status == "running":
            if gpu.running_since is None:
                gpu.running_since = now
                if gpu.waking is None:
                    # Resumed outside the engine (by hand, or before we started): grace.
                    gpu.grace_until = max(gpu.grace_until, now + reservation_seconds(self._config))
                    gpu.idle_since = now
        else:
            gpu.running_since = None
            gpu.node_ready = False
            gpu.node_failed = False
        self._refile(gpu)
        return True

    async def probe(self, gpu: Gpu) -> bool:
        """Ask the node whether Ollama answers, and what it has; True when ready."""
        node = gpu.probe
        ok = False
        tags: list[ModelView] = []
        ps: list[dict[str, Any]] = []
        if node is not None and gpu.ws.status == "running":
            try:
                ok = await node.ready()
                if ok:
                    tags = await node.tags()
                    ps = await node.ps()
            except GpuctlError as exc:
                ok = False
                gpu.last_error = str(exc)
            except Exception as exc:  # a probe must never take the engine down
                ok = False
                gpu.last_error = f"probe failed: {exc}"
        if self._gpus.get(gpu.id) is not gpu or gpu.pausing is not None:
            return False
        if ok:
            if self._catalog.set_models(gpu, tags):
                self._save_models(gpu)
            gpu.ps = ps
            gpu.loaded = {normalize_model(str(p.get("name") or p.get("model") or "")) for p in ps}
            gpu.node_failed = False
            if gpu.last_error and gpu.waking is None:
                gpu.last_error = None
        gpu.node_ready = ok
        self._refile(gpu)
        self._drain(gpu)
        return ok

    def schedule_probe(self, gpu: Gpu) -> None:
        """Probe ``gpu`` soon, in the background (once, however often it is asked)."""
        if gpu.probing is None or gpu.probing.done():

            async def run() -> None:
                await self.probe(gpu)

            gpu.probing = self._background.spawn(run())

    async def close(self) -> None:
        """Close the node clients of every GPU (the engine stops)."""
        for gpu in self._gpus.values():
            await close_probe(gpu.probe)

    def learn(self, gpu_id: str, models: Sequence[Mapping[str, Any]]) -> None:
        """Models another replica saw on ``gpu_id``: remembered, and listed for the GPU
        while it is not ready here (a ready GPU's own probe is the fresher word)."""
        dumped = [dict(m) for m in models]
        self._known[gpu_id] = dumped
        gpu = self._gpus.get(gpu_id)
        if gpu is not None and not gpu.ready:
            self._catalog.set_models(gpu, [ModelView.model_validate(m) for m in dumped])
            self._refile(gpu)

    def _save_models(self, gpu: Gpu) -> None:
        dumped = [v.model_dump() for v in (gpu.models or {}).values()]
        self._known[gpu.id] = dumped
        self._store.save_models(gpu.id, dumped, self._clock.wall())


async def close_probe(probe: NodeProbe | None) -> None:
    """Close a node client, if it has anything to close; a failure to close is no news."""
    close = getattr(probe, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()
