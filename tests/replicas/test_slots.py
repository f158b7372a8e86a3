"""Global slots against a real redis-server: exact under races, back after one TTL."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from gpuctl.errors import Unavailable
from gpuctl.store.shared import GlobalSlots, SlotHolder, connect

from .redis_server import RedisServer


async def test_racing_replicas_never_exceed_a_gpus_slots(redis_server: RedisServer) -> None:
    # Three replicas, each with its own connection, race 60 acquires for 4 slots.
    clients = [connect(redis_server.url) for _ in range(3)]
    try:
        holders = [SlotHolder(GlobalSlots(c), replica=f"r{i}") for i, c in enumerate(clients)]
        got = await asyncio.gather(*[holders[i % 3].acquire("gpu-a", 4) for i in range(60)])
        assert sum(m is not None for m in got) == 4
        assert await holders[0].slots.in_use("gpu-a") == 4
        # Giving one back lets exactly one more in, from any replica.
        first = next(m for m in got if m is not None)
        owner = holders[int(first.split(":")[0][1:])]
        await owner.release(first)
        again = await asyncio.gather(*[h.acquire("gpu-a", 4) for h in holders])
        assert sum(m is not None for m in again) == 1
    finally:
        for c in clients:
            await c.aclose()


async def test_slots_are_counted_per_gpu(redis_client: aioredis.Redis) -> None:
    holder = SlotHolder(GlobalSlots(redis_client))
    assert await holder.acquire("gpu-a", 1) is not None
    assert await holder.acquire("gpu-a", 1) is None
    assert await holder.acquire("gpu-b", 1) is not None


async def test_a_dead_replicas_slots_come_back_within_one_ttl(
        redis_client: aioredis.Redis) -> None:
    # The "dead" replica acquires and never renews; Redis's own clock expires its entries.
    dead = SlotHolder(GlobalSlots(redis_client, ttl_seconds=0.3), replica="dead")
    alive = SlotHolder(GlobalSlots(redis_client, ttl_seconds=0.3), replica="alive")
    assert await dead.acquire("gpu-a", 2) is not None
    assert await dead.acquire("gpu-a", 2) is not None
    assert await alive.acquire("gpu-a", 2) is None
    await asyncio.sleep(0.35)  # Redis's clock, not the engine's: the TTL is real time
    assert await alive.acquire("gpu-a", 2) is not None


async def test_a_heartbeat_keeps_held_slots_past_the_ttl(redis_client: aioredis.Redis) -> None:
    holder = SlotHolder(GlobalSlots(redis_client, ttl_seconds=0.3), replica="live")
    other = SlotHolder(GlobalSlots(redis_client, ttl_seconds=0.3), replica="other")
    assert await holder.acquire("gpu-a", 1) is not None
    for _ in range(4):  # 0.6 s in all: twice the TTL, renewed every 0.15 s
        await asyncio.sleep(0.15)
        await holder.heartbeat()
    assert await other.acquire("gpu-a", 1) is None
    assert holder.revived == 0


async def test_renewal_puts_back_entries_redis_lost_while_requests_run(
        redis_client: aioredis.Redis) -> None:
    holder = SlotHolder(GlobalSlots(redis_client))
    other = SlotHolder(GlobalSlots(redis_client), replica="other")
    assert await holder.acquire("gpu-a", 2) is not None
    assert await holder.acquire("gpu-a", 2) is not None
    await redis_client.flushall()  # Redis restarted empty: the running requests still hold
    await holder.heartbeat()
    assert holder.revived == 2
    assert await other.acquire("gpu-a", 2) is None


async def test_stop_gives_every_held_slot_back(redis_client: aioredis.Redis) -> None:
    holder = SlotHolder(GlobalSlots(redis_client))
    holder.start()
    for _ in range(3):
        assert await holder.acquire("gpu-a", 3) is not None
    await holder.stop()
    assert await holder.slots.in_use("gpu-a") == 0


async def test_redis_down_refuses_new_slots_with_503_and_recovers(
        redis_server: RedisServer) -> None:
    client = connect(redis_server.url, timeout=0.5)
    try:
        holder = SlotHolder(GlobalSlots(client))
        held = await holder.acquire("gpu-a", 2)
        assert held is not None
        redis_server.stop()
        with pytest.raises(Unavailable) as refused:
            await holder.acquire("gpu-a", 2)
        assert refused.value.retry_after > 0
        assert "unreachable" in str(refused.value)
        await holder.heartbeat()  # a renewal during the outage is logged, not raised
        await holder.release(held)  # likewise: the entry would expire by itself
        redis_server.start()  # same port, empty: the old entries are gone with it
        assert await holder.acquire("gpu-a", 2) is not None
    finally:
        await client.aclose()


async def test_an_entry_is_not_trusted_after_an_outage_until_written_back(
        redis_server: RedisServer) -> None:
    # A freed entry is handed to a local waiter only while it is surely still in Redis.
    client = connect(redis_server.url, timeout=0.5)
    try:
        holder = SlotHolder(GlobalSlots(client))
        member = await holder.acquire("gpu-a", 2)
        assert member is not None and holder.intact(member)
        redis_server.stop()
        with pytest.raises(Unavailable):
            await holder.acquire("gpu-a", 2)
        assert not holder.intact(member)
        redis_server.start()  # empty: the entry is gone
        assert not holder.intact(member)
        await holder.heartbeat()  # writes it back
        assert holder.intact(member)
        assert holder.revived == 1
        assert await holder.slots.in_use("gpu-a") == 1
    finally:
        await client.aclose()


async def _script_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
               for name in ("eval", "evalsha"))


async def test_a_burst_of_acquires_goes_to_redis_in_one_call_and_none_fails(
        redis_client: aioredis.Redis) -> None:
    holder = SlotHolder(GlobalSlots(redis_client), replica="burst")
    await holder.release(str(await holder.acquire("warm-up", 1)))  # the script is loaded
    before = await _script_calls(redis_client)
    got = await asyncio.gather(*[holder.acquire(f"gpu-{i % 3}", 50) for i in range(300)])
    calls = await _script_calls(redis_client) - before
    assert 1 <= calls <= 3, calls  # 300 acquires: a handful of round trips, not 300
    assert sum(m is not None for m in got) == 150  # 3 GPUs of 50 slots, exactly
    assert [await holder.slots.in_use(f"gpu-{i}") for i in range(3)] == [50, 50, 50]


async def test_an_acquire_cancelled_in_flight_leaves_no_entry_behind(
        redis_client: aioredis.Redis) -> None:
    holder = SlotHolder(GlobalSlots(redis_client), replica="gone")
    for _ in range(3):  # cancelled before the call is sent, while in flight, ...
        task = asyncio.ensure_future(holder.acquire("gpu-a", 4))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    for _ in range(100):  # the replies come back; the entries are given back
        if await holder.slots.in_use("gpu-a") == 0:
            break
        await asyncio.sleep(0.01)
    assert await holder.slots.in_use("gpu-a") == 0
    assert holder.held == 0
