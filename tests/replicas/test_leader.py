"""The leader lease and fenced cloud actions against a real redis-server."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from gpuctl.store.shared import CloudActions, LeaderLease


async def test_one_leader_among_racing_replicas(redis_client: aioredis.Redis) -> None:
    leases = [LeaderLease(redis_client, f"r{i}") for i in range(5)]
    won = await asyncio.gather(*[lease.step() for lease in leases])
    assert sum(won) == 1
    leader = leases[won.index(True)]
    assert await leader.holder() == (leader.replica, leader.fence)
    # Renewal keeps it; the others still lose.
    assert await leader.step()
    assert [await lease.step() for lease in leases if lease is not leader] == [False] * 4


async def test_a_dead_leader_is_succeeded_with_a_higher_fence(
        redis_client: aioredis.Redis) -> None:
    old = LeaderLease(redis_client, "old", lease_seconds=0.2)
    new = LeaderLease(redis_client, "new", lease_seconds=0.2)
    assert await old.step()
    assert not await new.step()
    await asyncio.sleep(0.25)  # old stops renewing (it "died")
    assert await new.step()
    assert new.fence > old.fence
    # The old leader comes back from a stall: its compare-and-extend fails, it is deposed.
    assert not await old.step()
    assert not old.is_leader


async def test_resign_hands_over_at_once(redis_client: aioredis.Redis) -> None:
    a, b = LeaderLease(redis_client, "a"), LeaderLease(redis_client, "b")
    assert await a.step()
    await a.resign()
    assert await b.step()


async def test_a_resume_in_flight_is_claimed_once_and_adopted_not_repeated(
        redis_client: aioredis.Redis) -> None:
    actions = CloudActions(redis_client)
    old = LeaderLease(redis_client, "old", lease_seconds=0.2)
    assert await old.step()
    assert await actions.begin(old.value, "gpu-a", "resume", 100.0, old.fence)
    # Asking again for the same GPU (a second wanted record, a retry) is refused.
    assert not await actions.begin(old.value, "gpu-a", "resume", 101.0, old.fence)
    await asyncio.sleep(0.25)  # the leader dies mid-resume
    new = LeaderLease(redis_client, "new", lease_seconds=0.2)
    assert await new.step()
    pending = await actions.in_flight()
    assert pending["gpu-a"].action == "resume"
    assert pending["gpu-a"].fence == old.fence  # the successor knows whose it was: adopts
    assert not await actions.begin(new.value, "gpu-a", "resume", 102.0, new.fence)
    # The deposed leader can neither claim nor close anything any more.
    assert not await actions.begin(old.value, "gpu-b", "resume", 103.0, old.fence)
    assert not await actions.end(old.value, "gpu-a")
    assert await actions.end(new.value, "gpu-a")
    assert await actions.in_flight() == {}


async def test_followers_wanted_wakes_reach_the_leader_once_per_model(
        redis_client: aioredis.Redis) -> None:
    actions = CloudActions(redis_client)
    await asyncio.gather(*[actions.want("llama3:latest") for _ in range(20)],
                         actions.want("qwen2:7b"))
    assert sorted(await actions.wanted()) == ["llama3:latest", "qwen2:7b"]


async def test_a_wanted_wake_carries_its_cause_and_falls_back_to_the_gateway(
        redis_client: aioredis.Redis) -> None:
    actions = CloudActions(redis_client)
    await actions.want("gpu-a", "hand")
    await actions.want("gpu-b")
    assert await actions.wanted() == {"gpu-a": "hand", "gpu-b": "gateway"}
    await actions.want("gpu-a", "gateway")  # asked again, for requests: the last word
    assert (await actions.wanted())["gpu-a"] == "gateway"
    await redis_client.delete(actions.causes_key)  # the causes lost, the wants kept
    assert await actions.wanted() == {"gpu-a": "gateway", "gpu-b": "gateway"}
