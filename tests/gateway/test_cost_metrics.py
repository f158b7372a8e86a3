"""The ledger's counters on ``/metrics``: they add up, and they never go down."""

from __future__ import annotations

import re

import pytest

from .world import GpuSpec, World, WorldFactory


async def _scrape(world: World) -> dict[str, float]:
    async with world.client() as c:
        text = (await c.get("/metrics")).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(gpuctl_(?:gpu_billed|user_gpu|unattributed)_seconds_total)"
                         r"(\{[^}]*\}) (\S+)$", line)
        if match:
            found[match.group(1) + match.group(2)] = float(match.group(3))
    return found


async def test_billed_seconds_are_split_between_users_and_reasons(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1")) as world:
        async with world.client() as c:
            ok = await c.post("/api/generate", json={"model": "llama3.2", "stream": False})
            assert ok.status_code == 200
        await world.clock.advance(120, step=10)
        first = await _scrape(world)
        billed = first['gpuctl_gpu_billed_seconds_total{gpu="gpu-1"}']
        assert billed == pytest.approx(120)
        # Her request took no clock time; her lease then kept gpu-1 up: all hers, held.
        assert first['gpuctl_user_gpu_seconds_total{kind="held",user="alice"}'] == billed
        split = sum(v for k, v in first.items() if not k.startswith("gpuctl_gpu_billed"))
        assert split == pytest.approx(billed, abs=1e-3)
        await world.clock.advance(900, step=10)  # lease over, idle pause, paused
        second = await _scrape(world)
        for name, value in first.items():
            assert second[name] >= value - 1e-9, name  # counters never go down
        assert second['gpuctl_unattributed_seconds_total{reason="pausing"}'] > 0
        assert second['gpuctl_user_gpu_seconds_total{kind="held",user="alice"}'] == \
            pytest.approx(600)  # reservation_minutes = 10
