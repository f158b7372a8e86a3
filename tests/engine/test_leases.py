"""Leases: affinity, the fallback lease, and pausing a GPU once nobody holds one."""

from __future__ import annotations

import pytest

from gpuctl.engine import Engine, GpuState

from .world import Fleet


async def two_running(fleet: Fleet) -> Engine:
    for name in ("gpu-a", "gpu-b"):
        fleet.cloud.add(name, status="running", models=["llama3.2:latest"])
    return await fleet.start()


def lease_of(engine: Engine, gpu: str, user: str) -> float:
    leases = {lease.user: lease.expires_in_seconds for lease in engine.gpu(gpu).leases}
    return leases[user]


async def test_a_user_goes_back_to_the_gpu_leased_to_them(fleet: Fleet) -> None:
    engine = await two_running(fleet)
    first = await engine.acquire("llama3.2", "alice")
    engine.release(first)
    # bob's two requests make alice's GPU the busier one (it has the model loaded now)...
    busy = [await engine.acquire("llama3.2", "bob") for _ in range(2)]
    assert {t.gpu_id for t in busy} == {first.gpu_id}
    # ...yet alice goes back to it: her lease comes first.
    again = await engine.acquire("llama3.2", "alice")
    assert again.gpu_id == first.gpu_id
    assert again.reason == "leased to you, model loaded, 2/4 slots in use"


async def test_lease_runs_reservation_minutes_after_the_last_request(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a", status="running")
    engine = await fleet.start()
    ticket = await engine.acquire("llama3.2", "alice")
    await fleet.advance(100)
    engine.release(ticket)
    assert lease_of(engine, "gpu-a", "alice") == pytest.approx(600)


async def test_a_gpu_already_leased_gives_the_newcomer_the_fallback_lease(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a", status="running")
    engine = await fleet.start()
    engine.release(await engine.acquire("llama3.2", "alice"))
    bob = await engine.acquire("llama3.2", "bob")
    engine.release(bob)
    assert lease_of(engine, "gpu-a", "bob") == pytest.approx(180)
    assert lease_of(engine, "gpu-a", "alice") == pytest.approx(600)


async def test_releasing_one_users_request_keeps_anothers_lease(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a", status="running")
    engine = await fleet.start()
    alice = await engine.acquire("llama3.2", "alice")
    bob = await engine.acquire("llama3.2", "bob")
    engine.release(alice)
    await fleet.advance(200)
    engine.release(bob)
    assert {lease.user for lease in engine.gpu("gpu-a").leases} == {"alice", "bob"}
    assert lease_of(engine, "gpu-a", "alice") == pytest.approx(400)


async def test_idle_gpu_pauses_after_the_last_lease_expires_and_not_before(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a")
    engine = await fleet.start()
    task = fleet.spawn(engine.acquire("llama3.2", "alice"))  # wakes gpu-a
    await fleet.until(task.done)
    await fleet.advance(30)
    engine.release(task.result())
    await fleet.advance(590)
    assert fleet.cloud.total_pauses == 0
    assert engine.gpu("gpu-a").state is GpuState.IDLE
    await fleet.advance(20)
    assert fleet.cloud.total_pauses == 1
    await fleet.until(lambda: engine.gpu("gpu-a").state is GpuState.PAUSED)
    await fleet.advance(3600, step=10)
    assert fleet.cloud.total_pauses == 1


async def test_no_pause_while_a_request_is_in_flight(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a", status="running")
    engine = await fleet.start()
    ticket = await engine.acquire("llama3.2", "alice")
    await fleet.advance(7200, step=10)
    assert fleet.cloud.total_pauses == 0
    engine.release(ticket)
    await fleet.advance(620, step=10)
    assert fleet.cloud.total_pauses == 1


async def test_a_gpu_found_running_gets_one_reservation_of_grace(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a", status="running")
    engine = await fleet.start()
    await fleet.advance(590)
    assert fleet.cloud.total_pauses == 0
    await fleet.advance(20)
    assert fleet.cloud.total_pauses == 1
    assert engine.gpu("gpu-a").state in (GpuState.PAUSING, GpuState.PAUSED)


async def test_an_admin_wake_is_paused_when_nobody_uses_it(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a")
    engine = await fleet.start()
    task = fleet.spawn(engine.wake("gpu-a", wait=True))
    await fleet.until(task.done)
    await fleet.advance(590)
    assert fleet.cloud.total_pauses == 0
    await fleet.advance(20)
    assert fleet.cloud.total_pauses == 1


async def test_auto_pause_off_never_pauses(fleet: Fleet) -> None:
    fleet.configure(gpu={"auto_pause": False})
    fleet.cloud.add("gpu-a", status="running")
    await fleet.start()
    await fleet.advance(7200, step=10)
    assert fleet.cloud.total_pauses == 0


async def test_a_request_for_a_pausing_gpu_waits_for_the_pause_then_resumes(
    fleet: Fleet,
) -> None:
    fleet.cloud.add("gpu-a", status="running")
    engine = await fleet.start()
    await fleet.advance(610)
    assert engine.gpu("gpu-a").state is GpuState.PAUSING
    task = fleet.spawn(engine.acquire("llama3.2", "alice"))
    await fleet.until(task.done)
    assert task.result().gpu_name == "gpu-a"
    assert fleet.cloud.total_pauses == 1
    assert fleet.cloud.total_resumes == 1


async def test_a_fallback_lease_becomes_a_full_lease_once_nobody_else_holds_the_gpu(
    fleet: Fleet,
) -> None:
    fleet.cloud.add("gpu-a", status="running")
    engine = await fleet.start()
    engine.release(await engine.acquire("llama3.2", "alice"))
    engine.release(await engine.acquire("llama3.2", "bob"))
    assert lease_of(engine, "gpu-a", "bob") == pytest.approx(180)
    await fleet.advance(500)
    engine.release(await engine.acquire("llama3.2", "bob"))  # alice still holds it
    assert lease_of(engine, "gpu-a", "bob") == pytest.approx(180)
    await fleet.advance(110)  # alice's lease ran out at 600 s
    assert [lease.user for lease in engine.gpu("gpu-a").leases] == ["bob"]
    # bob's lease now runs the full reservation from his last request, 110 s ago.
    assert lease_of(engine, "gpu-a", "bob") == pytest.approx(600 - 110)
    engine.release(await engine.acquire("llama3.2", "bob"))
    assert lease_of(engine, "gpu-a", "bob") == pytest.approx(600)
    await fleet.advance(590)
    assert fleet.cloud.total_pauses == 0  # the GPU stays up for bob's full lease


async def test_an_engine_on_a_reader_store_shows_the_leases_and_never_writes_them(
    fleet: Fleet,
) -> None:
    from gpuctl.store import Store

    fleet.cloud.add("gpu-a", status="running")
    gateway = await fleet.start()
    gateway.release(await gateway.acquire("llama3.2", "alice"))
    await fleet.advance(10)  # the gateway's next poll writes its leases
    laptop_store = Store.open(fleet.state_dir, reader=True)
    fleet.stores.append(laptop_store)
    laptop = await fleet.start(store=laptop_store)
    assert lease_of(laptop, "gpu-a", "alice") == pytest.approx(590)
    await fleet.advance(30)  # the laptop's engine ticks too, with the clock moving
    await laptop.stop()
    fleet.engines.remove(laptop)
    assert [(r.user, r.expires_at) for r in fleet.store.load_leases(0.0)] == \
        [("alice", pytest.approx(fleet.clock.wall() + 600 - 40, abs=1))]
