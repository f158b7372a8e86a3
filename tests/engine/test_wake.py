"""Wake on demand: single-flight resumes, holding requests, failover, learning models."""

from __future__ import annotations

import asyncio

import pytest

from gpuctl.engine import GpuState, Progress
from gpuctl.errors import ModelNotFound, WakeFailed

from .world import Fleet, done_tickets


async def test_ten_requests_on_a_paused_fleet_send_one_resume_and_all_complete(
    fleet: Fleet,
) -> None:
    fleet.cloud.add("gpu-a", models=["llama3.2:latest"])
    fleet.cloud.add("gpu-b", models=["llama3.2:latest"])
    engine = await fleet.start()
    tasks = [fleet.spawn(engine.acquire("llama3.2", f"user{i % 3}")) for i in range(10)]
    await fleet.clock.settle()
    assert fleet.cloud.total_resumes == 1
    assert engine.queue_depth() == 10

    served = 0
    while served < 10:
        await fleet.advance(5)
        for ticket in done_tickets(tasks):
            if ticket.id > 0:
                engine.release(ticket)
                served += 1
        tasks = [t for t in tasks if not t.done()]
        assert fleet.clock.now() < 1_000 + 900, "requests were not served in time"

    assert fleet.cloud.total_resumes == 1
    assert engine.queue_depth() == 0


