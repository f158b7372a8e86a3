"""Budgets shared through a real redis-server: set on one host, every replica's store and
engine has it within a sync; a removal reaches all of them; Redis restarted empty gets the
budgets back from the stores, and loses none of them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gpuctl.config import Config
from gpuctl.engine import Engine, FakeClock
from gpuctl.engine.sharing import SharedState
from gpuctl.sim.cloud import SimCloud
from gpuctl.store import Store
from gpuctl.store.shared import LeaderLease
from gpuctl.store.shared.budgets import SharedBudgets

DAY = (3600.0, "day")


async def test_a_later_change_wins_and_a_removal_is_kept(
        redis_client: aioredis.Redis) -> None:
    writer, reader = SharedBudgets(redis_client), SharedBudgets(redis_client)
    assert await reader.read() == {}
    assert await reader.read() is None  # nothing changed since
    assert await writer.set("key_ann", DAY, at=100.0)
    assert await writer.set("key_bob", (60.0, "week"), at=100.0)
    assert await reader.read() == {"key_ann": DAY, "key_bob": (60.0, "week")}
    # A host whose clock is behind cannot undo a later change.
    assert not await writer.set("key_ann", (1.0, "day"), at=99.0)
    assert await reader.read() is None
    assert await writer.set("key_ann", None, at=101.0)  # removed: kept as a removal
    assert await reader.read() == {"key_ann": None, "key_bob": (60.0, "week")}


async def test_seeding_adds_what_redis_lacks_and_never_overwrites(
        redis_client: aioredis.Redis) -> None:
    shared = SharedBudgets(redis_client)
    await shared.set("key_ann", None, at=100.0)
    added = await shared.seed({"key_ann": DAY, "key_bob": (60.0, "week")})
    assert added == 1
    assert await SharedBudgets(redis_client).read() == {"key_ann": None,
                                                        "key_bob": (60.0, "week")}
    # A seeded budget is older than any change made since, however skewed the clock.
    assert await shared.set("key_bob", (1.0, "day"), at=1.0)


async def test_records_no_gpuctl_writes_are_ignored(redis_client: aioredis.Redis) -> None:
    shared = SharedBudgets(redis_client)
    await redis_client.hset(shared.key, mapping={
        "key_a": "not json", "key_b": '{"gpu_seconds": "lots", "per": "day"}',
        "key_c": '{"gpu_seconds": -5, "per": "day"}', "key_d": "[1, 2]",
        "key_e": '{"gpu_seconds": 1e400, "per": "day"}',
        "key_f": '{"gpu_seconds": 60, "per": "day", "at": 1}'})
    assert await shared.read() == {"key_f": (60.0, "day")}
    # A later write over a broken record still lands.
    assert await shared.set("key_a", DAY, at=5.0)
    assert (await shared.read() or {})["key_a"] == DAY


def _config() -> Config:
    return Config.model_validate({"gpu": {"slots": 2},
                                  "timing": {"poll_interval_seconds": 5}})


@pytest.fixture
async def engines(tmp_path: Path) -> AsyncIterator[list[Engine]]:
    clock = FakeClock()
    cloud = SimCloud(clock, resume_seconds=20, pause_seconds=10, ollama_seconds=2)
    cloud.add("gpu-a", models=["llama3.2:latest"])
    stores = [Store.open(tmp_path / f"host-{i}") for i in range(2)]
    made = [Engine(_config(), cloud, s, clock=clock, nodes=cloud.node) for s in stores]
    try:
        for engine in made:
            await engine.start()
        yield made
    finally:
        for engine in made:
            await engine.stop()
        for store in stores:
            store.close()


async def test_every_replica_takes_the_groups_budgets_into_its_store_and_engine(
        redis_client: aioredis.Redis, engines: list[Engine]) -> None:
    here, there = (SharedState(e, redis_client, LeaderLease(redis_client, f"r{i}"))
                   for i, e in enumerate(engines))
    # Host 0 had a budget before the group shared them: the first sync seeds Redis with it.
    engines[0].store.ledger.set_budget("key_ann", *DAY)
    await here.sync_budgets()
    await there.sync_budgets()
    for engine in engines:
        assert engine.store.ledger.budgets() == {"key_ann": DAY}
        assert engine.budget_remaining("key_ann") == pytest.approx(3600.0)
    # ``gpuctl keys budget`` on host 1: Redis, then its own store; host 0 follows.
    shared = SharedBudgets(redis_client)
    assert await shared.set("key_bob", (0.0, "week"), at=1e9)
    engines[1].store.ledger.set_budget("key_bob", 0.0, "week")
    assert await shared.set("key_ann", None, at=1e9)
    engines[1].store.ledger.set_budget("key_ann", None)
    for share in (here, there):
        await share.sync_budgets()
    for engine in engines:
        assert engine.store.ledger.budgets() == {"key_bob": (0.0, "week")}
        assert engine.budget_remaining("key_ann") is None  # at once, not in 30 s
        assert engine.budget_remaining("key_bob") == 0.0
    # Redis restarted empty: no store loses a budget; the next sync puts them back.
    await redis_client.flushall()
    await there.sync_budgets()
    await here.sync_budgets()
    assert await SharedBudgets(redis_client).read() == {"key_bob": (0.0, "week")}
    for engine in engines:
        assert engine.store.ledger.budgets() == {"key_bob": (0.0, "week")}
        assert engine.budget_remaining("key_bob") == 0.0
