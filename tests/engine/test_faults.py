"""The fault runs of issue 9 that the engine alone decides, on the fake clock.

Each test here failed on the code before issue 9: a resume recorded but never sent cost a
full startup timeout after a restart, and a flaky cloud made a model that exists "not found".
"""

from __future__ import annotations

import pytest

from gpuctl.engine import GpuState
from gpuctl.engine.actions import BRIDGE_SECONDS, CLOUD_POLL_SECONDS, DEAD_NODE_SECONDS
from gpuctl.errors import ActionUncertain, ModelNotFound, Unavailable, WakeFailed

from .world import Fleet

LLAMA = [{"name": "llama3.2:latest", "model": "llama3.2:latest"}]


async def test_a_resume_recorded_but_never_sent_is_sent_at_once_after_a_restart(
    fleet: Fleet,
) -> None:
    """SIGKILL between recording a resume and sending it: the store says "resuming", the
    cloud never heard of it. The next engine looks at once and sends it."""
    fleet.configure(timing={"startup_timeout_seconds": 600})
    machine = fleet.cloud.add("gpu-a", models=["llama3.2:latest"])
    fleet.store.save_models(machine.id, LLAMA, 0)
    fleet.store.begin_action(machine.id, "resume", fleet.clock.wall() - 20)
    engine = await fleet.start()
    request = fleet.spawn(engine.acquire("llama3.2", "alice"))
    await fleet.clock.settle()
    assert fleet.cloud.resume_calls[machine.id] == 1  # sent now, not after 600 s
    waited = await fleet.until(request.done)
    assert request.result().gpu_name == "gpu-a"
    assert waited <= 120 + 5 + 5  # the cloud's resume and Ollama's start, nothing more
    assert fleet.cloud.total_resumes == 1
    assert fleet.store.pending_actions() == {}


async def test_an_adopted_resume_the_cloud_did_get_is_not_sent_again(fleet: Fleet) -> None:
    machine = fleet.cloud.add("gpu-a", models=["llama3.2:latest"])
    fleet.store.save_models(machine.id, LLAMA, 0)
    fleet.store.begin_action(machine.id, "resume", fleet.clock.wall())
    fleet.cloud.resume_now(machine.id)  # sent by the previous engine, then it died
    await fleet.advance(30)
    engine = await fleet.start()
    request = fleet.spawn(engine.acquire("llama3.2", "alice"))
    waited = await fleet.until(request.done)
    assert waited <= 90 + 5 + 5
    assert fleet.cloud.total_resumes == 1


async def test_a_model_on_gpus_that_could_not_be_woken_is_503_not_404(fleet: Fleet) -> None:
    """A fleet never seen awake; the resumes of both GPUs that have the model fail; the third
    GPU lacks it. The model may well exist: 503 with the reasons and a Retry-After."""
    fleet.cloud.add("gpu-a", models=["llama3.1:8b"], failed_resume_seconds=30)
    fleet.cloud.add("gpu-b", models=["llama3.1:8b"], failed_resume_seconds=30)
    fleet.cloud.add("gpu-c", models=["qwen2.5:7b"])
    fleet.cloud.fail_next_resume("gpu-a")
    fleet.cloud.fail_next_resume("gpu-b")
    engine = await fleet.start()
    request = fleet.spawn(engine.acquire("llama3.1:8b", "alice"))
    await fleet.until(request.done)
    with pytest.raises(WakeFailed) as err:
        request.result()
    assert err.value.message.startswith("could not wake any GPU with llama3.1:8b: ")
    assert "gpu-a" in err.value.message and "gpu-b" in err.value.message
    assert err.value.http_status == 503 and err.value.retry_after >= 10
    assert engine.gpu("gpu-c").models == ["qwen2.5:7b"]  # the third was woken and looked at


async def test_a_model_no_gpu_has_is_still_404_once_every_gpu_was_seen(fleet: Fleet) -> None:
    fleet.cloud.add("gpu-a", models=["llama3.1:8b"], failed_resume_seconds=30)
    fleet.cloud.add("gpu-b", models=["qwen2.5:7b"])
    engine = await fleet.start()
    request = fleet.spawn(engine.acquire("lama3.1:8b", "alice"))
    await fleet.until(request.done)
    with pytest.raises(ModelNotFound):
        request.result()


