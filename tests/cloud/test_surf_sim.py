"""SurfProvider against the simulated SURF API over a real loopback socket; the sim's status
walk runs on a FakeClock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from gpuctl.cloud.surf import SurfProvider
from gpuctl.engine.clock import FakeClock
from gpuctl.errors import ActionRefused, CloudRateLimited, CredentialsError, GpuNotFound
from gpuctl.sim.cloud import SimCloud
from gpuctl.sim.servers import running
from gpuctl.sim.surf_api import RESUME_FAILURE, SurfApiSim


@dataclass
class Env:
    sim: SurfApiSim
    clock: FakeClock
    provider: SurfProvider
    sleeps: list[float]


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    clock = FakeClock()
    sim = SurfApiSim(token="tok", clock=clock, page_size=3, resume_seconds=90,
                     pause_seconds=40, failed_resume_seconds=600)
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async with running(sim) as url:
        provider = SurfProvider(f"{url}/v1", "tok", name_filter="ollama", sleep=sleep)
        try:
            yield Env(sim, clock, provider, sleeps)
        finally:
            await provider.aclose()


async def test_list_reads_every_page_and_filters(env: Env) -> None:
    for i in range(7):
        env.sim.add(f"ollama-{i}")
    env.sim.add("ollama-deleted", deleted=True)
    env.sim.add("ollama-volume", application_type="Storage")
    env.sim.add("rstudio")

    names = [ws.name for ws in await env.provider.list_workspaces()]

    assert names == [f"ollama-{i}" for i in range(7)]
    pages = [p for m, p in env.sim.requests if p.endswith("/workspaces/")]
    assert len(pages) == 3  # 7 Compute, not deleted, in pages of 3


async def test_resume_walks_paused_resuming_running_on_the_clock(env: Env) -> None:
    ws = env.sim.add("ollama-a")

    after_post = await env.provider.resume(ws.id)
    await env.clock.advance(89)
    still = await env.provider.get_workspace(ws.id)
    await env.clock.advance(1)
    done = await env.provider.get_workspace(ws.id)

    assert (after_post.status, still.status, done.status) == ("resuming", "resuming", "running")
    assert done.can_pause and not done.can_resume
    assert (done.last_action, done.last_action_status) == ("resume", "success")
    assert env.sim.resume_posts[ws.id] == 1


async def test_a_second_resume_is_refused_as_already_resuming(env: Env) -> None:
    ws = env.sim.add("ollama-a")
    await env.provider.resume(ws.id)

    with pytest.raises(ActionRefused, match="already resuming"):
        await env.provider.resume(ws.id)
    assert env.sim.resume_posts[ws.id] == 2  # the refused one was sent, and counted


async def test_a_failed_resume_falls_back_to_paused_with_the_cloud_reason(env: Env) -> None:
    ws = env.sim.add("ollama-a")
    env.sim.fail_next_resume(ws.id)

    await env.provider.resume(ws.id)
    await env.clock.advance(600)
    back = await env.provider.get_workspace(ws.id)

    assert back.status == "paused"
    assert (back.last_action, back.last_action_status) == ("resume", "failed")
    assert back.last_action_error == RESUME_FAILURE


async def test_pause_walks_running_pausing_paused(env: Env) -> None:
    ws = env.sim.add("ollama-a", status="running")

    first = await env.provider.pause(ws.id)
    await env.clock.advance(40)
    done = await env.provider.get_workspace(ws.id)

    assert (first.status, done.status) == ("pausing", "paused")
    assert env.sim.pause_posts[ws.id] == 1


async def test_injected_faults_are_retried_then_surface(env: Env) -> None:
    env.sim.add("ollama-a")
    env.sim.fail_requests(2, status=500)
    assert len(await env.provider.list_workspaces()) == 1
    assert env.sleeps == [0.5, 1.0]

    env.sim.fail_requests(1, status=429, retry_after=2)
    assert len(await env.provider.list_workspaces()) == 1
    assert env.sleeps[-1] == 2.0

    env.sim.fail_requests(10, status=429, retry_after=1)
    with pytest.raises(CloudRateLimited):
        await env.provider.list_workspaces()


async def test_wrong_token_and_unknown_id(env: Env) -> None:
    env.sim.fail_requests(1, status=401)
    with pytest.raises(CredentialsError):
        await env.provider.list_workspaces()
    with pytest.raises(GpuNotFound):
        await env.provider.get_workspace("no-such-id")


async def test_the_api_is_a_face_over_one_sim_cloud() -> None:
    clock = FakeClock()
    cloud = SimCloud(clock, resume_seconds=30)
    machine = cloud.add("ollama-a")
    sim = SurfApiSim(cloud=cloud, token="tok")
    async with running(sim) as url:
        provider = SurfProvider(f"{url}/v1", "tok", name_filter="ollama")
        try:
            over_http = await provider.resume(machine.id)
            direct = await cloud.get_workspace(machine.id)
            await clock.advance(30)
            later = await provider.get_workspace(machine.id)
        finally:
            await provider.aclose()

    assert (over_http.status, direct.status, later.status) == ("resuming", "resuming", "running")
    assert cloud.resume_calls[machine.id] == sim.resume_posts[machine.id] == 1
    assert (later.last_action, later.last_action_status) == ("resume", "success")
