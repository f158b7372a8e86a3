"""Holding and queueing through the engine: cold starts, competing users, 503s, SSE comments."""

from __future__ import annotations

import asyncio
import json

import httpx

from gpuctl.sim.waiting import eventually

from .world import GpuSpec, WorldFactory


async def test_cold_start_with_20_clients_sends_one_resume_and_answers_all(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1", status="paused"), slots=4) as world:
        clients = [world.ollama() for _ in range(4)]

        async def ask(i: int) -> str:
            client = clients[i % 4]
            if i % 2:
                parts = [p.message.content async for p in await client.chat(
                    model="llama3.2", messages=[{"role": "user", "content": str(i)}],
                    stream=True)]
                return "".join(c or "" for c in parts)
            answer = await client.chat(model="llama3.2",
                                       messages=[{"role": "user", "content": str(i)}])
            return answer.message.content or ""

        tasks = [asyncio.ensure_future(ask(i)) for i in range(20)]
        world.tasks += tasks
        await eventually(lambda: world.engine.queue_depth() == 20)
        await world.until(lambda: world.gpu("gpu-1").state.ready)
        answers = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert answers == ["tok0 tok1 tok2 tok3 "] * 20
        assert world.cloud.total_resumes == 1
        async with world.client() as c:
            metrics = (await c.get("/metrics")).text
        assert "gpuctl_wakes_total 1.0" in metrics
        assert 'gpuctl_resume_seconds{stat="count"} 1.0' in metrics


async def test_second_user_waits_for_the_only_slot_then_is_served(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1", chunks=3), slots=1) as world:
        node = world.nodes["gpu-1"]
        node.hold_after = 1
        _, bob_key = world.keys.create("bob")
        async with world.client() as alice, world.client(bob_key) as bob:
            async with alice.stream("POST", "/api/chat", json={"model": "llama3.2"}) as first:
                lines = first.aiter_lines()
                assert json.loads(await lines.__anext__())["done"] is False
                waiting = asyncio.ensure_future(
                    bob.post("/api/chat", json={"model": "llama3.2", "stream": False}))
                world.tasks.append(waiting)
                await eventually(lambda: world.engine.queue_depth() == 1)
                assert not waiting.done()
                node.release()
                rest = [json.loads(line) async for line in lines]
                assert rest[-1]["done"] is True
            second = await asyncio.wait_for(waiting, 5)
        assert second.status_code == 200
        assert second.headers["x-gpuctl-gpu"] == "gpu-1"


async def test_full_queue_gets_503_with_retry_after(make_world: WorldFactory) -> None:
    async with make_world(GpuSpec("gpu-1"), slots=1, max_queue=0) as world:
        node = world.nodes["gpu-1"]
        node.hold_after = 1
        async with world.client() as c, \
                c.stream("POST", "/api/generate", json={"model": "llama3.2"}) as held:
            lines = held.aiter_lines()  # kept: a dropped iterator closes the stream
            await lines.__anext__()
            refused = await c.post("/api/generate", json={"model": "llama3.2"})
            assert refused.status_code == 503
            assert int(refused.headers["retry-after"]) >= 1
            assert "queue is full" in refused.json()["error"]
            node.release()


async def test_streaming_v1_request_hears_sse_comments_while_a_gpu_wakes(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1", status="paused", chunks=2),
                          wait_notice="comment") as world, \
            world.client() as c:
        body = {"model": "llama3.2", "messages": [], "stream": True}
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            world.tasks.append(asyncio.ensure_future(
                world.until(lambda: world.gpu("gpu-1").state.ready)))
            lines = [line async for line in r.aiter_lines() if line]
        first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
        comments = lines[:first_data]
        assert any(line.startswith(": waking gpu-1") for line in comments), comments
        assert comments[-1] == ": served by gpu-1"
        assert lines[-1] == "data: [DONE]"


async def test_native_stream_gets_no_comment_lines_while_waiting(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1", status="paused"), wait_notice="comment") as world, \
            world.client() as c:
        world.tasks.append(asyncio.ensure_future(
            world.until(lambda: world.nodes["gpu-1"].requests["/api/chat"] == 1)))
        async with c.stream("POST", "/api/chat", json={"model": "llama3.2"}) as r:
            lines = [line async for line in r.aiter_lines()]
        assert r.status_code == 200
        assert all(isinstance(json.loads(line), dict) for line in lines)
        assert float(r.headers["x-gpuctl-wait-seconds"]) > 0


async def test_cloud_api_down_still_serves_running_gpus(make_world: WorldFactory) -> None:
    async with make_world() as world, world.client() as c:
        world.cloud.fail_calls(1000)
        await world.clock.advance(30)
        r = await c.post("/api/generate", json={"model": "llama3.2", "stream": False})
        assert r.status_code == 200
        discover = await c.get("/gpu/discover")
        assert discover.status_code == 200
        assert "warning" in discover.json()


async def test_request_cancelled_while_queued_leaves_the_queue(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1", status="paused")) as world:
        async with httpx.AsyncClient(base_url=world.url, headers=world.headers()) as c:
            task = asyncio.ensure_future(
                c.post("/api/chat", json={"model": "llama3.2", "stream": False}))
            await eventually(lambda: world.engine.queue_depth() == 1)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await eventually(lambda: world.engine.queue_depth() == 0)
