"""Turns between replicas, with real gateway processes and a real Redis: one user's flood
through one replica does not starve another user's request waiting on another, and the
per-user slot cap holds across replicas."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from .gateways import SECRET, SECRET_BOB, SLOTS, fleet, replicas, until, warm
from .redis_server import RedisServer

if TYPE_CHECKING:
    from conftest import GpuctlProcess  # tests/conftest.py


async def _granted_at(url: str, secret: str, model: str) -> tuple[int, float]:
    """Send one streamed chat; (status, when its headers came: the slot was granted)."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=url, timeout=60, headers={
            "Authorization": f"Bearer {secret}"}) as client, client.stream(
            "POST", "/api/chat", json=body) as reply:
        at = time.monotonic()
        await reply.aread()
        return reply.status_code, at


def test_a_flood_on_one_replica_delays_a_request_on_another_by_one_turn_per_replica(
        redis_server: RedisServer, gpuctl_process: GpuctlProcess, tmp_path: Path) -> None:
    flood = 12
    with fleet(1, chunks=5, interval=0.1) as f:  # 0.5 s a request, 2 slots
        gpu_id, model = warm(f)
        node = f.nodes[gpu_id]
        # No wait notices: a held stream's headers then come when its slot is granted.
        with replicas(gpuctl_process, f, redis_server.url, tmp_path, 2, bob=True,
                      extra={"GPUCTL_SERVER__WAIT_NOTICE": "none"}):

            async def scenario() -> tuple[list[tuple[int, float]], tuple[int, float], float]:
                alice = [asyncio.ensure_future(_granted_at(f.urls[0], SECRET, model))
                         for _ in range(flood)]
                await asyncio.to_thread(until, lambda: node.active_streams == SLOTS)
                sent = time.monotonic()  # the flood holds both slots, the rest queue on r0
                bob = await _granted_at(f.urls[1], SECRET_BOB, model)
                return await asyncio.gather(*alice), bob, sent

            alice, (bob_status, bob_at), sent = asyncio.run(asyncio.wait_for(scenario(), 60))
            assert [status for status, _ in alice] == [200] * flood and bob_status == 200
            # The flood's first grants (they filled the GPU before bob came) are not turns
            # he waited for, even when their headers come back a moment after he was sent.
            turns = sorted(at for _, at in alice)[SLOTS:]
            ahead = sum(sent < at < bob_at for at in turns)
            behind = sum(at > bob_at for at in turns)
            print(f"bob waited {bob_at - sent:.2f} s: {ahead} of alice's requests were "
                  f"granted before him, {behind} after")
            # One turn per replica at most (two replicas); and alice's queue was far from
            # empty when bob got his turn: he was not left to the end of the flood.
            assert ahead <= 2
            assert behind >= flood - SLOTS - 2
            assert node.peak_streams <= SLOTS


def test_the_per_user_slot_cap_holds_across_replicas(
        redis_server: RedisServer, gpuctl_process: GpuctlProcess, tmp_path: Path) -> None:
    with fleet(1, chunks=8, interval=0.1) as f:
        gpu_id, model = warm(f)
        node = f.nodes[gpu_id]
        with replicas(gpuctl_process, f, redis_server.url, tmp_path, 2,
                      extra={"GPUCTL_SERVER__MAX_SLOTS_PER_USER": "1",
                             "GPUCTL_SERVER__WAIT_NOTICE": "none"}):

            def second_sees_one_in_use() -> bool:
                reply = httpx.get(f"{f.urls[1]}/gpu/{gpu_id}/status", timeout=10,
                                  headers={"Authorization": f"Bearer {SECRET}"})
                return bool(reply.json()["slots_in_use"] == 1)

            async def scenario() -> list[tuple[int, float]]:
                first = asyncio.ensure_future(_granted_at(f.urls[0], SECRET, model))
                await asyncio.to_thread(until, lambda: node.active_streams == 1)
                # Replica 2 has synced: it counts alice's slot on replica 1 as hers.
                await asyncio.to_thread(until, second_sees_one_in_use)
                more = [_granted_at(f.urls[1], SECRET, model) for _ in range(3)]
                return [await first, *await asyncio.gather(*more)]

            results = asyncio.run(asyncio.wait_for(scenario(), 60))
            assert [status for status, _ in results] == [200] * 4
            # A GPU of 2 slots, alice's cap 1: per replica she could have held 2 at once.
            assert node.peak_streams == 1
