"""The shared leases, journal and ledger against a real redis-server, on engines with a fake
clock: what one replica learns (a resume time, a model list, a request row) every replica
has; folding twice keeps one row; the group's ledger still conserves every billed second."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuctl.config import Config
from gpuctl.engine import Engine, FakeClock, Ticket
from gpuctl.engine.attribution import attribute
from gpuctl.engine.sharing import SharedState
from gpuctl.errors import Unavailable
from gpuctl.sim.cloud import SimCloud
from gpuctl.store import LeaseRecord, RequestRow, Store, TimelineEvent
from gpuctl.store.shared import LeaderLease, connect
from gpuctl.store.shared.journal import Journal
from gpuctl.store.shared.leases import SharedLeases
from gpuctl.store.shared.ledger import LedgerShare

from .redis_server import RedisServer


def _config() -> Config:
    return Config.model_validate({
        "server": {"max_queue": 1000, "queue_timeout_seconds": 300},
        "gpu": {"slots": 2},
        "timing": {"reservation_minutes": 1, "fallback_reservation_minutes": 0.5,
                   "startup_timeout_seconds": 100, "ollama_readiness_wait_seconds": 30,
                   "poll_interval_seconds": 5},
    })


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[list[Store]]:
    opened = [Store.open(tmp_path / f"replica-{i}") for i in range(2)]
    try:
        yield opened
    finally:
        for store in opened:
            store.close()


async def _drain(share: LedgerShare) -> None:
    """Fold in everything the journal has (the replica loop does it over its rounds)."""
    await share.fold()
    while share.behind:
        await share.fold()


# -- leases ----------------------------------------------------------------------------------


async def test_shared_leases_merge_to_the_later_end_and_drop_ended_ones(
        redis_client: aioredis.Redis) -> None:
    a, b = SharedLeases(redis_client), SharedLeases(redis_client)
    t = time.time()  # the hash expires with its last lease, on Redis's clock
    await a.publish([LeaseRecord("gpu-1", "ann", t + 100, 600.0),
                     LeaseRecord("gpu-1", "bob", t + 50, 180.0)], now=t)
    # Another replica renews ann's lease earlier than a has it: a's later end stays.
    await b.publish([LeaseRecord("gpu-1", "ann", t + 90, 600.0)], now=t)
    assert sorted(await b.read(["gpu-1", "gpu-2"], now=t) or [], key=lambda r: r.user) == [
        LeaseRecord("gpu-1", "ann", t + 100, 600.0), LeaseRecord("gpu-1", "bob", t + 50, 180.0)]
    await b.publish([LeaseRecord("gpu-1", "ann", t + 200, 600.0)], now=t + 60)
    # At t + 60 bob's lease has ended: not read, and dropped from the hash on the write.
    assert await a.read(["gpu-1"], now=t + 60) == [LeaseRecord("gpu-1", "ann", t + 200, 600.0)]
    assert await redis_client.hkeys("gpuctl:leases:gpu-1") == [b"ann"]
    # Read again with nothing changed: no hashes sent (None), even after a publish that
    # changed nothing (an earlier end); a change, or other GPUs asked for, reads them all.
    assert await a.read(["gpu-1"], now=t + 60) is None
    await b.publish([LeaseRecord("gpu-1", "ann", t + 150, 600.0)], now=t + 60)
    assert await a.read(["gpu-1"], now=t + 60) is None
    assert await a.read(["gpu-1", "gpu-2"], now=t + 60) == [
        LeaseRecord("gpu-1", "ann", t + 200, 600.0)]
    await b.publish([LeaseRecord("gpu-2", "cat", t + 70, 60.0)], now=t + 60)
    assert await a.read(["gpu-1", "gpu-2"], now=t + 60) == [
        LeaseRecord("gpu-1", "ann", t + 200, 600.0), LeaseRecord("gpu-2", "cat", t + 70, 60.0)]
    assert 190 < await redis_client.ttl("gpuctl:leases:gpu-1") <= 201


async def test_malformed_or_endless_leases_in_redis_cannot_keep_a_gpu_up(
        redis_client: aioredis.Redis, tmp_path: Path) -> None:
    """A broken (or hostile) writer of the lease hashes: garbage is skipped, and an end far
    in the future counts as one full lease from now, no more."""
    clock = FakeClock()
    cloud = SimCloud(clock, resume_seconds=20, pause_seconds=10, ollama_seconds=2)
    gpu = cloud.add("gpu-a", status="running", models=["llama3.2:latest"]).id
    await redis_client.hset(f"gpuctl:leases:{gpu}", mapping={
        "eve": "not a number", "mallory": "1e300 1e300", "nan": "nan 60", "trudy": "5"})
    found = await SharedLeases(redis_client).read([gpu], now=clock.wall())
    assert found is not None
    assert [(r.user, r.expires_at) for r in found] == [("mallory", 1e300)]
    store = Store.open(tmp_path)
    engine = Engine(_config(), cloud, store, clock=clock, nodes=cloud.node)
    await engine.start()
    try:
        assert engine.merge_leases(found) == 1
        (lease,) = engine.lease_records()
        assert lease.expires_at == pytest.approx(clock.wall() + 60)  # reservation: 1 min
        await clock.advance(90, step=5)
        assert cloud.pause_calls == {gpu: 1}
    finally:
        await engine.stop()
        store.close()


async def test_a_follower_engine_keeps_a_gpu_another_replica_leases(tmp_path: Path) -> None:
    """The engine side of a shared lease: merged in, it keeps the GPU from idle pause and
    makes the leased GPU the holder's first choice here too."""
    clock = FakeClock()
    cloud = SimCloud(clock, resume_seconds=20, pause_seconds=10, ollama_seconds=2)
    a = cloud.add("gpu-a", status="running", models=["llama3.2:latest"]).id
    b = cloud.add("gpu-b", status="running", models=["llama3.2:latest"]).id
    store = Store.open(tmp_path)
    engine = Engine(_config(), cloud, store, clock=clock, nodes=cloud.node)
    await engine.start()
    try:
        await clock.advance(40, step=5)
        wall = clock.wall()
        assert engine.merge_leases([LeaseRecord(b, "ann", wall + 60, 60.0)]) == 1
        # Merging the same (or an earlier) end again is no change.
        assert engine.merge_leases([LeaseRecord(b, "ann", wall + 30, 60.0)]) == 0
        await clock.advance(40, step=5)  # grace (1 min) over: gpu-a goes, gpu-b is held
        assert cloud.pause_calls == {a: 1}
        ticket = await engine.acquire("llama3.2", "ann")
        assert ticket.gpu_id == b
        engine.release(ticket)
        assert {(r.gpu_id, r.user) for r in engine.lease_records()} == {(b, "ann")}
        await clock.advance(120, step=5)  # ann's last request + 60 s: now it goes too
        assert cloud.pause_calls == {a: 1, b: 1}
    finally:
        await engine.stop()
        store.close()


