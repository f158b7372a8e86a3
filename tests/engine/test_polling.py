"""The cold path's pace: quick looks when a resume is due, slower ones before and after."""

from __future__ import annotations

import pytest

from gpuctl.engine.polling import (
    FAST_CLOUD_SECONDS,
    FAST_NODE_SECONDS,
    SLOW_CLOUD_SECONDS,
    SLOW_NODE_SECONDS,
    cloud_poll_seconds,
    node_poll_seconds,
)

from .world import Fleet


def test_the_cloud_is_read_slowly_while_a_resume_is_young() -> None:
    assert cloud_poll_seconds(0, 120) == SLOW_CLOUD_SECONDS
    # never past the start of the fast window (120 - 30 s here)
    assert cloud_poll_seconds(88, 120) == pytest.approx(2)


def test_the_cloud_is_read_every_second_once_the_resume_is_due() -> None:
    for elapsed in (90, 100, 119, 120):
        assert cloud_poll_seconds(elapsed, 120) == FAST_CLOUD_SECONDS


def test_an_overrunning_resume_is_read_less_and_less_often() -> None:
    paces = [cloud_poll_seconds(120 + over, 120) for over in (10, 30, 60, 600)]
    assert paces == sorted(paces)
    assert FAST_CLOUD_SECONDS < paces[0] < SLOW_CLOUD_SECONDS
    assert paces[-1] == SLOW_CLOUD_SECONDS


def test_a_short_learnt_resume_still_gets_a_fast_window() -> None:
    assert cloud_poll_seconds(0, 10) == FAST_CLOUD_SECONDS


def test_the_node_is_probed_twice_a_second_then_backs_off() -> None:
    assert node_poll_seconds(0) == FAST_NODE_SECONDS
    assert node_poll_seconds(10) == FAST_NODE_SECONDS
    assert FAST_NODE_SECONDS < node_poll_seconds(25) < SLOW_NODE_SECONDS
    assert node_poll_seconds(300) == SLOW_NODE_SECONDS


@pytest.mark.parametrize(("resume", "ollama"), [(95.0, 1.3), (117.7, 4.1), (170.2, 2.2)])
async def test_a_held_request_is_granted_within_a_second_of_its_node_answering(
    fleet: Fleet, resume: float, ollama: float
) -> None:
    machine = fleet.cloud.add("gpu-a", resume_seconds=resume, ollama_seconds=ollama)
    fleet.store.record_resume(machine.id, 120, ok=True, at=0)
    engine = await fleet.start()
    granted: list[float] = []
    task = fleet.spawn(engine.acquire("llama3.2", "alice"))
    task.add_done_callback(lambda _: granted.append(fleet.clock.now()))
    while not granted:
        await fleet.clock.advance(30)  # no step: the clock stops at every sleeper's deadline
    assert machine.running_since is not None
    node_ready = machine.running_since + machine.ollama_seconds
    assert 0 <= granted[0] - node_ready <= 1.0
    engine.release(task.result())
