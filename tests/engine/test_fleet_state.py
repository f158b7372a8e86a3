"""Fleet state: discovery, derived states, races with the sync, restarts, vanishing GPUs."""

from __future__ import annotations

import logging

import pytest

from gpuctl.cloud.base import Workspace
from gpuctl.engine import GpuState
from gpuctl.errors import GpuNotFound, ModelNotFound, Unavailable, UsageError

from .world import Fleet


async def test_new_workspaces_appear_and_deleted_ones_leave(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a")
    engine = await fleet.start()
    assert [g.name for g in engine.gpus()] == ["gpu-a"]
    fleet.cloud.add("gpu-b")
    fleet.cloud.remove("gpu-a")
    await fleet.advance(10)
    assert [g.name for g in engine.gpus()] == ["gpu-b"]


async def test_states_follow_the_cloud_and_the_node(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a", status="running")
    fleet.cloud.add("gpu-b")
    fleet.cloud.add("gpu-c", status="running", ollama_up=False)
    engine = await fleet.start()
    states = {g.name: g.state for g in engine.gpus()}
    assert states == {"gpu-a": GpuState.IDLE, "gpu-b": GpuState.PAUSED,
                      "gpu-c": GpuState.STARTING}
    await fleet.advance(130, step=10)  # past ollama_readiness_wait_seconds
    assert engine.gpu("gpu-c").state is GpuState.UNAVAILABLE


async def test_an_unknown_cloud_status_is_in_progress_and_logged(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    fleet.cloud.add("gpu-a", status="hibernating")
    with caplog.at_level(logging.WARNING):
        engine = await fleet.start()
    assert engine.gpu("gpu-a").state is GpuState.STARTING
    assert "hibernating" in caplog.text


async def test_gpu_is_found_by_id_name_or_unique_prefix(fleet: Fleet) -> None:
    a = fleet.cloud.add("ollama-a10-1")
    fleet.cloud.add("ollama-a10-2")
    engine = await fleet.start()
    assert engine.gpu(a.id).name == "ollama-a10-1"
    assert engine.gpu("ollama-a10-1").id == a.id
    with pytest.raises(UsageError, match="ollama-a10-1, ollama-a10-2"):
        engine.gpu("ollama")
    with pytest.raises(GpuNotFound):
        engine.gpu("nope")


async def test_a_sync_never_flips_a_resuming_gpu_back_to_paused(fleet: Fleet) -> None:
    """The cloud may show 'paused' for a while after accepting a resume (SURF lags)."""
    machine = fleet.cloud.add("gpu-a")
    engine = await fleet.start()
    real_list = fleet.cloud.list_workspaces

    async def lagging_list() -> list[Workspace]:
        return [ws.model_copy(update={"status": "paused"}) for ws in await real_list()]

    fleet.cloud.list_workspaces = lagging_list  # type: ignore[method-assign]
    task = fleet.spawn(engine.wake("gpu-a", wait=True))
    await fleet.advance(30)
    await engine.refresh()
    assert machine.status == "resuming"
    assert engine.gpu("gpu-a").state is GpuState.STARTING
    await fleet.until(task.done)
    assert fleet.cloud.total_resumes == 1


async def test_a_sync_does_not_call_a_gpu_ready_before_ollama_answers(fleet: Fleet) -> None:
    machine = fleet.cloud.add("gpu-a", ollama_seconds=60)
    engine = await fleet.start()
    task = fleet.spawn(engine.wake("gpu-a", wait=True))
    await fleet.advance(125)
    assert machine.status == "running"
    await engine.refresh()
    assert engine.gpu("gpu-a").state is GpuState.STARTING
    await fleet.until(task.done)
    assert engine.gpu("gpu-a").state is GpuState.IDLE


async def test_the_engine_restarted_mid_resume_does_not_resume_twice(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a")
    first = await fleet.start()
    waiting = fleet.spawn(first.acquire("llama3.2", "alice"))
    await fleet.advance(40)
    assert fleet.cloud.total_resumes == 1
    await first.stop()
    await fleet.clock.settle()
    with pytest.raises(Unavailable, match="shutting down"):
        waiting.result()

    second = await fleet.start(store=fleet.reopen())
    assert second.gpu("gpu-a").state is GpuState.STARTING
    task = fleet.spawn(second.acquire("llama3.2", "alice"))
    await fleet.until(task.done)
    assert task.result().gpu_name == "gpu-a"
    assert fleet.cloud.total_resumes == 1
    assert second.metrics().resume_durations[-1] == pytest.approx(125, abs=6)


async def test_leases_survive_a_restart(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a", status="running")
    first = await fleet.start()
    first.release(await first.acquire("llama3.2", "alice"))
    await fleet.advance(100)
    await first.stop()
    second = await fleet.start(store=fleet.reopen())
    [lease] = second.gpu("gpu-a").leases
    assert lease.user == "alice"
    assert lease.expires_in_seconds == pytest.approx(500)


async def test_a_gpu_that_vanishes_mid_request_fails_that_request_cleanly(
    fleet: Fleet,
) -> None:
    fleet.configure(gpu={"slots": 1})
    fleet.cloud.add("gpu-a", status="running")
    fleet.cloud.add("gpu-b", status="running", models=["qwen3:8b"])
    engine = await fleet.start()
    running = await engine.acquire("llama3.2", "alice")
    queued = fleet.spawn(engine.acquire("llama3.2", "bob"))
    await fleet.clock.settle()
    fleet.cloud.remove("gpu-a")
    await engine.refresh()
    await fleet.clock.settle()
    assert [g.name for g in engine.gpus()] == ["gpu-b"]
    with pytest.raises(ModelNotFound):
        queued.result()
    engine.release(running, failed="connection refused")  # no error, nothing to free
    assert engine.queue_depth() == 0
    assert fleet.store.usage()["alice"].requests == 1


async def test_a_failed_request_marks_its_gpu_for_a_probe(fleet: Fleet) -> None:
    machine = fleet.cloud.add("gpu-a", status="running")
    engine = await fleet.start()
    ticket = await engine.acquire("llama3.2", "alice")
    machine.ollama_up = False
    engine.release(ticket, failed="upstream closed the connection")
    await fleet.clock.settle()
    view = engine.gpu("gpu-a")
    assert view.state is GpuState.STARTING
    assert view.last_error == "upstream closed the connection"


async def test_models_and_loaded_never_wake_a_gpu(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a", status="running", models=["llama3.2:latest", "qwen3:8b"],
                    loaded=["qwen3:8b"])
    fleet.cloud.add("gpu-b", models=["mistral:7b"])
    fleet.store.save_models(fleet.cloud.find("gpu-b").id,
                            [{"name": "mistral:7b", "model": "mistral:7b"}], 0)
    engine = await fleet.start()
    assert [m.name for m in engine.models()] == ["llama3.2:latest", "mistral:7b", "qwen3:8b"]
    assert [p["name"] for p in engine.loaded()] == ["qwen3:8b"]
    assert [g.name for g in engine.gpus_with_model("mistral")] == []
    assert [g.name for g in engine.gpus_with_model("mistral:7b")] == ["gpu-b"]
    assert fleet.cloud.total_resumes == 0


async def test_a_loaded_model_wins_over_one_on_disk(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a", status="running", models=["qwen3:8b"])
    fleet.cloud.add("gpu-b", status="running", models=["qwen3:8b"], loaded=["qwen3:8b"])
    engine = await fleet.start()
    ticket = await engine.acquire("qwen3:8b", "alice")
    assert ticket.gpu_name == "gpu-b"
    assert ticket.reason.startswith("model loaded")


async def test_metrics_count_wakes_pauses_and_slots(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a")
    engine = await fleet.start()
    task = fleet.spawn(engine.acquire("llama3.2", "alice"))
    await fleet.until(task.done)
    figures = engine.metrics()
    assert (figures.wakes, figures.pauses, figures.requests_granted) == (1, 0, 1)
    assert [(g.name, g.state, g.slots_in_use) for g in figures.gpus] == [
        ("gpu-a", GpuState.ACTIVE, 1)
    ]


async def test_a_restart_during_a_cloud_outage_still_adopts_the_resume(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a")
    first = await fleet.start()
    fleet.spawn(first.acquire("llama3.2", "alice"))
    await fleet.advance(20)
    await first.stop()
    fleet.cloud.fail_calls(1)
    store = fleet.reopen()
    second = await fleet.start(store=store)
    assert second.gpus() == []
    assert list(store.pending_actions()) == [fleet.cloud.find("gpu-a").id]  # not forgotten
    await fleet.advance(10)
    task = fleet.spawn(second.acquire("llama3.2", "alice"))
    await fleet.until(task.done)
    assert task.result().gpu_name == "gpu-a"
    assert fleet.cloud.total_resumes == 1


async def test_one_empty_listing_does_not_empty_the_fleet_but_two_do(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a", status="running")
    engine = await fleet.start()
    fleet.cloud.remove("gpu-a")
    await engine.refresh()
    assert [g.name for g in engine.gpus()] == ["gpu-a"]
    await engine.refresh()
    assert engine.gpus() == []