# -- the ledger and learnt facts ---------------------------------------------------------------


def _row(at: float, user: str) -> RequestRow:
    return RequestRow(at=at, key_id="key_" + user, user=user, route="/api/chat",
                      model="llama3.2", gpu_id="gpu-a", status=200, served_at=at,
                      service_s=2.0, lease_s=60.0, tokens_out=7)


async def test_rows_published_by_one_store_are_folded_once_into_the_other(
        redis_client: aioredis.Redis, stores: list[Store]) -> None:
    a, b = (LedgerShare(s, Journal(redis_client)) for s in stores)
    stores[0].ledger.add_request(_row(100.0, "ann"))
    stores[0].ledger.add_event(TimelineEvent("gpu-a", 90.0, "ready", "observed", "A10"))
    stores[1].ledger.add_request(_row(101.0, "bob"))
    assert await a.publish() == 2
    assert await b.publish() == 1
    assert await a.publish() == 0  # stamped: never sent twice
    assert await b.fold() == 2 and await a.fold() == 1
    assert await b.fold() == 0  # its own row comes back in the stream: skipped
    for store in stores:
        assert [(r.user, r.tokens_out) for r in store.requests(0, math.inf)] == [
            ("ann", 7), ("bob", 7)]
        assert [e.status for e in store.ledger.timeline(math.inf)] == ["ready"]
    # The users' totals (``gpuctl keys list``) count the requests folded in (a store's own
    # come from its engine's release, which these rows, written directly, did not pass).
    assert {u: (t.requests, t.tokens_out, t.gpu_seconds) for u, t in stores[0].usage().items()
            } == {"bob": (1, 7, 2.0)}
    assert {u: (t.requests, t.tokens_out, t.gpu_seconds) for u, t in stores[1].usage().items()
            } == {"ann": (1, 7, 2.0)}
    # The journal read again from the start (a lost read position): still one of each.
    stores[1].conn.execute("UPDATE replica_state SET value = '0-0' WHERE key = 'journal_read'")
    assert await b.fold() == 0
    assert len(stores[1].requests(0, math.inf)) == 2
    assert stores[1].usage()["ann"].requests == 1


