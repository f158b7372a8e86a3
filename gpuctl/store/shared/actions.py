"""Cloud actions in flight and wanted wakes, shared so that a new leader adopts, not repeats.

``{ns}:actions`` maps a GPU to the action in flight on it (``resume``/``pause``, when it
started, the fence of the leader that sent it). ``begin`` writes it only if the caller's
fencing token is still the current leader's (checked inside Redis, against ``{ns}:leader``),
and only if no action is in flight on that GPU: a deposed leader, or a second replica, is
told no and must not call the cloud. A successor finds the record and polls the GPU until
the action is done instead of sending a second one.

``{ns}:wanted`` is a sorted set of GPUs that followers want woken, scored by when they
last asked (server milliseconds); ``{ns}:wanted:cause`` says why (``gateway``: requests
held; ``hand``: an admin's resume), for the leader's timeline. A follower whose engine
wakes a GPU calls ``want`` (again every half second while it waits); the leader reads
``wanted`` every half second and wakes through its own single-flight path, so many
followers asking make one wake.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis.asyncio as aioredis

from gpuctl.store.shared.connect import text, unreachable

__all__ = ["CloudActions", "SharedAction"]

#: A wanted record older than this is dropped: its waiter was served or gave up.
WANTED_TTL_MS = 5_000

_BEGIN = """
local leader = redis.call('GET', KEYS[1])
if not leader or leader ~= ARGV[1] then return -1 end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""

_END = """
local leader = redis.call('GET', KEYS[1])
if not leader or leader ~= ARGV[1] then return -1 end
return redis.call('HDEL', KEYS[2], ARGV[2])
"""

_WANT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return now
"""

_WANTED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[1]))
local found = {}
for _, gpu in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    found[#found + 1] = gpu
    found[#found + 1] = redis.call('HGET', KEYS[2], gpu) or 'gateway'
end
return found
"""


@dataclass(frozen=True)
class SharedAction:
    gpu_id: str
    action: str  # "resume" or "pause"
    started_at: float  # wall-clock seconds
    fence: int  # the leader that sent it


class CloudActions:
    """The fenced record of cloud actions in flight, and the followers' wanted wakes."""

    def __init__(self, client: aioredis.Redis, *, namespace: str = "gpuctl") -> None:
        self._client = client
        self.leader_key = f"{namespace}:leader"
        self.key = f"{namespace}:actions"
        self.wanted_key = f"{namespace}:wanted"
        self.causes_key = f"{namespace}:wanted:cause"
        self._begin = client.register_script(_BEGIN)
        self._end = client.register_script(_END)
        self._want = client.register_script(_WANT)
        self._wanted = client.register_script(_WANTED)

    async def begin(self, leader_value: str, gpu_id: str, action: str, at: float,
                    fence: int) -> bool:
        """Claim ``action`` on ``gpu_id`` for the leader ``leader_value`` (``"{id} {fence}"``).

        True: send it to the cloud. False: another action is in flight on that GPU, or the
        caller is no longer the leader; either way, do not call the cloud.
        """
        record = json.dumps({"action": action, "started_at": at, "fence": fence})
        with unreachable("record a cloud action"):
            done = int(await self._begin(keys=[self.leader_key, self.key],
                                         args=[leader_value, gpu_id, record]))
        return done == 1

    async def end(self, leader_value: str, gpu_id: str) -> bool:
        """The action on ``gpu_id`` is over; False when the caller lost the lead meanwhile
        (the record stays for the new leader to adopt and close)."""
        with unreachable("close a cloud action"):
            return int(await self._end(keys=[self.leader_key, self.key],
                                       args=[leader_value, gpu_id])) == 1

    async def in_flight(self) -> dict[str, SharedAction]:
        """Every action in flight, for a new leader to adopt."""
        with unreachable("read the cloud actions in flight"):
            raw = await self._client.hgetall(self.key)
        found: dict[str, SharedAction] = {}
        for gpu, value in raw.items():
            data = json.loads(value)
            found[text(gpu)] = SharedAction(text(gpu), str(data["action"]),
                                               float(data["started_at"]), int(data["fence"]))
        return found

    async def want(self, gpu_id: str, cause: str = "gateway") -> None:
        """A follower wakes ``gpu_id`` (for its held requests, or by hand: ``cause``, what
        the leader's timeline records): ask the leader."""
        with unreachable("ask the leader for a wake"):
            await self._want(keys=[self.wanted_key, self.causes_key],
                             args=[gpu_id, WANTED_TTL_MS * 2, cause])

    async def wanted(self) -> dict[str, str]:
        """The GPUs some replica asked to wake within the last few seconds, each with the
        cause it gave (the leader reads this)."""
        with unreachable("read the wanted wakes"):
            flat = await self._wanted(keys=[self.wanted_key, self.causes_key],
                                      args=[WANTED_TTL_MS])
        return {text(gpu): text(cause) for gpu, cause in zip(flat[::2], flat[1::2],
                                                             strict=True)}