async def test_concurrent_admin_wakes_share_one_resume(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a")
    engine = await fleet.start()
    first = fleet.spawn(engine.wake("gpu-a", wait=True))
    second = fleet.spawn(engine.wake("gpu-a", wait=True))
    await fleet.until(lambda: first.done() and second.done())
    assert first.result().success and second.result().success
    assert fleet.cloud.total_resumes == 1
    assert engine.gpu("gpu-a").state is GpuState.IDLE


async def test_wake_reports_stages_until_ollama_answers(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a")
    engine = await fleet.start()
    stages: list[str] = []
    task = fleet.spawn(engine.wake("gpu-a", wait=True, progress=lambda p: stages.append(p.stage)))
    await fleet.until(task.done)
    assert stages == ["resuming", "running", "ollama_ready"]


async def test_request_is_held_through_the_resume_and_told_why(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a")
    engine = await fleet.start()
    seen: list[Progress] = []
    task = fleet.spawn(engine.acquire("llama3.2", "alice", progress=seen.append))
    waited = await fleet.until(task.done)
    ticket = task.result()
    assert ticket.gpu_name == "gpu-a"
    assert 120 <= waited <= 140  # resume (120 s) + Ollama start (5 s), polled
    assert ticket.waited_seconds == pytest.approx(waited, abs=1)
    assert [p.stage for p in seen][:1] == ["queued"]
    assert "resuming" in [p.stage for p in seen]
    assert seen[-1].stage == "ollama_ready"


async def test_a_failed_resume_falls_over_to_the_next_gpu(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a", resume_seconds=60)
    fleet.cloud.add("gpu-b", resume_seconds=200)
    fleet.cloud.fail_next_resume("gpu-a")
    # Both had the model when last seen; gpu-a resumed faster before, so it goes first.
    for name, seconds in (("gpu-a", 60.0), ("gpu-b", 200.0)):
        gpu_id = fleet.cloud.find(name).id
        fleet.store.save_models(gpu_id, [{"name": "llama3.2:latest",
                                          "model": "llama3.2:latest"}], 0)
        fleet.store.record_resume(gpu_id, seconds, ok=True, at=0)
    engine = await fleet.start()
    task = fleet.spawn(engine.acquire("llama3.2", "alice"))
    await fleet.until(task.done)
    ticket = task.result()
    assert ticket.gpu_name == "gpu-b"
    assert fleet.cloud.resume_calls == {fleet.cloud.find("gpu-a").id: 1,
                                        fleet.cloud.find("gpu-b").id: 1}
    assert "Timeout waiting for VM to resume." in (engine.gpu("gpu-a").last_error or "")


async def test_all_resumes_failing_fails_the_request_with_the_reasons(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a", resume_seconds=60)
    fleet.cloud.fail_next_resume("gpu-a")
    fleet.store.save_models(fleet.cloud.find("gpu-a").id,
                            [{"name": "llama3.2:latest", "model": "llama3.2:latest"}], 0)
    engine = await fleet.start()
    task = fleet.spawn(engine.acquire("llama3.2", "alice"))
    await fleet.until(task.done)
    with pytest.raises(WakeFailed, match="Timeout waiting for VM to resume"):
        task.result()
    assert engine.queue_depth() == 0


async def test_unknown_model_answers_like_ollama_without_waking_known_gpus(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a")
    fleet.store.save_models(fleet.cloud.find("gpu-a").id,
                            [{"name": "llama3.2:latest", "model": "llama3.2:latest"}], 0)
    engine = await fleet.start()
    with pytest.raises(ModelNotFound) as err:
        await engine.acquire("lama3.2", "alice")
    assert str(err.value) == 'model "lama3.2" not found, try pulling it first'
    assert fleet.cloud.total_resumes == 0


async def test_a_typo_wakes_a_never_seen_gpu_once_to_learn_its_models(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a", models=["llama3.2:latest"])
    engine = await fleet.start()
    first = fleet.spawn(engine.acquire("lama3.2", "alice"))
    await fleet.until(first.done)
    with pytest.raises(ModelNotFound):
        first.result()
    assert fleet.cloud.total_resumes == 1
    assert engine.gpu("gpu-a").models == ["llama3.2:latest"]

    # Paused again, restarted: what it learnt is persisted, so the typo wakes nothing.
    await fleet.until(lambda: fleet.cloud.find("gpu-a").status == "paused", limit=4000)
    await engine.stop()
    engine = await fleet.start()
    with pytest.raises(ModelNotFound):
        await engine.acquire("lama3.2", "bob")
    assert fleet.cloud.total_resumes == 1


async def test_wake_times_out_but_the_resume_goes_on(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a")
    engine = await fleet.start()
    task = fleet.spawn(engine.wake("gpu-a", wait=True, timeout=30))
    await fleet.until(task.done)
    with pytest.raises(WakeFailed, match="not ready within 30 s"):
        task.result()
    await fleet.until(lambda: engine.gpu("gpu-a").state is GpuState.IDLE)
    assert fleet.cloud.total_resumes == 1


async def test_cancelled_waiting_acquire_frees_its_queue_place(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a")
    engine = await fleet.start()
    task = fleet.spawn(engine.acquire("llama3.2", "alice"))
    await fleet.clock.settle()
    assert engine.queue_depth() == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert engine.queue_depth() == 0


async def test_a_long_queue_wakes_a_paused_gpu_with_the_model_too(fleet: Fleet) -> None:
    fleet.configure(gpu={"slots": 1})
    fleet.cloud.add("gpu-a", status="running")
    paused = fleet.cloud.add("gpu-b")
    fleet.store.save_models(paused.id, [{"name": "llama3.2:latest",
                                         "model": "llama3.2:latest"}], 0)
    engine = await fleet.start()
    held = await engine.acquire("llama3.2", "alice")
    # Default estimates: 20 s per request, 195 s to wake and load. 20 queued: 400 s > 195 s.
    tasks = [fleet.spawn(engine.acquire("llama3.2", f"user{i}")) for i in range(20)]
    await fleet.advance(10)
    assert fleet.cloud.resume_calls == {paused.id: 1}
    await fleet.until(lambda: any(t.done() and t.result().gpu_id == paused.id for t in tasks))
    assert held.gpu_name == "gpu-a"


async def test_a_short_queue_does_not_wake_another_gpu(fleet: Fleet) -> None:
    fleet.configure(gpu={"slots": 1})
    fleet.cloud.add("gpu-a", status="running")
    paused = fleet.cloud.add("gpu-b")
    fleet.store.save_models(paused.id, [{"name": "llama3.2:latest",
                                         "model": "llama3.2:latest"}], 0)
    engine = await fleet.start()
    await engine.acquire("llama3.2", "alice")
    for i in range(3):
        fleet.spawn(engine.acquire("llama3.2", f"user{i}"))
    await fleet.advance(60)
    assert fleet.cloud.total_resumes == 0


async def test_a_cloud_outage_at_start_is_retried_not_fatal(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a", status="running")
    fleet.cloud.fail_calls(1)
    engine = await fleet.start()
    assert engine.gpus() == []
    await fleet.advance(10)
    assert [g.name for g in engine.gpus()] == ["gpu-a"]


async def test_wake_picks_a_gpu_known_to_have_the_model_then_the_fastest_resumer(
    fleet: Fleet,
) -> None:
    never_seen = fleet.cloud.add("gpu-0-unknown")
    slow = fleet.cloud.add("gpu-1-slow")
    fast = fleet.cloud.add("gpu-2-fast")
    other = fleet.cloud.add("gpu-3-other", models=["qwen3:8b"])
    for machine, seconds in ((slow, 300.0), (fast, 90.0), (other, 30.0)):
        fleet.store.save_models(machine.id, [{"name": m, "model": m} for m in machine.models], 0)
        fleet.store.record_resume(machine.id, seconds, ok=True, at=0)
    engine = await fleet.start()
    assert engine.gpu("gpu-2-fast").estimated_resume_seconds == 90
    task = fleet.spawn(engine.acquire("llama3.2", "alice"))
    await fleet.until(task.done)
    assert task.result().gpu_id == fast.id
    assert fleet.cloud.resume_calls == {fast.id: 1}
    assert never_seen.status == "paused"


async def test_wake_without_wait_returns_once_the_cloud_accepted(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a")
    fleet.cloud.add("gpu-b", status="running", ollama_seconds=300)
    engine = await fleet.start()
    result = await engine.wake("gpu-a")
    assert result.success and result.message.startswith("resuming gpu-a")
    assert engine.gpu("gpu-a").state is GpuState.STARTING
    running = await engine.wake("gpu-b")  # up in the cloud, Ollama not yet: no cloud call
    assert running.success
    assert fleet.cloud.resume_calls == {fleet.cloud.find("gpu-a").id: 1}


async def test_a_resume_slower_than_the_startup_timeout_fails_with_the_reason(
    fleet: Fleet,
) -> None:
    fleet.cloud.add("gpu-a", resume_seconds=700)
    engine = await fleet.start()
    task = fleet.spawn(engine.wake("gpu-a", wait=True))
    await fleet.until(task.done, step=10)
    with pytest.raises(WakeFailed, match=r"still 'resuming' after 600 s"):
        task.result()
    assert engine.metrics().wake_failures == 1


async def test_ollama_that_never_answers_fails_the_wake_after_the_readiness_wait(
    fleet: Fleet,
) -> None:
    fleet.cloud.add("gpu-a", ollama_up=False)
    engine = await fleet.start()
    task = fleet.spawn(engine.wake("gpu-a", wait=True))
    waited = await fleet.until(task.done)
    with pytest.raises(WakeFailed, match=r"did not answer within 120 s"):
        task.result()
    assert 240 <= waited <= 250  # 120 s resume + 120 s readiness wait
    await fleet.advance(20)
    # Running with a dead Ollama costs credits and serves nobody: it is paused.
    assert fleet.cloud.total_pauses == 1


async def test_an_admin_wake_and_waiting_requests_share_one_resume(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a")
    engine = await fleet.start()
    admin = fleet.spawn(engine.wake("gpu-a", wait=True))
    await fleet.advance(30)
    request = fleet.spawn(engine.acquire("llama3.2", "alice"))
    await fleet.until(lambda: admin.done() and request.done())
    assert request.result().gpu_name == "gpu-a"
    assert fleet.cloud.total_resumes == 1


async def test_an_admin_pause_says_when_requests_are_in_flight(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a", status="running")
    engine = await fleet.start()
    await engine.acquire("llama3.2", "alice")
    result = await engine.pause("gpu-a")
    assert result.message == "pausing gpu-a (1 request in flight on it will fail)"
    assert engine.gpu("gpu-a").state is GpuState.PAUSING
    again = fleet.spawn(engine.pause("gpu-a", wait=True))
    await fleet.until(again.done)
    assert fleet.cloud.total_pauses == 1
    assert engine.gpu("gpu-a").state is GpuState.PAUSED


async def test_a_paused_twin_is_woken_before_a_gpu_still_pausing(fleet: Fleet) -> None:
    """A pausing GPU must first finish its pause: its twin, already paused, is up sooner."""
    fleet.cloud.add("gpu-a", status="running")
    fleet.cloud.add("gpu-b", models=["llama3.2:latest"])
    fleet.store.save_models(fleet.cloud.find("gpu-b").id,
                            [{"name": "llama3.2:latest", "model": "llama3.2:latest"}], 0)
    engine = await fleet.start()
    await fleet.advance(610)  # gpu-a's grace runs out: it starts pausing (60 s)
    assert engine.gpu("gpu-a").state is GpuState.PAUSING
    task = fleet.spawn(engine.acquire("llama3.2", "alice"))
    waited = await fleet.until(task.done)
    assert task.result().gpu_name == "gpu-b"
    assert fleet.cloud.resume_calls == {fleet.cloud.find("gpu-b").id: 1}
    assert waited <= 130  # a resume (120 s) and Ollama's start (5 s), not the pause too


async def test_a_resume_that_waited_for_a_pause_learns_only_the_resume(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a", status="running")
    engine = await fleet.start()
    await fleet.advance(610)
    assert engine.gpu("gpu-a").state is GpuState.PAUSING
    task = fleet.spawn(engine.acquire("llama3.2", "alice"))
    await fleet.until(task.done)
    [(seconds, ok)] = fleet.store.resume_history()[fleet.cloud.find("gpu-a").id]
    assert ok and seconds <= 130
