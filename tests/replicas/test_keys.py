"""Keys shared through Redis: a revocation reaches every replica within a second."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gpuctl.errors import NotFoundError
from gpuctl.store.keys import KeyStore
from gpuctl.store.shared import SharedKeys, connect
from gpuctl.store.shared.keys import SYNC_SECONDS

from .redis_server import RedisServer


async def test_a_key_made_on_one_replica_works_on_the_others(
        redis_client: aioredis.Redis) -> None:
    one, two = SharedKeys(redis_client), SharedKeys(redis_client)
    key, secret = await one.create("alice")
    assert await two.sync()
    found = two.authenticate(secret)
    assert found is not None and found.id == key.id
    assert two.authenticate(secret + "x") is None
    assert not await two.sync()  # nothing changed: no reload
    raw = await redis_client.hgetall(one.key)
    assert secret.encode() not in b"".join(k + v for k, v in raw.items())  # only the hash


async def test_a_revocation_reaches_every_replica_within_a_second(
        redis_server: RedisServer) -> None:
    clients = [connect(redis_server.url) for _ in range(3)]
    replicas = [SharedKeys(c) for c in clients]
    try:
        _, secret = await replicas[0].create("bob")
        for r in replicas:
            r.start()
        await asyncio.sleep(SYNC_SECONDS * 2)
        assert all(r.authenticate(secret) is not None for r in replicas)
        loop = asyncio.get_running_loop()
        key_id = replicas[0].authenticate(secret).id  # type: ignore[union-attr]
        revoked_at = loop.time()
        await replicas[1].revoke(key_id)
        while any(r.authenticate(secret) is not None for r in replicas):
            assert loop.time() - revoked_at < 1.0, "a replica still accepts a revoked key"
            await asyncio.sleep(0.02)
    finally:
        for r in replicas:
            await r.stop()
        for c in clients:
            await c.aclose()


async def test_revoking_an_unknown_key_says_so(redis_client: aioredis.Redis) -> None:
    with pytest.raises(NotFoundError):
        await SharedKeys(redis_client).revoke("key_nothere")


async def test_revoking_twice_keeps_the_first_time(redis_client: aioredis.Redis) -> None:
    keys = SharedKeys(redis_client)
    key, _ = await keys.create("carol")
    first = await keys.revoke(key.id)
    second = await keys.revoke(key.id)
    assert first.revoked is not None and second.revoked == first.revoked


async def test_publishing_a_host_table_never_undoes_a_revocation(
        redis_client: aioredis.Redis, gpuctl_home: Path) -> None:
    local = KeyStore.open(gpuctl_home / "state")
    try:
        key, secret = local.create("dave")
        shared, other = SharedKeys(redis_client), SharedKeys(redis_client)
        assert await shared.publish(local.hashed()) == 1
        assert await shared.publish(local.hashed()) == 0  # unchanged: no reload anywhere
        await other.sync()
        assert other.authenticate(secret) is not None
        await other.revoke(key.id)
        # Another host whose table still has the key active publishes it again.
        await shared.publish(local.hashed())
        await other.sync()
        assert other.authenticate(secret) is None
    finally:
        local.close()