async def test_a_dead_node_on_a_running_gpu_is_marked_failed_in_seconds_and_another_wakes(
    fleet: Fleet, caplog: pytest.LogCaptureFixture,
) -> None:
    """A fleet never seen: gpu-a runs but its Ollama is dead; gpu-b is paused. The request
    moves to gpu-b after a short probe of gpu-a, not after the 120 s readiness wait, and the
    log does not call it a failed resume (none was sent)."""
    fleet.cloud.add("gpu-a", status="running", ollama_up=False)
    fleet.cloud.add("gpu-b")
    engine = await fleet.start()
    request = fleet.spawn(engine.acquire("llama3.2", "alice"))
    waited = await fleet.until(request.done)
    assert request.result().gpu_name == "gpu-b"
    assert waited <= DEAD_NODE_SECONDS + 2 + 120 + 5 + 5  # probe, then gpu-b's resume
    assert engine.gpu("gpu-a").state is GpuState.UNAVAILABLE
    assert fleet.cloud.resume_calls[fleet.cloud.find("gpu-a").id] == 0
    assert "resume of gpu-a failed" not in caplog.text
    assert "gpu-a is running but its Ollama did not answer for 10 s" in caplog.text
    assert engine.metrics().wake_failures == 0

    # Its Ollama comes back: the next poll's probe makes it serve again.
    engine.release(request.result())
    fleet.cloud.find("gpu-a").ollama_up = True
    await fleet.advance(10)
    assert engine.gpu("gpu-a").state is GpuState.IDLE


async def test_before_the_cloud_first_lists_the_fleet_no_model_is_not_found(
    fleet: Fleet,
) -> None:
    fleet.cloud.add("gpu-a")
    fleet.cloud.fail_calls(1)  # the list at start fails: the engine knows no GPU yet
    engine = await fleet.start()
    with pytest.raises(Unavailable) as err:
        await engine.acquire("llama3.2", "alice")
    assert "not known yet" in err.value.message and err.value.retry_after == 10
    await fleet.advance(10)  # the next poll lists it: the request is held for a wake now
    request = fleet.spawn(engine.acquire("llama3.2", "alice"))
    await fleet.until(request.done)
    assert request.result().gpu_name == "gpu-a"


async def test_a_cold_overloads_retry_after_is_when_the_line_moves_and_counts_down(
    fleet: Fleet,
) -> None:
    """A full queue on a waking GPU: come back when the GPU is up (the resume left and a
    load), not after the whole line priced at a guessed 20 s per round."""
    fleet.configure(server={"max_queue": 8})
    machine = fleet.cloud.add("gpu-a")
    fleet.store.save_models(machine.id, LLAMA, 0)
    fleet.store.record_resume(machine.id, 120.0, ok=True, at=0)
    engine = await fleet.start()
    waiting = [fleet.spawn(engine.acquire("llama3.2", f"u{i}")) for i in range(8)]
    await fleet.clock.settle()
    with pytest.raises(Unavailable, match="queue is full") as first:
        await engine.acquire("llama3.2", "late")
    assert first.value.retry_after == pytest.approx(120 + 15, abs=1)  # resume + a load
    await fleet.advance(60)
    with pytest.raises(Unavailable, match="queue is full") as later:
        await engine.acquire("llama3.2", "later")
    assert later.value.retry_after == pytest.approx(60 + 15, abs=1)
    await fleet.until(lambda: all(t.done() for t in waiting))


async def test_an_unanswered_resume_is_watched_then_sent_again_once_nothing_moves(
    fleet: Fleet,
) -> None:
    """A resume POST that timed out may still be acted on: not resent at once (that could
    start a second action), but once the cloud shows nothing for its bridge time."""
    machine = fleet.cloud.add("gpu-a")
    fleet.store.save_models(machine.id, LLAMA, 0)
    engine = await fleet.start()
    fleet.cloud.fail_calls(1, ActionUncertain("SURF API did not answer the resume of gpu-a"))
    request = fleet.spawn(engine.acquire("llama3.2", "alice"))
    await fleet.advance(30)
    assert fleet.cloud.resume_calls[machine.id] == 0  # the lost one never reached the sim
    waited = await fleet.until(request.done)
    assert request.result().gpu_name == "gpu-a"
    assert fleet.cloud.resume_calls[machine.id] == 1  # sent again after the bridge time
    assert 30 + waited <= BRIDGE_SECONDS + CLOUD_POLL_SECONDS + 120 + 5 + 5
