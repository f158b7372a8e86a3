"""Keys shared through Redis: a revocation reaches every replica within a second; the CLI
finds a key made on another host."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gpuctl.errors import NotFoundError
from gpuctl.store import Store
from gpuctl.store.keys import KeyStore
from gpuctl.store.shared import SharedKeys, connect
from gpuctl.store.shared.budgets import SharedBudgets
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


def test_the_cli_budgets_and_revokes_a_key_made_on_another_host(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """``gpuctl keys budget`` and ``revoke`` on a host whose table lacks the key (made on
    another host) find it in the shared directory; the budget goes to Redis for every
    replica, then to this host's store."""
    def gpuctl(host: str, *args: str) -> subprocess.CompletedProcess[str]:
        environ = {**os.environ, "GPUCTL_STORE__URL": redis_server.url,
                   "GPUCTL_PATHS__STATE_DIR": str(tmp_path / host)}
        return subprocess.run([sys.executable, "-m", "gpuctl", *args], env=environ,
                              capture_output=True, text=True, timeout=60, check=False)

    # A command that only reads publishes nothing: host b's own table stays its own.
    local = KeyStore.open(tmp_path / "b")
    local.create("dave")
    local.close()
    listed = gpuctl("b", "keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [k["name"] for k in json.loads(listed.stdout)] == ["dave"]
    assert asyncio.run(_shared_key_count(redis_server.url)) == 0
    made = gpuctl("a", "keys", "create", "--name", "carol", "--json")
    assert made.returncode == 0, made.stderr
    key_id = json.loads(made.stdout)["id"]
    budget = gpuctl("b", "keys", "budget", key_id, "--gpu-hours", "2", "--per", "week")
    assert budget.returncode == 0, budget.stderr
    shared = asyncio.run(_shared_budgets(redis_server.url))
    assert shared == {key_id: (7200.0, "week")}
    store = Store.open(tmp_path / "b")
    try:
        assert store.ledger.budgets() == {key_id: (7200.0, "week")}
    finally:
        store.close()
    revoked = gpuctl("b", "keys", "revoke", key_id)
    assert revoked.returncode == 0, revoked.stderr
    assert "carol" in revoked.stdout + revoked.stderr
    unknown = gpuctl("b", "keys", "budget", "key_nothere", "--none")
    assert unknown.returncode != 0 and "no key with id" in unknown.stderr


async def _shared_budgets(url: str) -> dict[str, tuple[float, str] | None] | None:
    client = connect(url)
    try:
        return await SharedBudgets(client).read()
    finally:
        await client.aclose()


async def _shared_key_count(url: str) -> int:
    client = connect(url)
    try:
        return int(await client.hlen(SharedKeys(client).key))
    finally:
        await client.aclose()
