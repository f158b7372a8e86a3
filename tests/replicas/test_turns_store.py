"""The turn registry (``store.shared.turns``) against a real redis-server."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from gpuctl.store.shared import GlobalSlots, Passed, SlotHolder, SlotTurns, turns
from gpuctl.store.shared.turns import TurnNews

GPU = "gpu-a"


def _replica(client: aioredis.Redis, name: str) -> tuple[SlotHolder, SlotTurns]:
    slots = GlobalSlots(client)
    return SlotHolder(slots, replica=name), SlotTurns(slots, client, name)


async def test_a_freed_slot_goes_round_the_waiting_replicas_in_turn(
        redis_client: aioredis.Redis) -> None:
    (h1, t1), (h2, t2), (h3, t3) = (_replica(redis_client, n) for n in ("r1", "r2", "r3"))
    held = [await h1.acquire(GPU, 2), await h1.acquire(GPU, 2)]
    assert None not in held
    for t in (t2, t3):
        await t.sync({GPU: (True, {})})  # r2 and r3 have requests waiting for the GPU
    # r1 has none: its first slot goes to r2, who waited longest, as a reservation.
    assert await t1.pass_on(GPU, str(held[0]), waiting_here=False) is Passed.HANDED
    assert await h3.acquire(GPU, 2) is None  # the reservation counts: r3 cannot take it
    r2_slot = await h2.acquire(GPU, 2)  # r2 claims it, though the GPU is full
    assert r2_slot is not None
    # r1 now waits too, and has its turn only after r3's.
    await t1.sync({GPU: (True, {})})
    assert await t1.pass_on(GPU, str(held[1]), waiting_here=True) is Passed.HANDED
    assert (await t3.sync({GPU: (True, {})}))[GPU].handed == 1
    r3_slot = await h3.acquire(GPU, 2)
    assert r3_slot is not None
    # r2's last turn came before r1 started waiting: r2 keeps the slot it frees; then r1.
    assert await t2.pass_on(GPU, r2_slot, waiting_here=True) is Passed.KEPT
    assert await t3.pass_on(GPU, r3_slot, waiting_here=True) is Passed.HANDED
    assert await h1.acquire(GPU, 2) is not None


async def test_a_replica_alone_keeps_its_slot_and_nobody_waiting_frees_it(
        redis_client: aioredis.Redis) -> None:
    holder, mine = _replica(redis_client, "r1")
    member = await holder.acquire(GPU, 1)
    assert member is not None
    assert await mine.pass_on(GPU, member, waiting_here=True) is Passed.KEPT
    assert await holder.slots.in_use(GPU) == 1
    assert await mine.pass_on(GPU, member, waiting_here=False) is Passed.FREED
    assert await holder.slots.in_use(GPU) == 0


async def test_a_dead_replicas_place_in_line_and_counts_vanish(
        redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turns, "LIVE_MS", 200)
    (h1, t1), (_, dead) = _replica(redis_client, "r1"), _replica(redis_client, "dead")
    await dead.sync({GPU: (True, {"bob": 2})})
    seen = (await t1.sync({GPU: (False, {"alice": 1})}))[GPU]
    assert (seen.others_waiting, seen.users) == (1, {"bob": 2})
    await asyncio.sleep(0.25)  # Redis's clock: the dead replica stopped syncing
    seen = (await t1.sync({GPU: (False, {"alice": 1})}))[GPU]
    assert (seen.others_waiting, seen.users) == (0, {})
    member = await h1.acquire(GPU, 1)
    assert member is not None
    assert await t1.pass_on(GPU, member, waiting_here=False) is Passed.FREED


async def test_a_slot_handed_to_a_replica_that_never_claims_it_comes_back(
        redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turns, "HAND_MS", 200)
    (h1, t1), (_, t2) = _replica(redis_client, "r1"), _replica(redis_client, "r2")
    member = await h1.acquire(GPU, 1)
    assert member is not None
    await t2.sync({GPU: (True, {})})
    assert await t1.pass_on(GPU, member, waiting_here=False) is Passed.HANDED
    assert await h1.acquire(GPU, 1) is None
    await asyncio.sleep(0.25)
    assert await h1.acquire(GPU, 1) is not None


async def test_news_of_a_wait_and_a_hand_reach_the_channel(
        redis_client: aioredis.Redis) -> None:
    (h1, t1), (_, t2) = _replica(redis_client, "r1"), _replica(redis_client, "r2")
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(t1.channel)
    try:
        member = await h1.acquire(GPU, 1)
        assert member is not None
        await t2.sync({GPU: (True, {})})
        await t2.sync({GPU: (True, {})})  # still waiting: no second "wait"
        await t1.pass_on(GPU, member, waiting_here=False)
        news = []
        for _ in range(50):
            message = await pubsub.get_message(timeout=0.1)
            if message is not None:
                news.append(t1.parse(message["data"]))
            if len(news) == 2:
                break
        assert news == [TurnNews("wait", GPU, "r2"), TurnNews("hand", GPU, "r2")]
        assert t1.parse(b"nonsense") is None
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
