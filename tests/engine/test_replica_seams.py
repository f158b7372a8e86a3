"""The engine's seams for replicas (``engine/replicas.py``), on a fake clock: a slot held
back at release while Redis decides whose turn it is, slots and per-user counts of other
replicas, and the news that a request waits here."""

from __future__ import annotations

import itertools

from gpuctl.engine import Engine

from .world import Fleet


class HoldingGate:
    """A ``SlotGate`` whose global side always has room; ``hold``: a release asks whose
    turn it is (``put_back`` returns False), as ``SharedSlotGate`` does when another
    replica waits."""

    def __init__(self) -> None:
        self.hold = False
        self.ids = itertools.count(1)
        self.returned: list[str] = []

    async def take(self, gpu_id: str, limit: int) -> str | None:
        return f"m{next(self.ids)}"

    def put_back(self, gpu_id: str, member: str) -> bool:
        self.returned.append(member)
        return not self.hold


async def _replica(fleet: Fleet, **server: object) -> tuple[Engine, HoldingGate, str]:
    fleet.configure(gpu={"slots": 1 if not server else 4}, server=dict(server))
    fleet.cloud.add("gpu-0", status="running", models=["llama3.2:latest"])
    engine = await fleet.start()
    gate = HoldingGate()
    engine.attach_gate(gate)
    return engine, gate, engine.gpu("gpu-0").id


async def test_a_slot_held_back_at_release_is_free_here_only_when_given_back(
        fleet: Fleet) -> None:
    engine, gate, gpu_id = await _replica(fleet)
    alice = await engine.acquire("llama3.2", "alice")
    bob = fleet.spawn(engine.acquire("llama3.2", "bob"))
    await fleet.clock.settle()
    gate.hold = True
    engine.release(alice)
    await fleet.clock.settle()
    assert gate.returned == ["m1"]
    assert not bob.done()  # Redis has not said whose turn it is yet
    assert engine.gpu("gpu-0").slots_in_use == 1
    engine.slot_back(gpu_id)  # this replica's turn
    await fleet.clock.settle()
    assert bob.done() and bob.result().user == "bob"
    engine.slot_back(gpu_id)  # a second call (a sync came first) changes nothing
    assert engine.gpu("gpu-0").slots_in_use == 1


async def test_a_slot_handed_to_another_replica_counts_as_theirs_until_they_free_it(
        fleet: Fleet) -> None:
    engine, gate, gpu_id = await _replica(fleet)
    alice = await engine.acquire("llama3.2", "alice")
    bob = fleet.spawn(engine.acquire("llama3.2", "bob"))
    await fleet.clock.settle()
    gate.hold = True
    engine.release(alice)  # handed to another replica: no slot_back
    engine.set_foreign(gpu_id, 1)  # the next sync sees it held there
    await fleet.clock.settle()
    assert not bob.done()
    engine.set_foreign(gpu_id, 0)  # freed there
    await fleet.clock.settle()
    assert bob.done()


async def test_the_per_user_cap_counts_a_users_slots_on_other_replicas(fleet: Fleet) -> None:
    engine, _, gpu_id = await _replica(fleet, max_slots_per_user=1)
    engine.set_user_foreign(gpu_id, {"alice": 1})  # alice holds her one slot elsewhere
    alice = fleet.spawn(engine.acquire("llama3.2", "alice"))
    bob = fleet.spawn(engine.acquire("llama3.2", "bob"))
    await fleet.clock.settle()
    assert bob.done() and not alice.done()
    assert engine.gpu("gpu-0").slots_in_use == 1  # three slots free, none for alice
    engine.set_user_foreign(gpu_id, {})
    await fleet.clock.settle()
    assert alice.done()


async def test_a_request_that_queues_tells_the_replica_which_gpus_it_waits_for(
        fleet: Fleet) -> None:
    engine, _, gpu_id = await _replica(fleet)
    told: list[None] = []
    engine.on_queue = lambda: told.append(None)
    first = await engine.acquire("llama3.2", "alice")
    assert told == [] and engine.waiting_gpus() == set()  # served at once: no news
    second = fleet.spawn(engine.acquire("llama3.2", "bob"))
    await fleet.clock.settle()
    assert len(told) == 1
    assert engine.waiting_gpus() == {gpu_id}
    assert engine.held_by_user(gpu_id) == {"alice": 1}
    engine.release(first)
    await fleet.clock.settle()
    assert second.done() and engine.waiting_gpus() == set()
    assert engine.held_by_user(gpu_id) == {"bob": 1}
