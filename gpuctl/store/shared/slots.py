"""Global slots: a GPU's slot count holds across every replica, and a dead replica's slots
come back within one TTL.

Each granted slot is one member of a sorted set per GPU (``{ns}:slots:{gpu}``), scored by
the millisecond at which it expires (Redis server time). One Lua script drops the expired
members, counts the rest and adds the new one only under the limit: the check and the add
are one atomic step, so two replicas racing for the last slot cannot both win. A replica
renews the members it holds (``SlotHolder`` heartbeat, every third of the TTL); a replica
that dies stops renewing, and its members expire. Releasing removes the member at once.

Redis runs scripts one at a time, so the limit is exact while Redis keeps its data. A
member that vanished while its request still ran (its replica lost Redis for longer than a
TTL, or Redis restarted empty) is put back by the next renewal, so the global count tells
the truth again within a third of a TTL; the request is let finish meanwhile: cutting a
stream is worse than a slot over for that short window.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections.abc import Iterator

import redis.asyncio as aioredis
import redis.exceptions

from gpuctl.store.shared.connect import StoreUnreachable, unreachable
from gpuctl.tasks import cancel_and_wait

__all__ = ["DEFAULT_TTL_SECONDS", "GlobalSlots", "SlotHolder"]

log = logging.getLogger(__name__)

#: A dead replica's slots come back after this long; renewals run every third of it.
DEFAULT_TTL_SECONDS = 15.0

# Many acquires in one call, in order. Per acquire i: KEYS[2i-1] the GPU's slots, KEYS[2i]
# the slots handed to this replica by another (``turns.py``), ARGV[2i] the limit and
# ARGV[2i+1] the member (ARGV[1]: the TTL). A live handed slot is claimed first, whatever
# the count; else a slot is taken only under the limit. Returns the counts after (-1: full).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS / 2 do
    local slots, hands = KEYS[2 * i - 1], KEYS[2 * i]
    redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
    local handed = false
    while true do
        local h = redis.call('LPOP', hands)
        if not h then break end
        if redis.call('ZSCORE', slots, h) then handed = h break end
    end
    if handed then
        redis.call('ZREM', slots, handed)
    end
    if not handed and redis.call('ZCARD', slots) >= tonumber(ARGV[2 * i]) then
        out[i] = -1
    else
        redis.call('ZADD', slots, now + ttl, ARGV[2 * i + 1])
        redis.call('PEXPIRE', slots, ttl * 2)
        out[i] = redis.call('ZCARD', slots)
    end
end
return out
"""

_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local revived = 0
for i = 1, #ARGV - 1 do
    local score = redis.call('ZSCORE', KEYS[i], ARGV[i + 1])
    if not score or tonumber(score) <= now then revived = revived + 1 end
    redis.call('ZADD', KEYS[i], now + tonumber(ARGV[1]), ARGV[i + 1])
    redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[1]) * 2)
