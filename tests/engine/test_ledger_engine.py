"""What the engine writes on the ledger, on a fake clock that moves."""

from __future__ import annotations

import asyncio

import pytest

from gpuctl.engine.attribution import attribute

from .world import Fleet


def _known(fleet: Fleet, name: str) -> str:
    gpu_id = fleet.cloud.find(name).id
    fleet.store.save_models(gpu_id, [{"name": "llama3.2:latest",
                                      "model": "llama3.2:latest"}], 0)
    return gpu_id


async def test_every_waiter_of_a_wake_is_marked_even_one_that_leaves_early(
    fleet: Fleet,
) -> None:
    fleet.cloud.add("gpu-a", resume_seconds=120)
    gpu_id = _known(fleet, "gpu-a")
    engine = await fleet.start()
    first = engine.begin_request("key_ann", "ann", "/api/chat", "llama3.2")
    served = fleet.spawn(engine.acquire("llama3.2", "ann", request=first))
    await fleet.advance(30)
    # bob arrives while the wake is under way and gives up before it ends.
    second = engine.begin_request("key_bob", "bob", "/api/chat", "llama3.2")
    leaving = fleet.spawn(engine.acquire("llama3.2", "bob", request=second))
    await fleet.advance(10)
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)
    engine.end_request(second, 499)
    await fleet.until(served.done)
    ticket = served.result()
    await fleet.advance(20)
    engine.release(ticket)
    engine.end_request(first, 200)
    assert (first.wake_gpu, second.wake_gpu) == (gpu_id, gpu_id)
    assert second.queued_s == pytest.approx(10)
    assert first.service_s == pytest.approx(20) and first.lease_s == 600
    assert second.outcome == "cancelled" and first.outcome == "ok"
    # The wake is split between both of them by request; ann alone was served.
    events = fleet.store.ledger.timeline(fleet.clock.wall() + 1)
    rows = fleet.store.requests(0, fleet.clock.wall() + 1)
    result = attribute(events, rows, first.at, fleet.clock.wall())
    waking = {k.user: s for k, s in result.shares.items() if k.kind == "waking"}
    assert waking["ann"] == pytest.approx(waking["bob"])
    assert waking["ann"] + waking["bob"] == pytest.approx(first.queued_s, abs=0.5)


async def test_a_pause_is_written_before_the_cloud_hears_of_it(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a", status="running")
    engine = await fleet.start()
    await fleet.until(lambda: engine.gpu("gpu-a").state.value == "idle")
    gpu_id = fleet.cloud.find("gpu-a").id
    fleet.cloud.fail_calls(1)  # the cloud refuses the pause: the intent is on the ledger
    with pytest.raises(Exception):  # noqa: B017 - whatever the cloud's error, see below
        await engine.pause("gpu-a", wait=True)
    await fleet.until(lambda: engine.gpu("gpu-a").state.value == "idle")  # next probe
    events = [(e.status, e.cause) for e in fleet.store.ledger.timeline(1e12)
              if e.gpu_id == gpu_id]
    assert ("pausing", "hand") in events
    assert events[-1][0] == "ready"  # and the GPU, still up, is back on the timeline
