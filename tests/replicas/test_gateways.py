"""Gateway processes sharing one fleet through a real Redis: one resume per GPU, slots
never exceeded, a leader killed mid-resume is succeeded without a second resume, keys and
budgets changed on one host hold on every replica."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import redis

from gpuctl.store import Store
from gpuctl.store.keys import KeyStore

from .gateways import SECRET, SLOTS, Fleet, env, fleet, replicas, until, warm
from .redis_server import RedisServer

if TYPE_CHECKING:
    from conftest import GpuctlProcess  # tests/conftest.py


async def _chat(url: str, model: str) -> tuple[int, bytes]:
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 headers={"Authorization": f"Bearer {SECRET}"}) as client:
        reply = await client.post("/api/chat", json={
            "model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        return reply.status_code, reply.content


async def _stampede(f: Fleet, count: int) -> list[tuple[int, bytes]]:
    models = list(f.models.values())
    return await asyncio.gather(*[
        _chat(f.urls[i % len(f.urls)], models[i % len(models)]) for i in range(count)])


def _leader(redis_url: str) -> str:
    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.get("gpuctl:leader")
    finally:
        client.close()
    return raw.decode() if raw else ""


def test_a_cold_stampede_over_two_replicas_resumes_each_gpu_once_within_slots(
        redis_server: RedisServer, gpuctl_process: GpuctlProcess, tmp_path: Path) -> None:
    with fleet(2) as f, replicas(gpuctl_process, f, redis_server.url, tmp_path, 2):
        until(lambda: _leader(redis_server.url) != "")
        results = asyncio.run(_stampede(f, 50))
        assert [status for status, _ in results] == [200] * 50
        assert all(b'"done":true' in body for _, body in results)
        assert dict(f.sim.cloud.resume_calls) == {gpu_id: 1 for gpu_id in f.models}
        # The nodes' own count: never more streams at once than the GPU's slots.
        assert {g: n.peak_streams for g, n in f.nodes.items()} == {g: SLOTS for g in f.nodes}


def test_three_replicas_never_exceed_the_slots_of_a_warm_gpu(
        redis_server: RedisServer, gpuctl_process: GpuctlProcess, tmp_path: Path) -> None:
    with fleet(1, chunks=8) as f:
        gpu_id, _ = warm(f)
        with replicas(gpuctl_process, f, redis_server.url, tmp_path, 3):
            results = asyncio.run(_stampede(f, 45))
            assert [status for status, _ in results] == [200] * 45
            assert f.nodes[gpu_id].peak_streams == SLOTS


def test_the_leader_killed_mid_resume_is_succeeded_without_a_second_resume(
        redis_server: RedisServer, gpuctl_process: GpuctlProcess, tmp_path: Path) -> None:
    with fleet(1, resume_seconds=4.0) as f, \
            replicas(gpuctl_process, f, redis_server.url, tmp_path, 2):
        (gpu_id,) = f.models
        (model,) = f.models.values()
        until(lambda: _leader(redis_server.url) != "")

        async def scenario() -> list[tuple[int, bytes]]:
            held = [asyncio.ensure_future(_chat(url, model)) for url in f.urls for _ in range(3)]
            await asyncio.to_thread(until, lambda: f.sim.cloud.resume_calls[gpu_id] > 0)
            # Kill whichever replica leads: the one that sent the resume.
            leader_pid = int(_leader(redis_server.url).split("@")[0])
            index = [p.pid for p in f.procs].index(leader_pid)
            f.procs[index].send_signal(signal.SIGKILL)
            done = await asyncio.gather(*held, return_exceptions=True)
            return [d for i, d in enumerate(done)
                    if not isinstance(d, BaseException) and i // 3 != index]

        served = asyncio.run(asyncio.wait_for(scenario(), 60))
        assert [status for status, _ in served] == [200] * 3  # the survivor's held requests
        assert f.sim.cloud.resume_calls[gpu_id] == 1
        # The survivor served its requests by watching the cloud; it takes over the lead
        # once the dead leader's lease runs out (6 s), without a second resume.
        (survivor,) = [p for p in f.procs if p.poll() is None]
        until(lambda: _leader(redis_server.url).startswith(f"{survivor.pid}@"), timeout=10)
        assert f.sim.cloud.resume_calls[gpu_id] == 1



def test_redis_stopped_and_restarted_under_load(
        redis_server: RedisServer, gpuctl_process: GpuctlProcess, tmp_path: Path) -> None:
    """Held slots finish; new requests get 503 + Retry-After; recovery needs no restart,
    even though Redis comes back empty (no persistence)."""
    with fleet(1, chunks=30, interval=0.05) as f:
        gpu_id, model = warm(f)
        node = f.nodes[gpu_id]
        with replicas(gpuctl_process, f, redis_server.url, tmp_path, 2):

            async def outage() -> tuple[tuple[int, bytes], list[httpx.Response]]:
                # One stream holds a slot; the other slot is free on both replicas' view.
                running = asyncio.ensure_future(_chat(f.urls[0], model))
                await asyncio.to_thread(until, lambda: node.active_streams == 1)
                redis_server.stop()
                refused = []
                for url in f.urls:
                    async with httpx.AsyncClient(
                            base_url=url, timeout=30,
                            headers={"Authorization": f"Bearer {SECRET}"}) as client:
                        refused.append(await client.post("/api/chat", json={
                            "model": model, "stream": False,
                            "messages": [{"role": "user", "content": "hi"}]}))
                return await running, refused

            finished, refused = asyncio.run(asyncio.wait_for(outage(), 60))
            assert finished[0] == 200 and b'"done":true' in finished[1]
            assert [r.status_code for r in refused] == [503, 503]
            assert all(int(r.headers["Retry-After"]) > 0 for r in refused)
            assert all("Redis" in r.json()["error"] for r in refused)
            assert node.peak_streams <= 2, "before restart"
            redis_server.start()  # same port, empty

            def served_again() -> bool:
                results = asyncio.run(_stampede(f, 4))
                return [status for status, _ in results] == [200] * 4

            until(served_again, timeout=20)
            assert node.peak_streams <= 2


def test_a_key_revoked_from_the_cli_is_refused_by_every_replica_within_a_second(
        redis_server: RedisServer, gpuctl_process: GpuctlProcess, tmp_path: Path) -> None:
    with fleet(1) as f:
        _, model = warm(f)
        with replicas(gpuctl_process, f, redis_server.url, tmp_path, 3):
            assert [s for s, _ in asyncio.run(_stampede(f, 3))] == [200] * 3
            state = tmp_path / "replica-0"
            keys = KeyStore.open(state)
            (key,) = keys.all()
            keys.close()
            revoke = subprocess.run(
                [sys.executable, "-m", "gpuctl", "keys", "revoke", key.id],
                env={**os.environ, **env(f, redis_server.url, state)},
                capture_output=True, text=True, timeout=30, check=False)
            assert revoke.returncode == 0, revoke.stderr
            revoked_at = time.monotonic()

            async def statuses() -> list[int]:
                return [s for s, _ in await asyncio.gather(*[_chat(u, model) for u in f.urls])]

            until(lambda: asyncio.run(statuses()) == [401] * 3, timeout=5)
            # Bounded by the sync period (0.5 s) plus a round trip; the figure is printed.
            took = time.monotonic() - revoked_at
            print(f"revocation refused by 3 replicas after {took * 1000:.0f} ms")
            assert took < 1.0


def test_a_budget_set_on_one_host_blocks_wakes_on_every_replica(
        redis_server: RedisServer, gpuctl_process: GpuctlProcess, tmp_path: Path) -> None:
    """``gpuctl keys budget`` on one host: every replica refuses the key a wake (429) and the
    cloud sees no resume; the removal, made on the other host, lets both wake for it."""
    with fleet(1) as f:
        (model,) = f.models.values()
        with replicas(gpuctl_process, f, redis_server.url, tmp_path, 2):
            hosts = [tmp_path / f"replica-{i}" for i in range(2)]
            keys = KeyStore.open(hosts[0])
            (key,) = keys.all()
            keys.close()

            def budget(host: Path, *args: str) -> None:
                done = subprocess.run(
                    [sys.executable, "-m", "gpuctl", "keys", "budget", key.id, *args],
                    env={**os.environ, **env(f, redis_server.url, host)},
                    capture_output=True, text=True, timeout=30, check=False)
                assert done.returncode == 0, done.stderr

            def budgets(host: Path) -> dict[str, tuple[float, str]]:
                store = Store.open(host)
                try:
                    return store.ledger.budgets()
                finally:
                    store.close()

            def remaining() -> list[str | None]:
                """Each replica's budget header on a request that wakes nothing (400)."""
                found = []
                for url in f.urls:
                    reply = httpx.post(f"{url}/api/chat", json={}, timeout=10,
                                       headers={"Authorization": f"Bearer {SECRET}"})
                    assert reply.status_code == 400
                    found.append(reply.headers.get("x-gpuctl-budget-remaining"))
                return found

            budget(hosts[0], "--gpu-hours", "0", "--per", "day")
            set_at = time.monotonic()
            until(lambda: remaining() == ["0", "0"], timeout=10)
            print(f"budget in force on both replicas after "
                  f"{(time.monotonic() - set_at) * 1000:.0f} ms")
            assert budgets(hosts[1]) == {key.id: (0.0, "day")}

            async def statuses() -> list[int]:
                return [s for s, _ in await asyncio.gather(*[_chat(u, model) for u in f.urls])]

            assert asyncio.run(statuses()) == [429, 429]
            assert f.sim.cloud.total_resumes == 0
            budget(hosts[1], "--none")
            until(lambda: remaining() == [None, None], timeout=10)
            assert budgets(hosts[0]) == {}
            assert asyncio.run(statuses()) == [200, 200]
            assert f.sim.cloud.total_resumes == 1
