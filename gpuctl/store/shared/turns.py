"""Whose turn a freed slot is, across replicas: fairness between replicas, and the
per-user cap counted over all of them.

Per GPU, three keys beside the slots (``slots.py``):

- ``{ns}:wait:{gpu}``: the replicas with requests waiting for this GPU, scored by when
  they last had a turn or started waiting (a counter, ``…:seq``: no ties, no clocks);
- ``{ns}:live:{gpu}``: when each replica's registration expires (``LIVE_MS`` after its
  last sync), so a dead replica's place in line and its user counts vanish by themselves;
- ``{ns}:users:{gpu}``: each replica's slots per user (JSON), for the global per-user cap.

A replica whose released slot might be wanted elsewhere (another replica waits for the
GPU) asks ``pass_on``: one script gives the slot to the waiting replica that has waited
longest since its last turn (or since it started waiting), itself included. Its own
turn: it keeps the entry for its local queue. Another's: the entry becomes a reservation
``hand:{replica}:…`` in the slot set (counted, so nobody else takes it) and is pushed on
that replica's hand list, which its next ``acquire`` claims; a reservation nobody claims
expires within ``HAND_MS``. Every replica waiting
thus gets a turn in strict rotation: a user flooding one replica delays a request waiting
on another by at most one turn per replica waiting. Within a replica, its fair queue picks
the user. A replica with nobody else waiting never asks: its slots go round locally at no
Redis cost.

News travels on one pub/sub channel (``{ns}:turns``): "wait GPU REPLICA" when a replica
starts waiting for a GPU, "hand GPU REPLICA" when a slot was handed to it; each replica's
listener syncs at once on news that concerns it, so a turn takes a round trip, not a
sync period.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import Enum

import redis.asyncio as aioredis

from gpuctl.store.shared.connect import text
from gpuctl.store.shared.slots import GlobalSlots

__all__ = ["HAND_MS", "LIVE_MS", "GpuTurn", "Passed", "SlotTurns", "TurnNews"]

#: A replica's registration (its place in line, its user counts) lasts this long unsynced.
LIVE_MS = 1000

#: A slot handed to a replica that does not claim it goes back to everyone this soon.
HAND_MS = 1000

_PRUNE = """
local function prune(now, wait, live, users)
    for _, r in ipairs(redis.call('ZRANGEBYSCORE', live, '-inf', now)) do
        redis.call('ZREM', wait, r)
        redis.call('HDEL', users, r)
    end
    redis.call('ZREMRANGEBYSCORE', live, '-inf', now)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: slots, wait, live, users. ARGV: member, me, waiting here (0/1), hand ms, channel, gpu.
# Returns 1: keep it (this replica's turn), 0: freed (nobody waits), 2: handed on.
_PASS = _PRUNE + """
prune(now, KEYS[2], KEYS[3], KEYS[4])
local me, here = ARGV[2], ARGV[3] == '1'
local turn = false
for _, r in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    if r ~= me or here then turn = r break end
end
if not turn then
    if here then return 1 end
    redis.call('ZREM', KEYS[1], ARGV[1])
    return 0
end
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[2] .. ':seq'), turn)
if turn == me then return 1 end
redis.call('ZREM', KEYS[1], ARGV[1])
local hand = 'hand:' .. turn .. ':' .. ARGV[1]
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), hand)
local list = KEYS[1] .. ':hand:' .. turn
redis.call('RPUSH', list, hand)
redis.call('PEXPIRE', list, tonumber(ARGV[4]) * 2)
redis.call('PUBLISH', ARGV[5], 'hand ' .. ARGV[6] .. ' ' .. turn)
return 2
"""

