"""Gateway processes sharing leases and the ledger through a real Redis: a lease held on one
replica keeps the GPU up on the leader; either replica's usage reports both; rows made while
Redis was down reach the others once it is back (even empty)."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import redis

from gpuctl.store import Store

from .gateways import SECRET, SECRET_ADMIN, Fleet, fleet, replicas, until, warm
from .redis_server import RedisServer

if TYPE_CHECKING:
    from conftest import GpuctlProcess  # tests/conftest.py

AUTH = {"Authorization": f"Bearer {SECRET}"}


def _chat(url: str, model: str) -> httpx.Response:
    return httpx.post(f"{url}/api/chat", headers=AUTH, timeout=60, json={
        "model": model, "stream": False, "messages": [{"role": "user", "content": "hi"}]})


def _leader_index(f: Fleet, redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        until(lambda: client.get("gpuctl:leader") is not None)
        raw = client.get("gpuctl:leader")
    finally:
        client.close()
    assert raw is not None
    pid = int(raw.decode().split("@")[0])
    return [p.pid for p in f.procs].index(pid)


def _requests_seen(url: str) -> int:
    reply = httpx.get(f"{url}/admin/usage", headers=AUTH, params={"since": "1h"}, timeout=30)
    assert reply.status_code == 200, reply.text
    return sum(int(row["requests"]) for row in reply.json()["rows"])


def test_usage_on_either_replica_reports_the_requests_of_both(
        redis_server: RedisServer, gpuctl_process: GpuctlProcess, tmp_path: Path) -> None:
    with fleet(1) as f:
        _, model = warm(f)
        with replicas(gpuctl_process, f, redis_server.url, tmp_path, 2):
            sent = [3, 2]
            for url, count in zip(f.urls, sent, strict=True):
                assert [_chat(url, model).status_code for _ in range(count)] == [200] * count
            until(lambda: [_requests_seen(u) for u in f.urls] == [sum(sent)] * 2, timeout=20)
            # Each row is kept once on each store, however often the journal is read.
            for i in range(2):
                store = Store.open(tmp_path / f"replica-{i}")
                try:
                    rows = store.requests(0, math.inf)
                finally:
                    store.close()
                assert len(rows) == sum(sent)


def test_a_lease_held_on_a_follower_keeps_the_leader_from_pausing_its_gpu(
        redis_server: RedisServer, gpuctl_process: GpuctlProcess, tmp_path: Path) -> None:
    lease_s = 9.0
    with fleet(1) as f:
        gpu_id, model = warm(f)
        with replicas(gpuctl_process, f, redis_server.url, tmp_path, 2, extra={
                "GPUCTL_TIMING__RESERVATION_MINUTES": str(lease_s / 60)}):
            follower = f.urls[1 - _leader_index(f, redis_server.url)]
            # The leader's grace for a GPU found running ends lease_s after its start; the
            # user's requests on the follower, the last one lease_s / 2 later, push the
            # lease past that: only a lease the leader sees from the follower keeps it up.
            assert _chat(follower, model).status_code == 200
            time.sleep(lease_s / 2)  # real processes: let the first lease be half over
            assert _chat(follower, model).status_code == 200
            client = redis.Redis.from_url(redis_server.url)
            try:
                def lease_end() -> float:
                    raw = client.hget(f"gpuctl:leases:{gpu_id}", "alice")
                    return float(raw.decode().split()[0]) if raw else 0.0

                until(lambda: lease_end() > time.time() + lease_s / 2, timeout=5)
                ends = lease_end()
            finally:
                client.close()
            until(lambda: f.sim.cloud.pause_calls[gpu_id] == 1, timeout=lease_s * 3)
            paused_at = time.time()
            # Paused by the leader, and not before the follower's user let go.
            assert paused_at >= ends, f"paused {ends - paused_at:.1f} s before the lease ended"
            assert f.sim.cloud.pause_calls[gpu_id] == 1


def test_rows_made_while_redis_was_down_reach_the_other_replica(
        redis_server: RedisServer, gpuctl_process: GpuctlProcess, tmp_path: Path) -> None:
    with fleet(1, chunks=30, interval=0.05) as f:
        gpu_id, model = warm(f)
        node = f.nodes[gpu_id]
        with replicas(gpuctl_process, f, redis_server.url, tmp_path, 2):
            assert _chat(f.urls[1], model).status_code == 200  # before: shared at once

            async def outage() -> tuple[int, list[int]]:
                async with httpx.AsyncClient(base_url=f.urls[1], headers=AUTH,
                                             timeout=60) as client:
                    running = asyncio.ensure_future(client.post("/api/chat", json={
                        "model": model, "stream": True,
                        "messages": [{"role": "user", "content": "hi"}]}))
                    await asyncio.to_thread(until, lambda: node.active_streams == 1)
                    redis_server.stop()
                    refused = [(await client.post("/api/chat", json={
                        "model": model, "messages": []})).status_code for _ in range(2)]
                    return (await running).status_code, refused

            finished, refused = asyncio.run(asyncio.wait_for(outage(), 60))
            assert (finished, refused) == (200, [503, 503]), (finished, refused)
            redis_server.start()  # same port, empty: the journal is gone too

            def rows_on_a() -> list[tuple[int, str]]:
                store = Store.open(tmp_path / "replica-0")
                try:
                    return sorted((r.status, r.outcome) for r in store.requests(0, math.inf))
                finally:
                    store.close()

            # The one before, the stream that finished in the outage, the two refused.
            until(lambda: rows_on_a() == [(200, "ok"), (200, "ok"), (503, "refused"),
                                          (503, "refused")], timeout=20)


def _timelines(tmp_path: Path, gpu_id: str) -> list[list[tuple[str, str]]]:
    """The GPU's (status, cause) events in each replica's store."""
    found = []
    for i in range(2):
        store = Store.open(tmp_path / f"replica-{i}")
        try:
            found.append([(e.status, e.cause) for e in store.ledger.timeline(math.inf)
                          if e.gpu_id == gpu_id])
        finally:
            store.close()
    return found


def test_a_wake_asked_by_a_follower_is_one_gateway_wake_on_every_replicas_timeline(
        redis_server: RedisServer, gpuctl_process: GpuctlProcess, tmp_path: Path) -> None:
    """Only the leader writes the timeline: the follower's held request makes one
    ``resuming`` event, caused by the gateway (not by hand), and the GPU's life reads the
    same on both replicas' stores, every change once."""
    with fleet(1) as f, replicas(gpuctl_process, f, redis_server.url, tmp_path, 2):
        (gpu_id,) = f.models
        (model,) = f.models.values()
        leader = _leader_index(f, redis_server.url)
        assert _chat(f.urls[1 - leader], model).status_code == 200
        assert f.sim.cloud.resume_calls[gpu_id] == 1

        def timelines() -> list[list[tuple[str, str]]]:
            return _timelines(tmp_path, gpu_id)

        until(lambda: (lambda t: t[0] == t[1] and ("ready", "observed") in t[0])(timelines()),
              timeout=20)
        events = timelines()[0]
        assert [e for e in events if e[0] == "resuming"] == [("resuming", "gateway")]
        # Each status change once: no two events in a row say the same.
        assert all(a[0] != b[0] for a, b in itertools.pairwise(events))


def test_a_hand_wake_asked_of_a_follower_is_recorded_as_by_hand(
        redis_server: RedisServer, gpuctl_process: GpuctlProcess, tmp_path: Path) -> None:
    """An admin resumes a GPU through a follower's admin API: the leader sends the one
    resume, and its timeline (so the usage report) says ``hand``, not ``gateway``."""
    with fleet(1) as f, replicas(gpuctl_process, f, redis_server.url, tmp_path, 2,
                                 admin=True):
        (gpu_id,) = f.models
        follower = f.urls[1 - _leader_index(f, redis_server.url)]
        reply = httpx.post(f"{follower}/gpu/{gpu_id}/resume", params={"wait": "true"},
                           headers={"Authorization": f"Bearer {SECRET_ADMIN}"}, timeout=60)
        assert reply.status_code == 200, reply.text
        until(lambda: (lambda t: t[0] == t[1] and ("ready", "observed") in t[0])(
            _timelines(tmp_path, gpu_id)), timeout=20)
        assert [e for e in _timelines(tmp_path, gpu_id)[0] if e[0] == "resuming"] == [
            ("resuming", "hand")]
        assert f.sim.cloud.resume_calls[gpu_id] == 1
