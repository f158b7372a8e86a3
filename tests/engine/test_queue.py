"""Slots and the fair queue, as whole scenarios on a running fleet."""

from __future__ import annotations

import asyncio

import pytest

from gpuctl.engine import Engine, Progress, Ticket
from gpuctl.errors import Unavailable

from .world import Fleet


async def running_fleet(fleet: Fleet, gpus: int = 1, **gpu: object) -> Engine:
    if gpu:
        fleet.configure(gpu=dict(gpu))
    for n in range(gpus):
        fleet.cloud.add(f"gpu-{n}", status="running", models=["llama3.2:latest", "qwen3:8b"])
    return await fleet.start()


async def test_a_free_slot_is_granted_at_once_with_a_reason(fleet: Fleet) -> None:
    engine = await running_fleet(fleet)
    ticket = await engine.acquire("llama3.2", "alice")
    assert ticket.gpu_name == "gpu-0"
    assert ticket.base_url == "http://gpu-0.sim:11434"
    assert ticket.waited_seconds == 0
    assert ticket.reason == "model on disk, not leased, 0/4 slots in use"


async def test_never_more_requests_in_flight_than_slots(fleet: Fleet) -> None:
    engine = await running_fleet(fleet, slots=2)
    tasks = [fleet.spawn(engine.acquire("llama3.2", f"user-{n}")) for n in range(5)]
    await fleet.clock.settle()
    assert sum(t.done() for t in tasks) == 2
    assert engine.gpu("gpu-0").slots_in_use == 2
    assert engine.queue_depth() == 3
    engine.release(tasks[0].result())
    await fleet.clock.settle()
    assert sum(t.done() for t in tasks) == 3
    assert engine.gpu("gpu-0").slots_in_use == 2


async def test_one_users_hundred_requests_delay_anothers_by_one_turn(fleet: Fleet) -> None:
    engine = await running_fleet(fleet, slots=1)
    heavy = [fleet.spawn(engine.acquire("llama3.2", "heavy")) for _ in range(100)]
    await fleet.clock.settle()
    light = fleet.spawn(engine.acquire("llama3.2", "light"))
    await fleet.clock.settle()
    order: list[str] = []
    current = heavy[0].result()
    while True:
        engine.release(current)
        await fleet.clock.settle()
        granted = [t for t in [*heavy, light] if t.done() and t.result().id > current.id]
        if not granted:
            break
        current = granted[0].result()
        order.append(current.user)
        if current.user == "light":
            break
    assert order.index("light") <= 1


async def test_light_user_position_and_estimate_are_reported(fleet: Fleet) -> None:
    engine = await running_fleet(fleet, slots=1)
    first = await engine.acquire("llama3.2", "heavy")
    seen: list[Progress] = []
    for _ in range(3):
        fleet.spawn(engine.acquire("llama3.2", "heavy"))
    await fleet.clock.settle()
    fleet.spawn(engine.acquire("llama3.2", "light", progress=seen.append))
    await fleet.clock.settle()
    assert seen[0].stage == "queued"
    assert seen[0].position == 2  # behind heavy's first queued request, ahead of the rest
    assert seen[0].estimate_seconds is not None and seen[0].estimate_seconds > 0
    engine.release(first)
    await fleet.advance(10)  # the next tick re-tells positions that changed
    assert seen[-1].position == 1


async def test_a_full_queue_answers_unavailable_with_retry_after(fleet: Fleet) -> None:
    fleet.configure(server={"max_queue": 2})
    engine = await running_fleet(fleet, slots=1)
    await engine.acquire("llama3.2", "alice")
    waiting = [fleet.spawn(engine.acquire("llama3.2", "bob")) for _ in range(2)]
    await fleet.clock.settle()
    with pytest.raises(Unavailable, match="queue is full") as err:
        await engine.acquire("llama3.2", "carol")
    assert err.value.retry_after >= 1
    assert not any(t.done() for t in waiting)


async def test_the_wait_limit_answers_unavailable_and_frees_the_place(fleet: Fleet) -> None:
    fleet.configure(server={"queue_timeout_seconds": 60})
    engine = await running_fleet(fleet, slots=1)
    await engine.acquire("llama3.2", "alice")
    task = fleet.spawn(engine.acquire("llama3.2", "bob"))
    await fleet.advance(61)
    with pytest.raises(Unavailable, match="within 60 s"):
        task.result()
    assert engine.queue_depth() == 0


async def test_cancelling_a_queued_request_lets_the_next_one_in(fleet: Fleet) -> None:
    engine = await running_fleet(fleet, slots=1)
    first = await engine.acquire("llama3.2", "alice")
    doomed = fleet.spawn(engine.acquire("llama3.2", "bob"))
    later = fleet.spawn(engine.acquire("llama3.2", "carol"))
    await fleet.clock.settle()
    doomed.cancel()
    await asyncio.gather(doomed, return_exceptions=True)
    assert engine.queue_depth() == 1
    engine.release(first)
    await fleet.clock.settle()
    assert later.done() and later.result().user == "carol"
    assert engine.gpu("gpu-0").slots_in_use == 1


async def test_release_twice_counts_once(fleet: Fleet) -> None:
    engine = await running_fleet(fleet)
    ticket: Ticket = await engine.acquire("llama3.2", "alice")
    engine.release(ticket)
    engine.release(ticket)
    assert engine.gpu("gpu-0").slots_in_use == 0
    assert fleet.store.usage()["alice"].requests == 1


