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


async def test_with_settle_after_reads_a_transition_ends_at_the_nth_read() -> None:
    cloud = SimCloud(FakeClock(), settle_after_reads=3)
    machine = cloud.add("gpu-a")
    await cloud.resume(machine.id)

    statuses = [(await cloud.get_workspace(machine.id)).status for _ in range(3)]

    assert statuses == ["resuming", "resuming", "running"]  # the clock never moved


async def test_a_node_probe_does_not_count_as_a_read_of_the_cloud() -> None:
    cloud = SimCloud(FakeClock(), settle_after_reads=2)
    machine = cloud.add("gpu-a")
    node = cloud.node(machine.workspace())
    await cloud.resume(machine.id)

    for _ in range(5):
        assert not await node.ready()

    assert (await cloud.get_workspace(machine.id)).status == "resuming"
    assert (await cloud.get_workspace(machine.id)).status == "running"


async def test_a_failing_resume_takes_failed_resume_seconds() -> None:
    clock = FakeClock()
    cloud = SimCloud(clock, resume_seconds=60, failed_resume_seconds=600)
    machine = cloud.add("gpu-a")
    cloud.fail_next_resume(machine.id)
    await cloud.resume(machine.id)

    await clock.advance(599)
    assert (await cloud.get_workspace(machine.id)).status == "resuming"
    await clock.advance(1)
    assert (await cloud.get_workspace(machine.id)).status == "paused"


async def test_deleted_and_non_compute_machines_are_not_listed_nor_actionable() -> None:
    cloud = SimCloud(FakeClock())
    cloud.add("gpu-a")
    gone = cloud.add("gpu-old", deleted=True)
    cloud.add("gpu-disk", application_type="Storage")

    assert [ws.name for ws in await cloud.list_workspaces()] == ["gpu-a"]
    assert (await cloud.get_workspace(gone.id)).name == "gpu-old"  # still readable, as SURF
    with pytest.raises(GpuNotFound):
        await cloud.resume(gone.id)


async def test_the_action_history_keeps_each_action_and_its_outcome() -> None:
    clock = FakeClock()
    cloud = SimCloud(clock, resume_seconds=10, pause_seconds=5)
    machine = cloud.add("gpu-a")
    cloud.fail_next_resume(machine.id)
    await cloud.resume(machine.id)
    await clock.advance(10)
    await cloud.resume(machine.id)
    await clock.advance(10)
    await cloud.pause(machine.id)
    await clock.advance(5)
    await cloud.get_workspace(machine.id)

    assert [(a.kind, a.status, a.error) for a in machine.actions] == [
        ("resume", "failed", RESUME_FAILURE), ("resume", "success", None),
        ("pause", "success", None)]
    assert [a.updated - a.created for a in machine.actions if a.updated] == [10, 10, 5]
