"""The engine's calls for model management and ``/api/show``: which GPUs, woken how."""

from __future__ import annotations

import pytest

from gpuctl.engine import FakeClock, GpuState
from gpuctl.engine.management import FAILOVER_ATTEMPTS
from gpuctl.errors import Unavailable

from .world import Fleet


async def test_named_gpus_are_woken_together_not_in_turn(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a")
    fleet.cloud.add("gpu-b")
    engine = await fleet.start()
    task = fleet.spawn(engine.management_targets(None, ["gpu-a", "gpu-b", "gpu-a"]))
    await fleet.advance(5)
    assert dict(fleet.cloud.resume_calls) == {fleet.cloud.find("gpu-a").id: 1,
                                              fleet.cloud.find("gpu-b").id: 1}
    took = await fleet.until(task.done)
    assert took < 200  # one resume's time (120 s + Ollama's 5 s), not two
    assert [g.name for g in task.result()] == ["gpu-a", "gpu-b"]
    assert all(g.state is GpuState.IDLE and g.base_url for g in task.result())


async def test_a_leased_gpu_with_the_model_is_a_target_while_the_clock_moves(
    fleet: Fleet,
) -> None:
    fleet.clock = fleet.cloud.clock = FakeClock(drift=0.01)  # a clock that moves per reading
    fleet.cloud.add("gpu-a", status="running")
    fleet.cloud.add("gpu-b", status="running")
    fleet.cloud.add("gpu-c", status="running", models=["qwen3:8b"])
    engine = await fleet.start()
    engine.release(await engine.acquire("llama3.2", "alice"))
    assert sum(bool(g.leases) for g in engine.gpus()) == 1
    targets = await engine.management_targets("llama3.2")
    assert [g.name for g in targets] == ["gpu-a", "gpu-b"]
    everyone = await engine.management_targets(None)
    assert [g.name for g in everyone] == ["gpu-a", "gpu-b", "gpu-c"]
    assert fleet.cloud.total_resumes == 0


async def test_no_running_gpu_and_none_named_is_unavailable(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a")
    engine = await fleet.start()
    with pytest.raises(Unavailable, match="X-Gpuctl-Gpu"):
        await engine.management_targets("llama3.2")
    assert fleet.cloud.total_resumes == 0


async def test_show_answers_from_memory_then_from_the_listing(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a", models=["llama3.2:latest"])
    fleet.store.save_models(fleet.cloud.find("gpu-a").id,
                            [{"name": "llama3.2:latest", "model": "llama3.2:latest",
                              "details": {"family": "llama"}}], 0)
    engine = await fleet.start()
    assert engine.shown("llama3.2") == (
        b'{"license":"","modelfile":"","parameters":"","template":"",'
        b'"details":{"family":"llama"},"model_info":{},"capabilities":[]}')
    engine.remember_show("llama3.2:latest", b'{"modelfile":"FROM x"}')
    assert engine.shown("llama3.2") == b'{"modelfile":"FROM x"}'
    assert engine.shown("nope") is None


async def test_a_failed_node_is_tried_again_only_before_its_first_byte(fleet: Fleet) -> None:
    engine = await fleet.start()
    assert [engine.route_again(n, answered=False) for n in range(1, FAILOVER_ATTEMPTS + 1)] == \
        [True] * (FAILOVER_ATTEMPTS - 1) + [False]
    assert not engine.route_again(1, answered=True)