async def test_entries_a_store_cannot_take_are_skipped_not_fatal(
        redis_client: aioredis.Redis, stores: list[Store]) -> None:
    """A broken or newer writer's entries: each is logged and skipped; the rows after them
    still arrive, and the read position moves past them (no replica stuck on one)."""
    journal = Journal(redis_client)
    share = LedgerShare(stores[1], journal)
    good = dataclasses.asdict(_row(300.0, "ann"))
    for fields in ({"o": "x", "d": "[not json"},
                   {"o": "x", "d": '{"a": "dict, not a list"}'},
                   {"o": "x", "d": '[[1, 2]]'},
                   {"garbage": "only"},
                   {"o": "x", "d": json.dumps([
                       ["1", "request", {"at": "soon"}],
                       ["2", "request", {**good, "tokens_out": 1.5}],
                       ["3", "event", []],
                       ["4", "resume", {"gpu": "g"}],
                       ["5", "load", {"model": "m", "seconds": float("nan"), "at": 1}],
                       ["6", "models", {"gpu": "g", "models": "all", "at": 1}],
                       ["7", "teleport", {}],
                       # Numbers JSON can carry but SQLite or a float cannot.
                       ["9", "request", {**good, "tokens_in": 10**30}],
                       ["10", "request", {**good, "duration_s": 10**400}],
                       ["11", "event", {"gpu_id": "g", "at": 10**400, "status": "ready",
                                        "cause": "observed", "flavour": "A10"}],
                       # Rows as lists in column order (what ``publish`` sends): one short.
                       ["12", "request", list(good.values())[:-1]],
                       ["13", "request", [301.0, *list(good.values())[1:]]],
                       ["8", "request", good]])}):
        await redis_client.xadd(journal.key, fields)  # type: ignore[arg-type]
    await _drain(share)
    assert share.folded == 2
    assert share.skipped == 11
    assert stores[1].resume_history() == {} and stores[1].load_history() == {}
    assert stores[1].known_models() == {}
    assert sorted(r.at for r in stores[1].requests(0, math.inf)) == [300.0, 301.0]
    assert await share.fold() == 0


async def test_rows_made_while_redis_is_down_go_out_when_it_is_back(
        redis_server: RedisServer, stores: list[Store]) -> None:
    client = connect(redis_server.url, timeout=0.3)
    try:
        a, b = (LedgerShare(s, Journal(client)) for s in stores)
        stores[0].ledger.add_request(_row(100.0, "ann"))
        assert await a.publish() == 1
        assert await b.fold() == 1
        redis_server.stop()
        stores[0].ledger.add_request(_row(200.0, "ann"))
        stores[0].record_resume("gpu-a", 42.0, ok=True, at=200.0)
        with pytest.raises(Unavailable):
            await a.publish()
        redis_server.start()  # empty: the journal and its epoch are gone
        assert await b.fold() == 0  # a new epoch: b starts reading it from the start
        assert await a.fold() == 0
        await a.publish()
        await _drain(b)
        assert [r.at for r in stores[1].requests(0, math.inf)] == [100.0, 200.0]
        assert stores[1].resume_history() == {"gpu-a": [(42.0, True)]}
    finally:
        await client.aclose()


async def test_a_followers_cold_estimate_uses_the_resume_time_the_leader_learnt(
        redis_client: aioredis.Redis, tmp_path: Path) -> None:
    clock = FakeClock()
    cloud = SimCloud(clock, resume_seconds=20, pause_seconds=10, ollama_seconds=2)
    gpu = cloud.add("gpu-a", models=["llama3.2:latest"]).id  # paused, never seen awake here
    leader_store, follower_store = Store.open(tmp_path / "a"), Store.open(tmp_path / "b")
    follower = Engine(_config(), cloud, follower_store, clock=clock, nodes=cloud.node)
    await follower.start()
    try:
        before = follower.gpu(gpu)
        assert before.models == [] and before.estimated_resume_seconds == 180.0  # default
        share = LedgerShare(leader_store, Journal(redis_client))
        leader_store.save_models(gpu, [{"name": "llama3.2:latest",
                                            "model": "llama3.2:latest"}], clock.wall())
        leader_store.record_resume(gpu, 42.0, ok=True, at=clock.wall())
        leader_store.record_load("llama3.2", 7.0, clock.wall())
        assert await share.publish() == 3
        assert await LedgerShare(follower_store, Journal(redis_client)).fold(follower) == 3
        after = follower.gpu(gpu)
        assert after.models == ["llama3.2:latest"]
        assert after.estimated_resume_seconds == 42.0
        assert follower_store.resume_history() == {gpu: [(42.0, True)]}
        assert follower_store.load_history() == {"llama3.2": [7.0]}
    finally:
        await follower.stop()
        leader_store.close()
        follower_store.close()