end
return revived
"""

_COUNT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""


class GlobalSlots:
    """Acquire, release, renew and count slots per GPU, atomically across replicas."""

    def __init__(self, client: aioredis.Redis, *, namespace: str = "gpuctl",
                 ttl_seconds: float = DEFAULT_TTL_SECONDS) -> None:
        self._client = client
        self._ns = namespace
        self.ttl_ms = max(1, round(ttl_seconds * 1000))
        self._acquire = client.register_script(_ACQUIRE)
        #: Acquires waiting for the next call: (keys, limit, member, future).
        self._batch: list[tuple[tuple[str, str], int, str, asyncio.Future[int]]] = []
        self._sender: asyncio.Task[None] | None = None
        self._inflight = False  # a call is in flight: new acquires wait for the next
        self._inline = False  # ... and it is a lone acquire's, which starts the sender after
        self._renew = client.register_script(_RENEW)
        self._count = client.register_script(_COUNT)
        #: Calls that found Redis unreachable so far. Redis may have lost its entries
        #: meanwhile, so whatever was held before a failure must not be handed on as is.
        self.failures = 0
        #: Whether the last call reached Redis.
        self.healthy = True

    def _key(self, gpu_id: str) -> str:
        return f"{self._ns}:slots:{gpu_id}"

    def key(self, gpu_id: str) -> str:
        """The sorted set of ``gpu_id``'s slot entries."""
        return self._key(gpu_id)

    def hand_key(self, gpu_id: str, replica: str) -> str:
        """The list of slots on ``gpu_id`` handed to ``replica`` (see ``turns.py``)."""
        return f"{self._key(gpu_id)}:hand:{replica}"

    async def try_acquire(self, gpu_id: str, member: str, limit: int,
                          replica: str = "") -> int | None:
        """Take one of ``limit`` slots on ``gpu_id`` for ``member`` (claiming first a slot
        handed to ``replica``): the count in use after, or None when all are taken.
        ``Unavailable`` (503) when Redis does not answer.

        Acquires that arrive while a call is in flight wait and go together in the next
        call: one round trip for a burst, never hundreds of calls racing for connections
        (256 at once made a third of them time out), and no added wait when idle."""
        keys = (self._key(gpu_id), self.hand_key(gpu_id, replica))
        if not self._inflight:  # nothing in flight: call at once, no task (~40 µs leaner)
            self._inflight = self._inline = True
            try:
                with unreachable("grant a slot"), self._noting():
                    (used,) = await self._call([keys[0], keys[1]], [self.ttl_ms, limit, member])
            except asyncio.CancelledError:  # the entry may be in: give it back
                self._later_zrem(keys[0], member)
                raise
            finally:
                self._inflight = self._inline = False
                if self._batch and (self._sender is None or self._sender.done()):
                    self._sender = asyncio.ensure_future(self._send())
            return None if int(used) < 0 else int(used)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._batch.append((keys, limit, member, future))
        if not self._inline and (self._sender is None or self._sender.done()):
            self._sender = asyncio.ensure_future(self._send())
        with unreachable("grant a slot"):
            try:
                used = await asyncio.shield(future)
            except asyncio.CancelledError:
                # Granted as the caller left: give the entry back rather than leak it.
                future.add_done_callback(lambda done: self._abandoned(done, keys[0], member))
                raise
        return None if used < 0 else used

    def _abandoned(self, done: asyncio.Future[int], key: str, member: str) -> None:
        if not done.cancelled() and done.exception() is None and done.result() >= 0:
            self._later_zrem(key, member)

    def _later_zrem(self, key: str, member: str) -> None:
        task = asyncio.ensure_future(self._client.zrem(key, member))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _call(self, keys: list[str], args: list[int | str]) -> list[int]:
        try:  # the bare command with the script's SHA: ~10 µs leaner than ``Script``
            raw = await self._client.execute_command(  # type: ignore[no-untyped-call]
                "EVALSHA", self._acquire.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:  # first call, or Redis restarted
            raw = await self._acquire(keys=keys, args=args)
        return [int(used) for used in raw]

    async def _send(self) -> None:
        """Send what has queued, as one script call each time, until nothing is left."""
        while self._batch:
            batch, self._batch = self._batch, []
            keys = [key for entry in batch for key in entry[0]]
            args: list[int | str] = [self.ttl_ms]
            for _, limit, member, _ in batch:
                args += [limit, member]
            self._inflight = True
            try:
                with self._noting():
                    raw = await self._call(keys, args)
            except asyncio.CancelledError:
                for *_, future in batch:
                    future.cancel()
                raise
            except Exception as exc:  # Redis unreachable, mostly: each caller gets it
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            finally:
                self._inflight = False
            for (*_, future), used in zip(batch, raw, strict=True):
                if not future.done():
                    future.set_result(int(used))

    async def release(self, gpu_id: str, member: str) -> None:
        """Give the slot back; when Redis is down, the entry expires within one TTL."""
        try:
            await self._client.zrem(self._key(gpu_id), member)
        except StoreUnreachable:
            self.failures += 1
            self.healthy = False
            log.warning("could not release a slot on %s; it expires within %.0f s",
                        gpu_id, self.ttl_ms / 1000)

    async def release_many(self, entries: list[tuple[str, str]]) -> None:
        """Give back many (gpu_id, member) entries in one round trip."""
        by_gpu: dict[str, list[str]] = {}
        for gpu_id, member in entries:
            by_gpu.setdefault(gpu_id, []).append(member)
        if len(by_gpu) == 1:  # one command: no pipeline object (~30 µs leaner)
            ((gpu_id, members),) = by_gpu.items()
            try:
                await self._client.zrem(self._key(gpu_id), *members)
            except StoreUnreachable:
                self.failures += 1
                self.healthy = False
                log.warning("could not release %d slots; they expire within %.0f s",
                            len(entries), self.ttl_ms / 1000)
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for gpu_id, members in by_gpu.items():
                    pipe.zrem(self._key(gpu_id), *members)
                await pipe.execute()
        except StoreUnreachable:
            self.failures += 1
            self.healthy = False
            log.warning("could not release %d slots; they expire within %.0f s",
                        len(entries), self.ttl_ms / 1000)

    async def renew(self, held: list[tuple[str, str]]) -> int:
        """Push back the expiry of ``held`` (gpu_id, member) pairs, putting back any that had
        vanished; returns how many had."""
        if not held:
            return 0
        keys = [self._key(gpu_id) for gpu_id, _ in held]
        with self._noting():
            return int(await self._renew(keys=keys,
                                         args=[self.ttl_ms, *[m for _, m in held]]))

    @contextlib.contextmanager
    def _noting(self) -> Iterator[None]:
        try:
            yield
        except StoreUnreachable:
            self.failures += 1
            self.healthy = False
            raise
        self.healthy = True

    async def in_use(self, gpu_id: str) -> int:
        """Slots in use on ``gpu_id`` across all replicas (expired entries dropped first)."""
        with unreachable("count slots"), self._noting():
            return int(await self._count(keys=[self._key(gpu_id)], args=[]))


class SlotHolder:
    """One replica's slots: unique member names, and the heartbeat that keeps them alive.

    Members are ``{replica}:{n}``, so a slot can be traced to the replica that holds it.
    """

    def __init__(self, slots: GlobalSlots, *, replica: str | None = None) -> None:
        self.slots = slots
        self.replica = replica or secrets.token_hex(4)
        self._ids = itertools.count(1)
        self._held: dict[str, str] = {}  # member -> gpu_id
        #: Redis failures counted when each entry was last known to be in Redis.
        self._seen: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None
        #: Entries a renewal found gone and put back (for logs and tests).
        self.revived = 0

    async def acquire(self, gpu_id: str, limit: int) -> str | None:
        """A member holding one slot on ``gpu_id``, or None when the GPU's slots are full."""
        member = f"{self.replica}:{next(self._ids)}"
        if await self.slots.try_acquire(gpu_id, member, limit, self.replica) is None:
            return None
        self._held[member] = gpu_id
        self._seen[member] = self.slots.failures
        return member

    def intact(self, member: str) -> bool:
        """Whether ``member``'s entry is surely still in Redis: no call has failed since it
        was last written. After a failure Redis may have restarted empty, so an entry is
        only trusted again once a renewal has written it back."""
        return self.slots.healthy and self._seen.get(member) == self.slots.failures

    async def release(self, member: str) -> None:
        self._seen.pop(member, None)
        gpu_id = self._held.pop(member, None)
        if gpu_id is not None:
            await self.slots.release(gpu_id, member)

    def forget(self, member: str) -> None:
        """``member``'s entry left Redis some other way (handed to another replica)."""
        self._seen.pop(member, None)
        self._held.pop(member, None)

    async def release_many(self, members: list[str]) -> None:
        """Give back many held slots in one round trip."""
        entries = [(self._held.pop(m), m) for m in members if m in self._held]
        for member in members:
            self._seen.pop(member, None)
        if entries:
            await self.slots.release_many(entries)

    @property
    def held(self) -> int:
        return len(self._held)

    async def heartbeat(self) -> None:
        """Renew every held slot once; a Redis outage is logged, and the next beat retries."""
        held = [(gpu_id, member) for member, gpu_id in self._held.items()]
        failures = self.slots.failures
        try:
            revived = await self.slots.renew(held)
        except StoreUnreachable as exc:
            log.warning("slot renewal failed (Redis unreachable): %s", exc)
            return
        if failures == self.slots.failures:  # written back with nothing failing meanwhile
            for _, member in held:
                if member in self._seen:
                    self._seen[member] = failures
        if revived:
            self.revived += revived
            log.warning("%d slot entries had vanished from Redis; put back", revived)

    def start(self) -> None:
        """Renew every third of the TTL until ``stop``."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._beat())

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.slots.ttl_ms / 3000)
            await self.heartbeat()

    async def stop(self) -> None:
        """Stop renewing and give back whatever is still held."""
        task, self._task = self._task, None
        await cancel_and_wait(task)
        for member in list(self._held):
            await self.release(member)
