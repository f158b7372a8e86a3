"""Which ready GPU serves a request for model M from user U, and why.

Preference, in order: a GPU leased to U; M already loaded (``/api/ps``); not leased to
anyone else; fewest slots in use. The GPUs leased to U are few, so they are checked
directly. For the rest, every ready GPU with a free slot sits, for each model it has, in
one bucket keyed by (M loaded?, leased?, slots in use); a decision walks the few buckets in
preference order and takes the first GPU it finds. It never scans the fleet, so it costs
the same for 10 GPUs and 1,000 (see ``tests/bench/bench_router.py``). The engine calls
``update`` whenever a GPU's readiness, slots, models or leases change.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from gpuctl.engine.fleet import Gpu

__all__ = ["Choice", "RouteIndex"]



@dataclass(frozen=True)
class Choice:
    gpu: Gpu
    reason: str


class RouteIndex:
    """Ready GPUs with a free slot, bucketed per model by preference.

    A bucket's number is its rank: ``used + slots * leased + 2 * slots * (not loaded)``, so
    walking the buckets of a model from 0 up visits them in the router's preference order.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._unloaded = 2 * slots
        self._ranks = range(4 * slots)
        #: The buckets of leased GPUs, best first (a user's own GPUs are all leased).
        self._leased_ranks = [r for r in self._ranks if r % self._unloaded >= slots]
        #: model -> bucket rank -> {gpu id: gpu}; only models with some free GPU are present.
        self._buckets: dict[str, list[dict[str, Gpu]]] = {}
        self._free: dict[str, int] = {}
        self._placed: dict[str, dict[str, int]] = {}

    def update(self, gpu: Gpu, leased: bool) -> None:
        """File ``gpu`` where it now belongs (nowhere unless ready with a free slot)."""
        gpu_id = gpu.id
        old = self._placed.get(gpu_id)
        new: dict[str, int] | None = None
        if gpu.ready and gpu.in_use < self.slots and gpu.models:
            base = gpu.in_use + (self.slots if leased else 0)
            loaded = gpu.loaded
            far = base + self._unloaded
            new = {m: base if m in loaded else far for m in gpu.models}
        if old == new:
            return
        buckets = self._buckets
        if old is not None:
            for model, rank in old.items():
                if new is None or new.get(model) != rank:
                    del buckets[model][rank][gpu_id]
                    if new is None or model not in new:
                        self._drop_one(model)
        if new is not None:
            for model, rank in new.items():
                if old is None or old.get(model) != rank:
                    line = buckets.get(model)
                    if line is None:
                        line = buckets[model] = [{} for _ in self._ranks]
                    line[rank][gpu_id] = gpu
                    if old is None or model not in old:
                        self._free[model] = self._free.get(model, 0) + 1
            self._placed[gpu_id] = new
        else:
            del self._placed[gpu_id]

    def remove(self, gpu_id: str) -> None:
        for model, rank in self._placed.pop(gpu_id, {}).items():
            del self._buckets[model][rank][gpu_id]
            self._drop_one(model)

    def has_free(self, model: str) -> bool:
        return model in self._free

    def choose(self, model: str, user_leases: Mapping[str, object],
               full: Collection[str] = ()) -> Choice | None:
        """The best ready GPU with ``model`` and a free slot, or ``None``; ``user_leases``
        (the caller's leases by GPU id) puts the caller's own GPUs first.

        ``full``: GPUs on which the caller already holds the most slots one user may hold
        (``server.max_slots_per_user``); they are passed over. Few, so checked directly.
        """
        if model not in self._free:
            return None
        line = self._buckets[model]
        if user_leases:
            pick = self._own(line, model, user_leases, full)
            if pick is not None:
                loaded = "model loaded" if model in pick.loaded else "model on disk"
                used = f"{pick.in_use}/{pick.slots} slots in use"
                return Choice(pick, f"leased to you, {loaded}, {used}")
        for rank in self._ranks:
            bucket = line[rank]
            if bucket:
                gpu = next(iter(bucket.values()))
                if full and gpu.id in full:
                    found = next((g for g in bucket.values() if g.id not in full), None)
                    if found is None:
                        continue
                    gpu = found
                loaded = "model on disk" if rank >= self._unloaded else "model loaded"
                leased = (
                    "leased to another user" if rank % self._unloaded >= self.slots
                    else "not leased"
                )
                return Choice(gpu, f"{loaded}, {leased}, {gpu.in_use}/{gpu.slots} slots in use")
        return None  # every free GPU is one this user holds the most slots on

    def _own(
        self, line: list[dict[str, Gpu]], model: str, user_leases: Mapping[str, object],
        full: Collection[str] = (),
    ) -> Gpu | None:
        """The best of the user's leased GPUs for ``model`` (loaded, then fewest in use).

        Either check each leased GPU, or walk the leased buckets in order until one of the
        user's GPUs turns up, whichever is shorter: a user leasing 1,000 GPUs costs no more
        than one leasing a few.
        """
        leased_ranks = self._leased_ranks
        if len(user_leases) > len(leased_ranks):
            walk = 0
            for leased in leased_ranks:
                walk += len(line[leased])
            if walk < len(user_leases):
                for leased in leased_ranks:
                    for gpu_id, gpu in line[leased].items():
                        if gpu_id in user_leases and gpu_id not in full:
                            return gpu
                return None
        best = -1
        pick: Gpu | None = None
        placed = self._placed
        unloaded = self._unloaded
        for gpu_id in user_leases:
            if gpu_id in full:
                continue
            ranks = placed.get(gpu_id)
            rank = ranks.get(model) if ranks is not None else None
            if rank is None:
                continue
            # Among the user's own GPUs: loaded first, then fewest slots in use.
            own = (rank >= unloaded) * self.slots + (rank % self.slots)
            if pick is None or own < best:
                best, pick = own, line[rank][gpu_id]
        return pick

    def _drop_one(self, model: str) -> None:
        left = self._free[model] - 1
        if left:
            self._free[model] = left
        else:
            del self._free[model]
            del self._buckets[model]