# -- two replicas, one ledger: the attribution invariant ----------------------------------------

USERS = ("ann", "bob")
Op = tuple[Any, ...]

operations = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.integers(0, 1), st.sampled_from(USERS),
                  st.sampled_from(("llama3.2", "qwen3:8b"))),
        st.tuples(st.just("complete"), st.integers(0, 99)),
        st.tuples(st.just("portal"), st.sampled_from(("gpu-a", "gpu-b"))),
        st.tuples(st.just("advance"), st.sampled_from([0.5, 3.0, 17.0, 45.0, 400.0])),
    ),
    max_size=30,
)


async def _two_replicas(ops: list[Op], cuts: list[float], redis_url: str,
                        tmp: Path) -> None:
    clock = FakeClock()
    cloud = SimCloud(clock, resume_seconds=20, pause_seconds=10, ollama_seconds=2)
    cloud.add("gpu-a", status="running", models=["llama3.2:latest", "qwen3:8b"])
    cloud.add("gpu-b", models=["llama3.2:latest"])
    stores = [Store.open(tmp / f"r{i}") for i in range(2)]
    engines = [Engine(_config(), cloud, s, clock=clock, nodes=cloud.node) for s in stores]
    # Replica 0 leads: it alone writes the timeline and pauses; replica 1 follows.
    engines[0].ledger.leading = lambda: True
    engines[1].ledger.leading = lambda: False
    engines[1].config.gpu.auto_pause = False
    start = clock.wall()
    for engine in engines:
        await engine.start()
    pending: list[tuple[Engine, asyncio.Task[Ticket], RequestRow]] = []
    held: list[tuple[Engine, Ticket, RequestRow]] = []
    for op in ops:
        if op[0] == "arrive":
            engine = engines[op[1]]
            row = engine.begin_request("key_" + op[2], op[2], "/api/chat", op[3])
            pending.append((engine, asyncio.ensure_future(
                engine.acquire(op[3], op[2], request=row)), row))
        elif op[0] == "complete" and held:
            engine, ticket, row = held.pop(op[1] % len(held))
            engine.release(ticket)
            engine.end_request(row, 200)
        elif op[0] == "portal" and cloud.find(op[1]).status == "paused":
            await cloud.resume(cloud.find(op[1]).id)
        elif op[0] == "advance":
            await clock.advance(op[1], step=1.0)
        await clock.settle()
        for item in [p for p in pending if p[1].done()]:
            pending.remove(item)
            engine, task, row = item
            if task.exception() is not None:
                engine.end_request(row, 503)
            else:
                held.append((engine, task.result(), row))
    for engine, ticket, row in held:
        engine.release(ticket)
        engine.end_request(row, 200)
    await clock.advance(200.0, step=1.0)
    for engine, task, row in pending:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        engine.end_request(row, 499)
    for engine in engines:
        await engine.stop()
    end = clock.wall()
    client = connect(redis_url)
    try:
        await client.flushall()  # one journal per example
        shares = [LedgerShare(s, Journal(client)) for s in stores]
        for share in shares:
            await share.publish()
        for share in shares:
            await _drain(share)
    finally:
        await client.aclose()
    results = []
    for store in stores:
        events = store.ledger.timeline(until=end + 1)
        requests = store.requests(0, end + 1)
        edges = sorted({start, end, *(start + c * (end - start) for c in cuts)})
        for a, b in itertools.pairwise(edges):
            result = attribute(events, requests, a, b)
            for gpu_id, billed in result.billed.items():
                shared = sum(s for k, s in result.shares.items() if k.gpu_id == gpu_id)
                assert shared == pytest.approx(billed, abs=1e-3), (gpu_id, a)
        results.append((len(requests), attribute(events, requests, start, end)))
        store.close()
    # Both stores hold the whole group's ledger, and attribute it alike.
    (count_0, whole_0), (count_1, whole_1) = results
    assert count_0 == count_1
    assert whole_0.billed == pytest.approx(whole_1.billed, abs=1e-6)
    assert whole_0.billed, "the GPU running from the start bills"


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=operations, cuts=st.lists(st.floats(0.01, 0.99), max_size=2))
def test_two_replicas_ledger_conserves_every_billed_second(
        redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory, ops: list[Op],
        cuts: list[float]) -> None:
    tmp = tmp_path_factory.mktemp("two")
    asyncio.run(_two_replicas(ops, cuts, redis_server.url, tmp))


