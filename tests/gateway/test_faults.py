"""The fault runs of issue 9 over real sockets: the gateway as ``serve`` runs it, simulated
nodes as HTTP servers, the real ``ollama`` client; cloud time on the fake clock."""

from __future__ import annotations

import asyncio
import json

import ollama
import pytest

from gpuctl.engine import GpuState
from gpuctl.engine.actions import DEAD_NODE_SECONDS
from gpuctl.sim.waiting import eventually

from .world import GpuSpec, WorldFactory

LLAMA = ["llama3.2:latest"]


async def test_a_node_killed_mid_stream_ends_that_stream_and_the_next_request_moves_on(
    make_world: WorldFactory, caplog: pytest.LogCaptureFixture,
) -> None:
    """gpu-a's node dies mid-stream and stays dead; gpu-b is paused. The stream ends with an
    error line; the next request wakes gpu-b after a short probe of gpu-a, not after the
    readiness wait, and nothing says a resume of gpu-a failed."""
    async with make_world(GpuSpec("gpu-a", chunks=5), GpuSpec("gpu-b", status="paused"),
                          known={"gpu-a": LLAMA, "gpu-b": LLAMA}) as world:
        world.nodes["gpu-a"].die_after = 2
        world.cloud.find("gpu-a").ollama_up = False  # and it does not come back
        client = world.ollama()
        seen: list[str] = []
        with pytest.raises(ollama.ResponseError) as caught:
            async for part in await client.chat(model="llama3.2", messages=[], stream=True):
                seen.append(part.message.content or "")
        assert seen == ["tok0 ", "tok1 "]
        assert "gpu-a failed mid-stream" in caught.value.error

        nxt = asyncio.ensure_future(client.chat(model="llama3.2", messages=[], stream=False))
        await eventually(lambda: world.engine.queue_depth() == 1)
        started = world.clock.now()
        await world.until(nxt.done)
        waited = world.clock.now() - started
        answer = await nxt
        assert answer.message.content
        assert world.nodes["gpu-b"].requests["/api/chat"] == 1
        # A short probe of gpu-a, then gpu-b's 60 s resume and 5 s start, with the poll
        # pacing's slack: well below the 120 s readiness wait alone (before: 120 + 65 s).
        assert DEAD_NODE_SECONDS + 60 + 5 <= waited < 120
        assert world.gpu("gpu-a").state is GpuState.UNAVAILABLE
        assert "resume of gpu-a failed" not in caplog.text
        assert world.cloud.resume_calls[world.cloud.find("gpu-a").id] == 0


@pytest.mark.parametrize(("rate", "acted"), [(0.3, False), (0.5, False), (0.5, True)])
async def test_a_cold_start_through_a_flaky_cloud_serves_everyone_and_never_says_not_found(
    make_world: WorldFactory, rate: float, acted: bool,
) -> None:
    """Fault run 3 of issue 9: a fleet never seen awake (models unknown), the SURF API
    answering 500 to a share of all requests (``acted``: after carrying the action out), 20
    clients at once. Before: the resumes of the two GPUs with the model got 500, the third
    (without it) was woken, and all 20 were told the model does not exist. The seed is one
    whose faults hit resume POSTs (asserted), and the run repeats exactly."""
    specs = (GpuSpec("gpu-a", status="paused", models=("llama3.1:8b",)),
             GpuSpec("gpu-b", status="paused", models=("llama3.1:8b",)),
             GpuSpec("gpu-c", status="paused", models=("qwen2.5:7b",)))
    async with make_world(*specs, slots=4, cloud_api=True) as world:
        assert world.surf is not None
        world.surf.fail_randomly(rate, seed=4, acted=acted)
        client = world.ollama()
        calls = [asyncio.ensure_future(
            client.chat(model="llama3.1:8b", messages=[], stream=False)) for _ in range(20)]
        world.tasks.extend(calls)
        await eventually(lambda: world.engine.queue_depth() == 20)
        await world.until(lambda: all(c.done() for c in calls), limit=1200)
        errors = [c.exception() for c in calls if c.exception() is not None]
        assert errors == []
        assert all((c.result().message.content or "") for c in calls)
        assert world.cloud.find("gpu-c").status == "paused"  # never woken to look
        # The faults hit the resume POSTs too (this seed), and those were sent again.
        faulted = [p for m, p in world.surf.faulted if m == "POST" and p.endswith("/resume/")]
        assert faulted
        # A resume the cloud took despite its 500 is read back, never sent twice.
        assert all(n == 1 for n in world.surf.resume_posts.values())


async def test_a_client_leaving_right_after_the_done_line_still_has_its_tokens_counted(
    make_world: WorldFactory,
) -> None:
    """The likely cause of the "0 tokens" drained requests of issue 9: the client read the
    ``done`` line (with the counts) and closed before the body's end; its disconnect
    cancelled the request before the counts were parsed, so usage said 0 tokens."""
    async with make_world(GpuSpec("gpu-1", chunks=3)) as world:
        world.nodes["gpu-1"].linger = 0.5
        async with world.client() as c, \
                c.stream("POST", "/api/chat", json={"model": "llama3.2"}) as r:
            async for line in r.aiter_lines():
                if json.loads(line)["done"]:
                    break  # leaving the block closes the connection before the body's end
        await eventually(lambda: world.gpu("gpu-1").slots_in_use == 0)
        usage = world.store.usage()["alice"]
        assert (usage.requests, usage.tokens_out) == (1, 3)
        assert usage.tokens_in > 0


async def test_a_gpu_the_cloud_cannot_resume_is_a_503_with_retry_after_and_no_cloud_url(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-a", status="paused"), known={"gpu-a": LLAMA},
                          cloud_api=True) as world, world.client() as c:
        assert world.surf is not None
        world.surf.fail_randomly(1.0, seed=1)  # the cloud answers 500 to everything now
        answer = asyncio.ensure_future(
            c.post("/api/chat", json={"model": "llama3.2", "stream": False}))
        await eventually(lambda: world.engine.queue_depth() == 1)
        await world.until(answer.done)
        r = await answer
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 10
        message = r.json()["error"]
        assert message.startswith("could not wake any GPU with llama3.2:latest: ")
        assert "resume gpu-a: " in message and "HTTP 500 (tried 5 times)" in message
        machine = world.cloud.find("gpu-a")
        assert machine.id not in message and "/v1/" not in message and "refused" not in message