async def test_the_least_busy_gpu_serves_when_nobody_holds_a_lease(fleet: Fleet) -> None:
    engine = await running_fleet(fleet, gpus=2)
    first = await engine.acquire("llama3.2", "alice")
    second = await engine.acquire("qwen3:8b", "bob")
    assert first.gpu_id != second.gpu_id  # bob avoids the GPU leased to alice


async def test_usage_is_recorded_per_user(fleet: Fleet) -> None:
    from gpuctl.engine import Usage

    engine = await running_fleet(fleet)
    ticket = await engine.acquire("llama3.2", "alice")
    await fleet.advance(3)
    engine.release(ticket, Usage(tokens_in=10, tokens_out=20))
    totals = fleet.store.usage()["alice"]
    assert (totals.requests, totals.tokens_in, totals.tokens_out) == (1, 10, 20)
    assert totals.gpu_seconds == pytest.approx(3)


async def test_a_served_model_counts_as_loaded_and_load_times_are_learnt(fleet: Fleet) -> None:
    from gpuctl.engine import Usage

    engine = await running_fleet(fleet, gpus=2)
    first = await engine.acquire("qwen3:8b", "alice")
    engine.release(first, Usage(tokens_in=1, tokens_out=1, load_seconds=12.5))
    assert engine.gpu(first.gpu_id).loaded == ["qwen3:8b"]
    bob = await engine.acquire("qwen3:8b", "bob")  # the loaded GPU wins, even leased
    assert bob.gpu_id == first.gpu_id
    assert bob.reason.startswith("model loaded")
    await fleet.advance(10)  # the tick writes what was learnt
    assert fleet.store.load_history() == {"qwen3:8b": [12.5]}


# -- the per-user slot cap (server.max_slots_per_user) ------------------------------------------


async def test_one_user_holds_at_most_half_a_gpus_slots_by_default(fleet: Fleet) -> None:
    engine = await running_fleet(fleet, slots=4)
    mine = [fleet.spawn(engine.acquire("llama3.2", "stuck")) for _ in range(4)]
    await fleet.clock.settle()
    assert sum(t.done() for t in mine) == 2  # the other two wait, though 2 slots are free
    other = await engine.acquire("llama3.2", "bob")  # bob is served at once
    assert other.gpu_name == "gpu-0"
    assert engine.gpu("gpu-0").slots_in_use == 3


async def test_a_capped_users_waiter_lets_another_user_pass_when_a_slot_frees(
    fleet: Fleet,
) -> None:
    engine = await running_fleet(fleet, slots=2)  # the cap: 1 slot per user
    first = await engine.acquire("llama3.2", "stuck")
    second = fleet.spawn(engine.acquire("llama3.2", "stuck"))
    bob = await engine.acquire("llama3.2", "bob")
    carol = fleet.spawn(engine.acquire("llama3.2", "carol"))  # queued after stuck's second
    await fleet.clock.settle()
    engine.release(bob)
    await fleet.clock.settle()
    assert carol.done() and not second.done()  # the freed slot skips the capped user
    engine.release(first)
    await fleet.clock.settle()
    assert second.done()  # and the capped user's turn comes when its own slot frees
    assert second.result().gpu_name == "gpu-0"


async def test_a_user_capped_on_one_gpu_is_served_on_another(fleet: Fleet) -> None:
    engine = await running_fleet(fleet, gpus=2, slots=2)
    one = await engine.acquire("llama3.2", "alice")
    two = await engine.acquire("llama3.2", "alice")
    assert {one.gpu_name, two.gpu_name} == {"gpu-0", "gpu-1"}


async def test_the_per_user_cap_is_configurable(fleet: Fleet) -> None:
    fleet.configure(server={"max_slots_per_user": 4})
    engine = await running_fleet(fleet, slots=4)
    tickets = [await engine.acquire("llama3.2", "batch") for _ in range(4)]
    assert engine.gpu("gpu-0").slots_in_use == 4
    for ticket in tickets:
        engine.release(ticket)
    assert engine.gpu("gpu-0").slots_in_use == 0


async def test_a_learnt_load_time_reaches_the_wait_estimate_of_a_cold_request(
    fleet: Fleet,
) -> None:
    from gpuctl.engine import Usage

    fleet.cloud.add("gpu-a", status="running")
    engine = await fleet.start()
    ticket = await engine.acquire("llama3.2", "alice")
    await fleet.advance(95)  # a slow first answer: 90 s of it loading the model
    engine.release(ticket, Usage(tokens_in=1, tokens_out=1, load_seconds=90.0))
    paused = fleet.spawn(engine.pause("gpu-a", wait=True))
    await fleet.until(paused.done)
    heard: list[Progress] = []
    task = fleet.spawn(engine.acquire("llama3.2", "bob", progress=heard.append))
    await fleet.advance(1)
    queued = next(p for p in heard if p.stage == "queued")
    resume = engine.gpu("gpu-a").estimated_resume_seconds
    assert resume is not None
    # resume time left + the learnt 90 s load (the 15 s default before any was learnt)
    assert queued.estimate_seconds == pytest.approx(resume + 90.0, abs=2.0)
    await fleet.until(task.done)
