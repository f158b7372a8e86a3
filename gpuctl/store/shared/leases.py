"""Leases shared by every replica, so the leader's idle pause sees a lease held elsewhere.

``{ns}:leases:{gpu}`` is a hash per GPU: the field is the user, the value
``"{expires_at} {seconds}"`` (wall-clock seconds, and the lease's length after each
request). A lease only ever grows (a new request pushes its end back; the fallback lease
becomes a full one), so replicas merge by taking the later end: ``publish`` writes a lease
only where it ends later than what Redis has, in one script, so two replicas renewing the
same lease at once cannot shorten it. The hash expires with its last lease (``PEXPIREAT``),
and expired fields are dropped whenever the hash is written.

``{ns}:leases:version`` changes (to a token the writer draws) whenever a publish changed a
hash; ``read`` is one script call that returns the hashes only when the version differs
from the one the caller last saw, so a quiet group costs one small call per read, not a
``HGETALL`` per GPU.

Replicas write and read in the background loop (``engine.replicas.Replica``), never on a
request's path: the engine keeps answering from its own ``LeaseBook``, into which the
others' leases are merged every second. A replica that loses Redis keeps its own
leases and publishes them when Redis answers again; leases lost with an empty Redis come
back at the next publish of the replicas that hold them.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Iterable, Sequence

import redis.asyncio as aioredis

from gpuctl.store.shared.connect import text, unreachable
from gpuctl.store.store import LeaseRecord

__all__ = ["SharedLeases"]

log = logging.getLogger(__name__)

_PUBLISH = """
local now = tonumber(ARGV[1])
local changed = false
for i = 3, #ARGV, 3 do
    local user, ends, seconds = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
    local old = redis.call('HGET', KEYS[1], user)
    if not old or ends > tonumber(string.match(old, '^(%S+)')) then
        redis.call('HSET', KEYS[1], user, ARGV[i + 1] .. ' ' .. seconds)
        changed = true
    end
end
local latest = now
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
    local ends = tonumber(string.match(all[i + 1], '^(%S+)'))
    if ends <= now then
        redis.call('HDEL', KEYS[1], all[i])
        changed = true
    elseif ends > latest then
        latest = ends
    end
end
redis.call('PEXPIREAT', KEYS[1], math.floor(latest * 1000) + 1000)
if changed then
    redis.call('SET', KEYS[2], ARGV[2])
end
return latest
"""

#: KEYS: the version, then one hash per GPU; ARGV[1]: the version the caller has read.
#: Returns ``{version}`` when that is still it, else ``{version, hash, hash, ...}``.
_READ = """
local version = redis.call('GET', KEYS[1]) or ''
if version == ARGV[1] then
    return {version}
end
local found = {version}
for i = 2, #KEYS do
    found[i] = redis.call('HGETALL', KEYS[i])
end
return found
"""


class SharedLeases:
    """Publish this replica's leases and read everyone's, in one round trip each."""

    def __init__(self, client: aioredis.Redis, *, namespace: str = "gpuctl") -> None:
        self._client = client
        self._ns = namespace
        self.version_key = f"{namespace}:leases:version"
        self._publish = client.register_script(_PUBLISH)
        self._read = client.register_script(_READ)
        #: The version the last full ``read`` saw, and the GPUs it read.
        self._seen: tuple[str, tuple[str, ...]] | None = None

    def _key(self, gpu_id: str) -> str:
        return f"{self._ns}:leases:{gpu_id}"

    async def publish(self, leases: Iterable[LeaseRecord], now: float) -> int:
        """Merge ``leases`` into Redis (a later end wins); returns how many were sent.

        Leases that ended by ``now`` are not sent: they would only be dropped again.
        """
        by_gpu: dict[str, list[str]] = {}
        for lease in leases:
            if lease.expires_at > now:
                by_gpu.setdefault(lease.gpu_id, []).extend(
                    (lease.user, repr(lease.expires_at), repr(lease.seconds)))
        if not by_gpu:
            return 0
        # A token never used before: a Redis that restarted empty cannot come back to a
        # version a reader has seen.
        version = secrets.token_hex(8)
        with unreachable("share the leases"):
            async with self._client.pipeline(transaction=False) as pipe:
                for gpu_id, args in by_gpu.items():
                    await self._publish(keys=[self._key(gpu_id), self.version_key],
                                        args=[repr(now), version, *args], client=pipe)
                await pipe.execute()
        return sum(len(a) // 3 for a in by_gpu.values())

    async def read(self, gpu_ids: Sequence[str], now: float) -> list[LeaseRecord] | None:
        """Every replica's leases on ``gpu_ids`` that end after ``now``; None when no lease
        changed since the last read of the same GPUs (nothing new to merge)."""
        if not gpu_ids:
            return []
        ids = tuple(gpu_ids)
        seen = self._seen[0] if self._seen is not None and self._seen[1] == ids else "-"
        with unreachable("read the shared leases"):
            reply = await self._read(keys=[self.version_key, *map(self._key, ids)],
                                     args=[seen])
        version = text(reply[0])
        self._seen = (version, ids)
        if len(reply) == 1:
            return None
        found: list[LeaseRecord] = []
        for gpu_id, flat in zip(ids, reply[1:], strict=True):
            for user, value in zip(flat[::2], flat[1::2], strict=True):
                try:
                    ends, seconds = (float(v) for v in text(value).split())
                except ValueError:  # not what any replica writes: ignored, never fatal
                    log.warning("ignored a malformed lease on %s: %r", gpu_id, value)
                    continue
                if ends > now and math.isfinite(ends) and math.isfinite(seconds):
                    found.append(LeaseRecord(gpu_id, text(user), ends, seconds))
        return found
