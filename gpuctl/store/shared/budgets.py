"""Budgets shared by every replica: set on any host, enforced by all of them.

A budget blocks the wakes a key would cause (``engine.budgets``); a replica that did not
know of it would wake a GPU for that key, so every replica must hold the same budgets.
``{ns}:budgets`` maps a key id to its budget as JSON, ``{"gpu_seconds": …, "per": …,
"at": …}``; a removal is kept as ``gpu_seconds: null``, so it reaches the replicas that still
have the budget rather than being put back by one of them. ``{ns}:budgets:version`` changes
(to a token the writer draws) with every write.

- ``gpuctl keys budget`` writes here first (``set``), a later ``at`` winning, and only then
  into its host's store: a change Redis did not take is not made anywhere.
- Each replica, every second (``engine.sharing``), reads the hash when the version moved
  and writes what differs into its own store, where the engine's budgets, ``keys list``
  and the admin API read it; the engine re-reads them at once.
- What Redis lacks is never deleted from a store: a store's budgets that Redis has no
  record of are added to it instead (``HSETNX``), so the first replica seeds the group, and
  a Redis that restarted empty gets them back from whichever replica reads it first.
"""

from __future__ import annotations

import json
import logging
import math
import secrets

import redis.asyncio as aioredis

from gpuctl.store.shared.connect import text, unreachable

__all__ = ["Budget", "SharedBudgets"]

log = logging.getLogger(__name__)

#: A key's budget: (GPU-seconds, period), or None for "no budget" (a removal).
Budget = tuple[float, str] | None

_SET = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
    local ok, was = pcall(cjson.decode, old)
    if ok and type(was) == 'table' and tonumber(was['at']) and
            tonumber(was['at']) > tonumber(ARGV[3]) then
        return 0
    end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[4])
return 1
"""

_SEED = """
local added = 0
for i = 1, #ARGV - 1, 2 do
    added = added + redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
end
if added > 0 then redis.call('SET', KEYS[2], ARGV[#ARGV]) end
return added
"""

#: ARGV[1]: the version the caller last read. ``{version}`` when still it, else
#: ``{version, hash}``.
_READ = """
local version = redis.call('GET', KEYS[1]) or ''
if version == ARGV[1] then return {version} end
return {version, redis.call('HGETALL', KEYS[2])}
"""


def _record(budget: Budget, at: float) -> str:
    seconds, per = budget if budget is not None else (None, None)
    return json.dumps({"gpu_seconds": seconds, "per": per, "at": at})


def _parse(raw: bytes | str) -> Budget:
    """A record as a budget; ``ValueError`` for one no gpuctl writes."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not an object")
    seconds, per = data.get("gpu_seconds"), data.get("per")
    if seconds is None:
        return None
    if (not isinstance(seconds, int | float) or isinstance(seconds, bool)
            or not math.isfinite(seconds) or seconds < 0 or not isinstance(per, str)):
        raise ValueError(f"not a budget: {data!r}"[:200])
    return float(seconds), per


class SharedBudgets:
    """The group's budgets in Redis: written by ``gpuctl keys budget``, read by replicas."""

    def __init__(self, client: aioredis.Redis, *, namespace: str = "gpuctl") -> None:
        self._client = client
        self.key = f"{namespace}:budgets"
        self.version_key = f"{namespace}:budgets:version"
        self._set = client.register_script(_SET)
        self._seed = client.register_script(_SEED)
        self._read = client.register_script(_READ)
        self._seen = "-"

    async def set(self, key_id: str, budget: Budget, at: float) -> bool:
        """Give ``key_id`` ``budget`` (None: remove it) as of wall-clock ``at``; False when
        Redis holds a later change (it stays)."""
        with unreachable("share the budget"):
            return int(await self._set(
                keys=[self.key, self.version_key],
                args=[key_id, _record(budget, at), repr(at), secrets.token_hex(8)])) == 1

    async def read(self) -> dict[str, Budget] | None:
        """Every key's budget (None where removed), or None when nothing changed since the
        last read. Records no gpuctl writes are logged and left out."""
        with unreachable("read the shared budgets"):
            reply = await self._read(keys=[self.version_key, self.key], args=[self._seen])
        self._seen = text(reply[0])
        if len(reply) == 1:
            return None
        flat = reply[1]
        found: dict[str, Budget] = {}
        for key_id, raw in zip(flat[::2], flat[1::2], strict=True):
            try:
                found[text(key_id)] = _parse(raw)
            except ValueError as exc:
                log.warning("ignored a malformed shared budget for %s: %s", text(key_id), exc)
        return found

    async def seed(self, budgets: dict[str, tuple[float, str]]) -> int:
        """Add the ``budgets`` Redis has no record of (never over one it has); how many.
        They are dated 0: any change made with ``set`` since is later."""
        if not budgets:
            return 0
        args: list[str] = []
        for key_id, budget in budgets.items():
            args += [key_id, _record(budget, 0.0)]
        with unreachable("share the budgets"):
            return int(await self._seed(keys=[self.key, self.version_key],
                                        args=[*args, secrets.token_hex(8)]))
