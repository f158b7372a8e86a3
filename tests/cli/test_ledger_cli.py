"""A command records on the ledger the action it takes, not the fleet it happens to see."""

from __future__ import annotations

from pathlib import Path

from gpuctl.store import Store

from .conftest import Cloud, Gpuctl


def test_resume_records_its_action_as_by_hand_and_nothing_it_only_saw(
    cloud: Cloud, gpuctl_on: Gpuctl, gpuctl_home: Path,
) -> None:
    ws = cloud.sim.add("gpu-a", ip="127.0.0.1")
    cloud.sim.add("gpu-b", ip="127.0.0.1", status="running")
    result = gpuctl_on("resume", "gpu-a", "--wait")
    assert result.exit_code == 0, result.output
    store = Store.open(gpuctl_home / "state")
    events = [(e.gpu_id, e.status, e.cause) for e in store.ledger.timeline(1e12)]
    store.close()
    assert events == [(ws.id, "resuming", "hand")]