async def test_a_new_leader_carries_on_the_old_leaders_timeline_without_repeating_it(
        redis_client: aioredis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Leadership moves: the successor folds the old leader's events in and takes the last
    one as its own, so the GPU's ``ready`` is not written twice and its idle pause is the
    successor's action; each status change once, in one store as in the other."""
    monkeypatch.setattr("gpuctl.engine.sharing.PUBLISH_SECONDS", 0.0)  # every step
    clock = FakeClock()
    cloud = SimCloud(clock, resume_seconds=20, pause_seconds=10, ollama_seconds=2)
    gpu = cloud.add("gpu-a", models=["llama3.2:latest"]).id
    stores = [Store.open(tmp_path / f"r{i}") for i in range(2)]
    stores[0].save_models(gpu, [{"name": "llama3.2:latest", "model": "llama3.2:latest"}], 0)
    engines = [Engine(_config(), cloud, s, clock=clock, nodes=cloud.node) for s in stores]
    leases = [LeaderLease(redis_client, f"r{i}", lease_seconds=60) for i in range(2)]
    sharing = [SharedState(e, redis_client, lease) for e, lease in zip(engines, leases,
                                                                        strict=True)]
    engines[1].config.gpu.auto_pause = False
    assert await leases[0].step() and not await leases[1].step()
    try:
        for engine in engines:
            await engine.start()
        for share in sharing:
            await share.step()
        row = engines[0].begin_request("key_ann", "ann", "/api/chat", "llama3.2")
        task = asyncio.ensure_future(engines[0].acquire("llama3.2", "ann", request=row))
        await clock.advance_until(task.done, limit=300, step=1)  # a wake, by r0
        ticket = task.result()
        engines[0].release(ticket)
        engines[0].end_request(row, 200)
        await clock.advance(10, step=5)
        await sharing[0].close()  # r0 stops (publishing what it has), r1 takes over
        await leases[0].resign()
        assert await leases[1].step()
        engines[1].config.gpu.auto_pause = True
        engines[0].config.gpu.auto_pause = False
        await sharing[1].step()
        await clock.advance(200, step=5)  # ann's lease (1 min) ends: r1 pauses the GPU
        await sharing[1].step()  # r1 publishes its pause...
        await sharing[0].step()  # ...and r0 folds it in
        assert cloud.pause_calls == {gpu: 1}
        timelines = [[(e.status, e.cause) for e in s.ledger.timeline(math.inf)]
                     for s in stores]
        assert timelines[0] == timelines[1]
        assert timelines[1] == [("paused", "outside"), ("resuming", "gateway"),
                                ("running", "observed"), ("ready", "observed"),
                                ("pausing", "gateway"), ("paused", "observed")]
    finally:
        for engine in engines:
            await engine.stop()
        for store in stores:
            store.close()


async def test_the_cost_counters_count_another_replicas_requests_that_arrive_late(
        redis_client: aioredis.Redis, tmp_path: Path) -> None:
    """``/metrics`` and budgets read the engine's running counters, which attribute each
    piece of time once: a replica's counters wait for the others' rows (folded seconds
    later) before they close the time those rows served in."""
    clock = FakeClock()
    cloud = SimCloud(clock, resume_seconds=20, pause_seconds=10, ollama_seconds=2)
    cloud.add("gpu-a", status="running", models=["llama3.2:latest"])
    stores = [Store.open(tmp_path / f"r{i}") for i in range(2)]
    engines = [Engine(_config(), cloud, s, clock=clock, nodes=cloud.node) for s in stores]
    lease = LeaderLease(redis_client, "r0")
    assert await lease.step()
    here = SharedState(engines[0], redis_client, lease)
    there = LedgerShare(stores[1], Journal(redis_client))
    try:
        for engine in engines:
            await engine.start()
        await clock.advance(20, step=5)
        row = engines[1].begin_request("key_bob", "bob", "/api/chat", "llama3.2")
        ticket = await engines[1].acquire("llama3.2", "bob", request=row)  # served there
        await clock.advance(4, step=1)
        engines[1].release(ticket)
        engines[1].end_request(row, 200)
        await clock.advance(6, step=1)  # a tick here has passed the request's end...
        await there.publish()
        await here.ledger.fold(engines[0])  # ...before its row arrives
        await clock.advance(30, step=5)
        users = engines[0].cost_metrics().users
        assert users[("bob", "serving")] == pytest.approx(4.0, abs=1e-3)
    finally:
        for engine in engines:
            await engine.stop()
        for store in stores:
            store.close()