# KEYS: per GPU slots, wait, live, users. ARGV: me, live ms, channel, then per GPU: its id,
# waiting here (0/1), this replica's users JSON ('' for none).
# Returns per GPU: {slots in use, other replicas waiting, slots handed to me, others' JSON}.
_SYNC = _PRUNE + """
local me, live_ms, chan = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local out = {}
for i = 0, #KEYS / 4 - 1 do
    local slots, wait, live, users = KEYS[4*i+1], KEYS[4*i+2], KEYS[4*i+3], KEYS[4*i+4]
    local gpu, waiting, mine = ARGV[4+3*i], ARGV[5+3*i] == '1', ARGV[6+3*i]
    prune(now, wait, live, users)
    redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
    if waiting then
        if not redis.call('ZSCORE', wait, me) then
            redis.call('ZADD', wait, redis.call('INCR', wait .. ':seq'), me)
            redis.call('PUBLISH', chan, 'wait ' .. gpu .. ' ' .. me)
        end
    else
        redis.call('ZREM', wait, me)
    end
    if mine ~= '' then redis.call('HSET', users, me, mine) else redis.call('HDEL', users, me) end
    if waiting or mine ~= '' then
        redis.call('ZADD', live, now + live_ms, me)
        for _, k in ipairs({wait, live, users, wait .. ':seq'}) do
            redis.call('PEXPIRE', k, live_ms * 4)
        end
    else
        redis.call('ZREM', live, me)
    end
    local others = redis.call('ZCARD', wait)
    if redis.call('ZSCORE', wait, me) then others = others - 1 end
    local list = slots .. ':hand:' .. me
    while true do  -- drop reservations that expired unclaimed
        local head = redis.call('LINDEX', list, 0)
        if not head or redis.call('ZSCORE', slots, head) then break end
        redis.call('LPOP', list)
    end
    local flat = redis.call('HGETALL', users)
    local theirs = {}
    for j = 1, #flat, 2 do
        if flat[j] ~= me then table.insert(theirs, flat[j + 1]) end
    end
    table.insert(out, {redis.call('ZCARD', slots), others, redis.call('LLEN', list), theirs})
end
return out
"""


class Passed(Enum):
    """What ``pass_on`` did with a released slot."""

    KEPT = 1  # this replica's turn: its local queue takes it
    FREED = 0  # nobody waits: back to everyone
    HANDED = 2  # another replica's turn: reserved for it


@dataclass
class GpuTurn:
    """One GPU as one replica's sync sees it."""

    in_use: int  # slots taken across all replicas, reservations included
    others_waiting: int  # other replicas with requests waiting for it
    handed: int  # slots handed to this replica, not claimed yet
    users: dict[str, int] = field(default_factory=dict)  # slots per user, other replicas


@dataclass(frozen=True)
class TurnNews:
    """A message on the turns channel."""

    kind: str  # "wait" or "hand"
    gpu_id: str
    replica: str


class SlotTurns:
    """One replica's side of the turn registry (see the module docstring)."""

    def __init__(self, slots: GlobalSlots, client: aioredis.Redis, replica: str, *,
                 namespace: str = "gpuctl") -> None:
        self.slots = slots
        self.replica = replica
        self._ns = namespace
        self.channel = f"{namespace}:turns"
        self._pass = client.register_script(_PASS)
        self._sync = client.register_script(_SYNC)

    def _keys(self, gpu_id: str) -> list[str]:
        ns = self._ns
        return [self.slots.key(gpu_id), f"{ns}:wait:{gpu_id}", f"{ns}:live:{gpu_id}",
                f"{ns}:users:{gpu_id}"]

    async def pass_on(self, gpu_id: str, member: str, *, waiting_here: bool) -> Passed:
        """Give ``member``'s slot to whoever's turn it is (``StoreUnreachable`` raised)."""
        result = await self._pass(keys=self._keys(gpu_id), args=[
            member, self.replica, int(waiting_here), HAND_MS, self.channel, gpu_id])
        return Passed(int(result))

    async def sync(self, gpus: dict[str, tuple[bool, dict[str, int]]]) -> dict[str, GpuTurn]:
        """Register, per GPU, whether requests wait here and this replica's slots per user;
        read back the counts, the others waiting, the slots handed here and the others'
        slots per user. One round trip for every GPU."""
        if not gpus:
            return {}
        keys: list[str] = []
        args: list[str | int] = [self.replica, LIVE_MS, self.channel]
        for gpu_id, (waiting, users) in gpus.items():
            keys += self._keys(gpu_id)
            args += [gpu_id, int(waiting), json.dumps(users) if users else ""]
        rows = await self._sync(keys=keys, args=args)
        result: dict[str, GpuTurn] = {}
        for gpu_id, (used, others, handed, theirs) in zip(gpus, rows, strict=True):
            turn = GpuTurn(int(used), int(others), int(handed))
            for raw in theirs:
                for user, count in json.loads(text(raw)).items():
                    turn.users[user] = turn.users.get(user, 0) + int(count)
            result[gpu_id] = turn
        return result

    @staticmethod
    def parse(message: bytes | str) -> TurnNews | None:
        """A channel message, or None when it is not one of ours."""
        parts = text(message).split(" ")
        if len(parts) != 3 or parts[0] not in ("wait", "hand"):
            return None
        return TurnNews(parts[0], parts[1], parts[2])
