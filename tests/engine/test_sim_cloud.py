"""The simulated cloud behaves like SURF where the engine depends on it."""

from __future__ import annotations

import pytest

from gpuctl.engine import FakeClock
from gpuctl.errors import ActionRefused, CloudUnavailable, GpuNotFound, NodeError
from gpuctl.sim.cloud import RESUME_FAILURE, SimCloud


async def test_resume_walks_paused_resuming_running_on_the_clock() -> None:
    clock = FakeClock()
    cloud = SimCloud(clock, resume_seconds=100, ollama_seconds=10)
    machine = cloud.add("gpu-a")
    ws = await cloud.resume(machine.id)
    assert (ws.status, ws.last_action, ws.last_action_status) == ("resuming", "resume", "pending")
    await clock.advance(99)
    assert (await cloud.get_workspace(machine.id)).status == "resuming"
    await clock.advance(1)
    ws = await cloud.get_workspace(machine.id)
    assert ws.status == "running" and ws.can_pause and not ws.can_resume
    node = cloud.node(ws)
    assert not await node.ready()
    await clock.advance(10)
    assert await node.ready()
    assert [m.name for m in await node.tags()] == ["llama3.2:latest"]
    assert cloud.resume_calls[machine.id] == 1


async def test_a_failing_resume_falls_back_to_paused_with_the_error() -> None:
    clock = FakeClock()
    cloud = SimCloud(clock, resume_seconds=50)
    machine = cloud.add("gpu-a")
    cloud.fail_next_resume("gpu-a")
    await cloud.resume(machine.id)
    await clock.advance(50)
    ws = await cloud.get_workspace(machine.id)
    assert (ws.status, ws.last_action_status, ws.last_action_error) == (
        "paused", "failed", RESUME_FAILURE)
    await cloud.resume(machine.id)  # the next one works
    await clock.advance(50)
    assert (await cloud.get_workspace(machine.id)).status == "running"


async def test_actions_the_status_does_not_allow_are_refused() -> None:
    cloud = SimCloud(FakeClock())
    machine = cloud.add("gpu-a", status="running")
    with pytest.raises(ActionRefused):
        await cloud.resume(machine.id)
    await cloud.pause(machine.id)
    with pytest.raises(ActionRefused):
        await cloud.pause(machine.id)
    assert cloud.pause_calls[machine.id] == 2


async def test_vanished_workspaces_and_injected_errors() -> None:
    cloud = SimCloud(FakeClock())
    machine = cloud.add("gpu-a", status="running")
    node = cloud.node(machine.workspace())
    cloud.fail_calls(1)
    with pytest.raises(CloudUnavailable):
        await cloud.list_workspaces()
    assert len(await cloud.list_workspaces()) == 1
    cloud.remove("gpu-a")
    with pytest.raises(GpuNotFound):
        await cloud.get_workspace(machine.id)
    assert not await node.ready()
    with pytest.raises(NodeError):
        await node.tags()
