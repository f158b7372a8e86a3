"""The demo's lifecycle log: one line per event, from successive fleet snapshots."""

from __future__ import annotations

from typing import Any

from gpuctl.engine.api import GpuState, GpuView, LeaseView
from gpuctl.sim.narration import LifecycleLog


def view(state: GpuState, *users: str, **fields: Any) -> GpuView:
    return GpuView(id="ws-1", name="gpu-1", state=state, cloud_status="x",
                   models=["llama3.2:latest", "qwen2.5:7b"],
                   leases=[LeaseView(user=u, expires_in_seconds=30) for u in users], **fields)


def test_the_first_snapshot_says_nothing() -> None:
    assert LifecycleLog().update([view(GpuState.IDLE, "alice")], 0.0) == []


def test_a_wake_is_told_with_its_estimate_then_ready_with_the_time_it_took() -> None:
    log = LifecycleLog()
    log.update([view(GpuState.PAUSED)], 0.0)
    assert log.update([view(GpuState.STARTING, estimated_resume_seconds=5.2)], 1.0) == [
        "gpu-1  waking up (about 5 s)"]
    assert log.update([view(GpuState.STARTING)], 2.0) == []
    assert log.update([view(GpuState.ACTIVE)], 6.5) == [
        "gpu-1  ready after 5.5 s: llama3.2:latest, qwen2.5:7b"]


def test_busy_and_active_changes_of_a_ready_gpu_are_not_events() -> None:
    log = LifecycleLog()
    log.update([view(GpuState.IDLE)], 0.0)
    assert log.update([view(GpuState.BUSY)], 1.0) == []
    assert log.update([view(GpuState.IDLE)], 2.0) == []


def test_an_expired_lease_is_told_before_the_pause_it_allows() -> None:
    log = LifecycleLog()
    log.update([view(GpuState.IDLE, "alice", "bob")], 0.0)
    assert log.update([view(GpuState.PAUSING, "bob")], 1.0) == [
        "gpu-1  lease of alice expired", "gpu-1  pausing: no lease, no request, nothing queued"]
    assert log.update([view(GpuState.PAUSED)], 3.0) == [
        "gpu-1  lease of bob expired", "gpu-1  paused"]


def test_an_unavailable_gpu_is_told_with_its_error() -> None:
    log = LifecycleLog()
    log.update([view(GpuState.STARTING)], 0.0)
    assert log.update([view(GpuState.UNAVAILABLE, last_error="Ollama did not answer")], 9.0) == [
        "gpu-1  unavailable: Ollama did not answer"]
