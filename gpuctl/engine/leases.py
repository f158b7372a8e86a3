"""Leases ("reservations"): user U keeps GPU G warm for a while after U's last request.

A lease gives affinity (U's next request goes back to G, where the model and the prompt
cache are warm) and keeps G awake. Each (GPU, user) pair has its own lease, so finishing one
user's request can never clear another user's lease (weak spot 5 of the old service). Expiry
is found through a heap, so checking "anything expired?" costs O(1) on the hot path.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from gpuctl.config import Config

__all__ = ["Lease", "LeaseBook", "reservation_seconds"]


def reservation_seconds(config: Config) -> float:
    """How long a user's lease lasts after their last request (``timing.reservation_minutes``)."""
    return config.timing.reservation_minutes * 60.0


@dataclass
class Lease:
    gpu_id: str
    user: str
    expires: float  # monotonic clock seconds
    seconds: float  # how long the lease lasts after the user's last request


class LeaseBook:
    """All live leases, indexed by GPU and by user."""

    def __init__(self) -> None:
        self._by_gpu: dict[str, dict[str, Lease]] = {}
        self._by_user: dict[str, dict[str, Lease]] = {}
        self._heap: list[tuple[float, int, str, str]] = []
        self._seq = itertools.count()
        #: Bumped on every change, so the engine persists leases only when they changed.
        self.version = 0

    def holders(self, gpu_id: str) -> dict[str, Lease]:
        return self._by_gpu.get(gpu_id, {})

    def of_user(self, user: str) -> dict[str, Lease]:
        """GPU id -> lease, for the leases ``user`` holds."""
        return self._by_user.get(user, {})

    def leased(self, gpu_id: str) -> bool:
        return bool(self._by_gpu.get(gpu_id))

    def leased_to_other(self, gpu_id: str, user: str) -> bool:
        holders = self._by_gpu.get(gpu_id)
        if not holders:
            return False
        return len(holders) > 1 or user not in holders

    def __iter__(self) -> Iterator[Lease]:
        for holders in self._by_gpu.values():
            yield from holders.values()

    def __len__(self) -> int:
        return sum(len(h) for h in self._by_gpu.values())

    def hold(self, gpu_id: str, user: str, expires: float, seconds: float) -> Lease:
        """Give ``user`` a lease on ``gpu_id`` until at least ``expires``."""
        lease = self._by_gpu.get(gpu_id, {}).get(user)
        if lease is None:
            lease = Lease(gpu_id, user, expires, seconds)
            self._by_gpu.setdefault(gpu_id, {})[user] = lease
            self._by_user.setdefault(user, {})[gpu_id] = lease
            heapq.heappush(self._heap, (expires, next(self._seq), gpu_id, user))
        else:
            # A later expiry is pushed lazily: ``expire`` re-files an entry it finds renewed.
            lease.expires = max(lease.expires, expires)
            lease.seconds = seconds
        self.version += 1
        return lease

    def promote(self, gpu_id: str, seconds: float) -> bool:
        """Lengthen the lease of a GPU's one remaining holder to ``seconds`` after their last
        request: a fallback lease, given because someone else held the GPU, becomes a full
        lease once nobody else does. True when a lease changed."""
        holders = self._by_gpu.get(gpu_id)
        if not holders or len(holders) > 1:
            return False
        (lease,) = holders.values()
        if lease.seconds >= seconds:
            return False
        # ``expires - seconds`` is the holder's last request; the heap entry is re-filed
        # lazily by ``expire`` like any renewal.
        lease.expires += seconds - lease.seconds
        lease.seconds = seconds
        self.version += 1
        return True

    def expire(self, now: float) -> set[str]:
        """Drop leases that ran out by ``now``; returns the GPUs that lost one."""
        changed: set[str] = set()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, gpu_id, user = heapq.heappop(heap)
            lease = self._by_gpu.get(gpu_id, {}).get(user)
            if lease is None:
                continue
            if lease.expires > now:
                heapq.heappush(heap, (lease.expires, next(self._seq), gpu_id, user))
                continue
            self._remove(lease)
            changed.add(gpu_id)
        return changed

    def next_expiry(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def drop_gpu(self, gpu_id: str) -> None:
        for lease in list(self._by_gpu.get(gpu_id, {}).values()):
            self._remove(lease)

    def _remove(self, lease: Lease) -> None:
        holders = self._by_gpu.get(lease.gpu_id, {})
        holders.pop(lease.user, None)
        if not holders:
            self._by_gpu.pop(lease.gpu_id, None)
        mine = self._by_user.get(lease.user, {})
        mine.pop(lease.gpu_id, None)
        if not mine:
            self._by_user.pop(lease.user, None)
        self.version += 1
