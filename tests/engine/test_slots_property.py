"""Property: whatever happens, no GPU ever has more requests in flight than it has slots.

Hypothesis drives random sequences of arrivals, completions, cancellations (of waiting and
of just-granted requests), node failures and recoveries, GPUs vanishing, and the passing of
time (wakes, lease expiry, idle pauses) against a simulated fleet on a fake clock.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpuctl.config import Config
from gpuctl.engine import Engine, FakeClock, Ticket
from gpuctl.sim.cloud import SimCloud
from gpuctl.store import Store

SLOTS = 2
GPUS = ("gpu-a", "gpu-b", "gpu-c")
USERS = ("ann", "bob", "cy")
MODELS = ("llama3.2", "qwen3:8b")

Op = tuple[Any, ...]

operations = st.lists(
    st.one_of(
        st.tuples(st.just("arrive"), st.sampled_from(USERS), st.sampled_from(MODELS)),
        st.tuples(st.just("complete"), st.integers(0, 99)),
        st.tuples(st.just("cancel"), st.integers(0, 99)),
        st.tuples(st.just("fail"), st.sampled_from(GPUS)),
        st.tuples(st.just("recover"), st.sampled_from(GPUS)),
        st.tuples(st.just("vanish"), st.sampled_from(GPUS)),
        st.tuples(st.just("advance"), st.sampled_from([0.0, 1.0, 7.0, 40.0, 200.0])),
    ),
    max_size=50,
)


def _config() -> Config:
    return Config.model_validate(
        {
            "server": {"max_queue": 1000, "queue_timeout_seconds": 300},
            "gpu": {"slots": SLOTS},
            "timing": {
                "reservation_minutes": 1,
                "fallback_reservation_minutes": 0.5,
                "startup_timeout_seconds": 100,
                "ollama_readiness_wait_seconds": 30,
                "poll_interval_seconds": 5,
            },
        }
    )


async def _scenario(ops: list[Op]) -> None:
    clock = FakeClock()
    cloud = SimCloud(clock, resume_seconds=20, pause_seconds=10, ollama_seconds=2)
    cloud.add("gpu-a", status="running", models=["llama3.2:latest", "qwen3:8b"])
    cloud.add("gpu-b", status="running", models=["llama3.2:latest"])
    cloud.add("gpu-c", models=["qwen3:8b"])
    store = Store.memory()
    engine = Engine(_config(), cloud, store, clock=clock, nodes=cloud.node)
    await engine.start()
    pending: list[asyncio.Task[Ticket]] = []
    held: list[Ticket] = []
    try:
        for op in ops:
            await _apply(op, engine, cloud, clock, pending, held)
            await clock.settle()
            for task in [t for t in pending if t.done()]:
                pending.remove(task)
                if not task.cancelled() and task.exception() is None:
                    held.append(task.result())
            _check(engine, held)
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await engine.stop()
        store.close()


async def _apply(
    op: Op, engine: Engine, cloud: SimCloud, clock: FakeClock,
    pending: list[asyncio.Task[Ticket]], held: list[Ticket],
) -> None:
    kind = op[0]
    if kind == "arrive":
        pending.append(asyncio.ensure_future(engine.acquire(op[2], op[1])))
    elif kind == "complete" and held:
        engine.release(held.pop(op[1] % len(held)))
    elif kind == "cancel" and pending:
        pending[op[1] % len(pending)].cancel()
    elif kind in ("fail", "recover", "vanish"):
        try:
            machine = cloud.find(op[1])
        except KeyError:
            return
        if kind == "vanish":
            cloud.remove(op[1])
        else:
            machine.ollama_up = kind == "recover"
        if kind == "fail":
            for ticket in [t for t in held if t.gpu_id == machine.id][:1]:
                held.remove(ticket)
                engine.release(ticket, failed="node died")
    elif kind == "advance":
        await clock.advance(op[1], step=1.0)


def _check(engine: Engine, held: list[Ticket]) -> None:
    for gpu in engine.gpus():
        mine = sum(1 for t in held if t.gpu_id == gpu.id)
        assert gpu.slots_in_use == mine, (gpu.name, gpu.slots_in_use, mine)
        assert gpu.slots_in_use <= SLOTS, (gpu.name, gpu.slots_in_use)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations)
def test_no_gpu_ever_has_more_requests_in_flight_than_slots(ops: list[Op]) -> None:
    asyncio.run(_scenario(ops))
