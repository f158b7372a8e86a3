"""The roster: the GPUs in the fleet, each filed where the router and the catalog look.

A GPU's state is derived (``fleet.derive_state``) from its cloud status, its node's last
probe, its slots in use and our own actions in flight on it. Whoever changes one of those
calls ``refile``, which recomputes the state and moves the GPU to its place in the router's
index and in the catalog's count of ready GPUs per model; ``expire`` does the same for the
GPUs whose leases ran out (a lease moves a GPU to another router bucket), and gives a
remaining holder's fallback lease its full length once nobody else holds the GPU. Discovery is the
only part that adds GPUs and drops them; everything else reads ``gpus``.
"""

from __future__ import annotations

from gpuctl.config import Config
from gpuctl.engine.api import GpuState
from gpuctl.engine.catalog import ModelCatalog
from gpuctl.engine.clock import Clock
from gpuctl.engine.fleet import Gpu, derive_state
from gpuctl.engine.leases import LeaseBook, reservation_seconds
from gpuctl.engine.ledger import Ledger
from gpuctl.engine.router import RouteIndex

__all__ = ["Roster"]


class Roster:
    """The GPUs by workspace id, and the one place their derived state is recomputed.

    Discovery, the waker and the engine all change GPUs; filing in one place keeps the
    router's index and the catalog's tallies from drifting apart from the records.
    """

    def __init__(
        self, config: Config, clock: Clock, *, index: RouteIndex, catalog: ModelCatalog,
        leases: LeaseBook, ledger: Ledger | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._index = index
        self._catalog = catalog
        self._leases = leases
        self._ledger = ledger
        #: Workspace id -> GPU.
        self.gpus: dict[str, Gpu] = {}

    def add(self, gpu: Gpu) -> None:
        self.gpus[gpu.id] = gpu

    def drop(self, gpu: Gpu) -> None:
        """Take ``gpu`` out of the fleet: no routing to it, no models, no leases."""
        del self.gpus[gpu.id]
        if self._ledger is not None:
            self._ledger.gone(gpu)
        self._index.remove(gpu.id)
        self._catalog.forget(gpu)
        self._leases.drop_gpu(gpu.id)

    def refile(self, gpu: Gpu) -> None:
        """Recompute the GPU's state and put it where the router will (or won't) find it."""
        if self.gpus.get(gpu.id) is not gpu:
            return
        wait = self._config.timing.ollama_readiness_wait_seconds
        gpu.state = state = derive_state(gpu, self._clock.now(), wait)
        gpu.ready = ready = state is GpuState.IDLE or state is GpuState.ACTIVE or (
            state is GpuState.BUSY
        )
        self._index.update(gpu, self._leases.leased(gpu.id))
        self._catalog.set_ready(gpu, ready)
        if self._ledger is not None:
            self._ledger.observe(gpu)

    def expire(self, now: float) -> None:
        """Drop the leases that ran out by ``now`` and refile the GPUs that held them."""
        next_expiry = self._leases.next_expiry()
        if next_expiry is None or next_expiry > now:
            return
        full = reservation_seconds(self._config)
        for gpu_id in self._leases.expire(now):
            self._leases.promote(gpu_id, full)
            gpu = self.gpus.get(gpu_id)
            if gpu is not None:
                self.refile(gpu)
