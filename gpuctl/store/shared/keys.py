"""API keys shared by every replica; a revocation reaches each of them within a second.

``{ns}:keys`` maps a key's SHA-256 hash to its record (``ApiKey`` as JSON: never the
secret). Every change increments ``{ns}:keys:version``. Each replica answers
``authenticate`` from memory (the hot path makes no round trip) and runs ``sync`` in the
background every ``SYNC_SECONDS``: one ``GET`` of the version, and a reload only when it
moved. So a key revoked on one replica is refused by all of them within ``SYNC_SECONDS``
plus one round trip. When Redis is unreachable the last loaded keys keep answering (a
revocation made meanwhile is not lost: it lands in Redis when the revoking side can write
it, and every replica sees it at its next sync after that).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time

import redis.asyncio as aioredis

from gpuctl.errors import NotFoundError
from gpuctl.store.keys import KEY_PREFIX, ApiKey, KeyStore, hash_key
from gpuctl.store.shared.connect import StoreUnreachable, text, unreachable
from gpuctl.tasks import cancel_and_wait

__all__ = ["SYNC_SECONDS", "ReplicaKeys", "SharedKeys"]

log = logging.getLogger(__name__)

#: How often a replica checks for changed keys: the bound on a revocation's delay.
SYNC_SECONDS = 0.5

_REVOKE = """
local hash = redis.call('HGET', KEYS[3], ARGV[1])
if not hash then return nil end
local record = redis.call('HGET', KEYS[1], hash)
if not record then return nil end
local key = cjson.decode(record)
if key['revoked'] == cjson.null or key['revoked'] == nil then
    key['revoked'] = tonumber(ARGV[2])
    record = cjson.encode(key)
    redis.call('HSET', KEYS[1], hash, record)
    redis.call('INCR', KEYS[2])
end
return record
"""


_PUBLISH = """
local changed = 0
for i = 1, #ARGV, 3 do
    local hash, record, id = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    local old = redis.call('HGET', KEYS[1], hash)
    local keep = false
    if old then
        local was = cjson.decode(old)
        local now = cjson.decode(record)
        if old == record or (was['revoked'] ~= cjson.null and now['revoked'] == cjson.null) then
            keep = true
        end
    end
    if not keep then
        redis.call('HSET', KEYS[1], hash, record)
        redis.call('HSET', KEYS[3], id, hash)
        changed = changed + 1
    end
end
if changed > 0 then redis.call('INCR', KEYS[2]) end
return changed
"""


class SharedKeys:
    """The replicas' key directory in Redis, with an in-memory copy for the hot path."""

    def __init__(self, client: aioredis.Redis, *, namespace: str = "gpuctl") -> None:
        self._client = client
        self.key = f"{namespace}:keys"
        self.version_key = f"{namespace}:keys:version"
        self.ids_key = f"{namespace}:keys:ids"  # key id -> hash, for revoke by id
        self._revoke = client.register_script(_REVOKE)
        self._publish = client.register_script(_PUBLISH)
        self._version: str | None = None
        self._by_hash: dict[str, ApiKey] = {}
        self._hash_of: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None
        #: This host's key table, published again if Redis comes back empty.
        self.local: KeyStore | None = None

    # -- administration ------------------------------------------------------------------

    async def add(self, key: ApiKey, key_hash: str) -> None:
        """Publish a key (by hash) to every replica."""
        with unreachable("store a key"):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.hset(self.key, key_hash, key.model_dump_json())
                pipe.hset(self.ids_key, key.id, key_hash)
                pipe.incr(self.version_key)
                await pipe.execute()

    async def publish(self, keys: list[tuple[ApiKey, str]]) -> int:
        """Merge a local key table (records and hashes) into the shared one; how many
        changed. A revocation is never undone: a key revoked in Redis stays revoked even
        if a host's table still has it active."""
        args: list[str] = []
        for key, key_hash in keys:
            args += [key_hash, key.model_dump_json(exclude={"last_used"}), key.id]
        if not args:
            return 0
        with unreachable("publish the keys"):
            return int(await self._publish(keys=[self.key, self.version_key, self.ids_key],
                                           args=args))

    async def create(self, name: str, *, email: str = "", admin: bool = False,
                     ) -> tuple[ApiKey, str]:
        """Make a key; the secret is returned once and stored only as its hash."""
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(id="key_" + secrets.token_hex(4), name=name.strip(), email=email.strip(),
                     role="admin" if admin else "user", created=time.time())
        await self.add(key, hash_key(secret))
        return key, secret

    async def get(self, key_id: str) -> ApiKey | None:
        """The shared record of ``key_id`` (made on any host), or None."""
        with unreachable("read a key"):
            key_hash = await self._client.hget(self.ids_key, key_id)
            raw = None if key_hash is None else await self._client.hget(self.key, key_hash)
        return None if raw is None else ApiKey.model_validate_json(raw)

    async def revoke(self, key_id: str) -> ApiKey:
        """Revoke by id (atomically in Redis; revoking twice keeps the first time)."""
        with unreachable("revoke a key"):
            raw = await self._revoke(keys=[self.key, self.version_key, self.ids_key],
                                     args=[key_id, time.time()])
        if raw is None:
            raise NotFoundError(f"no key with id {key_id!r}")
        return ApiKey.model_validate_json(raw)

    # -- the hot path ----------------------------------------------------------------------

    def authenticate(self, secret: str) -> ApiKey | None:
        """The active key for ``secret`` from memory, or None. No round trip."""
        digest = hash_key(secret)
        key = self._by_hash.get(digest)
        if key is None:
            return None
        # The dict lookup found the candidate; the constant-time compare is the decision.
        if not hmac.compare_digest(self._hash_of.get(key.id, ""), digest):
            return None
        return key

    async def sync(self) -> bool:
        """Reload the keys if any changed since the last sync; True when reloaded."""
        raw_version = await self._client.get(self.version_key)
        if raw_version is None and self._version is not None:
            # Redis lost its data (restarted without persistence): keep answering from the
            # keys we have, and put this host's table back for everyone.
            if self.local is not None:
                await self.publish(self.local.hashed())
            return False
        version = "0" if raw_version is None else text(raw_version)
        if version == self._version and self._version is not None:
            return False
        raw = await self._client.hgetall(self.key)
        loaded = {text(h): ApiKey.model_validate_json(v) for h, v in raw.items()}
        self._by_hash = {h: k for h, k in loaded.items() if k.active}
        self._hash_of = {k.id: h for h, k in self._by_hash.items()}
        self._version = version
        return True

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.sync()
            except StoreUnreachable as exc:
                log.warning("key sync failed (Redis unreachable); keeping the last keys: %s",
                            exc)
            await asyncio.sleep(SYNC_SECONDS)

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)


class ReplicaKeys(KeyStore):
    """A replica's keys: its own key table (``last_used``, ``keys list``), answering
    ``authenticate`` from the shared directory, so a key revoked anywhere is refused here
    within ``SYNC_SECONDS``."""

    shared: SharedKeys | None = None

    def attach(self, shared: SharedKeys) -> None:
        self.shared = shared
        shared.local = self

    def authenticate(self, secret: str) -> ApiKey | None:
        if self.shared is None:
            return super().authenticate(secret)
        return self.shared.authenticate(secret)
