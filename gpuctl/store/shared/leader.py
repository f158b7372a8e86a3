"""The leader lease: exactly one replica at a time acts toward the cloud.

``{ns}:leader`` holds ``"{replica} {fence}"`` with a TTL (``SET NX PX`` inside a script that
also takes the next fencing token from ``INCR {ns}:leader:fence``). The leader renews by
compare-and-extend: the TTL is pushed back only while the value is still its own, so a
leader that stalled past its TTL and was succeeded cannot take the lease back by renewing.
The fencing token rises with every new leader; whatever the leader writes on the cloud's
behalf (``actions.CloudActions``) is checked against the current token inside Redis, so a
deposed leader that wakes from a pause cannot record a second resume.

Renewal runs every third of the TTL, so one lost renewal does not cost the lease; a leader
that dies is succeeded within one TTL (the followers try to take the lease as often).
"""

from __future__ import annotations

import contextlib
import logging

import redis.asyncio as aioredis

from gpuctl.store.shared.connect import StoreUnreachable, text

__all__ = ["DEFAULT_LEASE_SECONDS", "LeaderLease"]

log = logging.getLogger(__name__)

#: A dead leader is succeeded within this long.
DEFAULT_LEASE_SECONDS = 6.0

_TAKE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local fence = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. fence, 'PX', ARGV[2])
return fence
"""

_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaderLease:
    """One replica's view of the lease: ``step`` takes or renews it, ``is_leader`` says."""

    def __init__(self, client: aioredis.Redis, replica: str, *, namespace: str = "gpuctl",
                 lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self._client = client
        self.replica = replica
        self.key = f"{namespace}:leader"
        self.fence_key = f"{namespace}:leader:fence"
        self.ttl_ms = max(1, round(lease_seconds * 1000))
        self.fence = 0  # ours while leader; 0 when not
        self._take = client.register_script(_TAKE)
        self._extend = client.register_script(_EXTEND)
        self._resign = client.register_script(_RESIGN)

    @property
    def is_leader(self) -> bool:
        return self.fence > 0

    @property
    def value(self) -> str:
        return f"{self.replica} {self.fence}"

    @property
    def interval(self) -> float:
        """Seconds between two steps: a third of the lease."""
        return self.ttl_ms / 3000

    async def step(self) -> bool:
        """Renew the lease if ours, else try to take it; True while this replica leads.

        Redis unreachable: we stop counting ourselves leader at once (another replica may
        take over once Redis is back, and we must not act on a lease we cannot renew).
        """
        try:
            if self.fence and int(await self._extend(keys=[self.key],
                                                     args=[self.value, self.ttl_ms])):
                return True
            if self.fence:
                log.warning("leader lease lost (fence %d)", self.fence)
            self.fence = int(await self._take(keys=[self.key, self.fence_key],
                                              args=[self.replica, self.ttl_ms]))
        except StoreUnreachable as exc:
            if self.fence:
                log.warning("leader lease not renewed, Redis unreachable: %s", exc)
            self.fence = 0
        return self.fence > 0

    async def resign(self) -> None:
        """Give the lease up (a clean stop), so a follower takes over without waiting."""
        if self.fence:
            with contextlib.suppress(*StoreUnreachable):  # else it expires by itself
                await self._resign(keys=[self.key], args=[self.value])
            self.fence = 0

    async def holder(self) -> tuple[str, int] | None:
        """(replica, fence) of the current leader, or None."""
        raw = await self._client.get(self.key)
        if raw is None:
            return None
        replica, _, fence = text(raw).rpartition(" ")
        return replica, int(fence)
