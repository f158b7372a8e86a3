"""The admin API keeps the old service's shapes; listings never wake a GPU; /metrics."""

from __future__ import annotations

import asyncio
import hashlib

from .world import GpuSpec, WorldFactory


async def test_discover_lists_gpus_in_the_old_shape(make_world: WorldFactory) -> None:
    async with make_world(GpuSpec("gpu-1"), GpuSpec("gpu-2", status="paused")) as world, \
            world.client() as c:
        body = (await c.get("/gpu/discover")).json()
        assert body["discovered_gpus"] == 2
        first = body["gpus"][0]
        assert {"id", "name", "status", "ip_address", "can_resume", "can_pause",
                "flavor"} <= first.keys()
        assert [(g["name"], g["status"]) for g in body["gpus"]] == [("gpu-1", "idle"),
                                                                     ("gpu-2", "paused")]


async def test_discover_answers_from_the_fleet_view_without_asking_the_cloud(
    make_world: WorldFactory,
) -> None:
    async with make_world() as world, world.client() as c:
        calls = world.cloud.list_calls
        for _ in range(5):
            assert (await c.get("/gpu/discover")).json()["discovered_gpus"] == 1
        assert world.cloud.list_calls == calls
        world.cloud.add("gpu-new")
        await world.clock.advance(10)  # the engine's own poll finds it
        names = [g["name"] for g in (await c.get("/gpu/discover")).json()["gpus"]]
        assert names == ["gpu-1", "gpu-new"]


async def test_discover_refresh_is_for_admins_only(make_world: WorldFactory) -> None:
    async with make_world() as world, world.client() as user, \
            world.client(world.admin_key) as admin:
        world.cloud.add("gpu-new")
        calls = world.cloud.list_calls
        refused = await user.get("/gpu/discover", params={"refresh": "1"})
        assert refused.status_code == 403
        assert refused.json() == {"error": "this endpoint needs an admin key"}
        assert world.cloud.list_calls == calls
        fresh = await admin.get("/gpu/discover", params={"refresh": "1"})
        assert fresh.status_code == 200
        assert world.cloud.list_calls == calls + 1
        assert [g["name"] for g in fresh.json()["gpus"]] == ["gpu-1", "gpu-new"]


async def test_discover_says_when_the_cloud_could_not_be_read_and_when_it_could_again(
    make_world: WorldFactory,
) -> None:
    async with make_world() as world, world.client(world.admin_key) as admin:
        assert "warning" not in (await admin.get("/gpu/discover")).json()
        world.cloud.fail_calls(1)
        stale = (await admin.get("/gpu/discover", params={"refresh": "1"})).json()
        assert stale["warning"].startswith("cloud API unavailable, showing the last known fleet")
        assert stale["discovered_gpus"] == 1
        assert "warning" in (await admin.get("/gpu/discover")).json()  # still stale
        fresh = (await admin.get("/gpu/discover", params={"refresh": "yes"})).json()
        assert "warning" not in fresh


async def test_status_of_one_gpu_and_404_for_an_unknown_one(make_world: WorldFactory) -> None:
    async with make_world() as world, world.client() as c:
        r = await c.get("/gpu/gpu-1/status")
        assert r.status_code == 200
        assert r.json()["gpu_id"] == world.gpu("gpu-1").id
        assert r.json()["can_pause"] is True
        missing = await c.get("/gpu/nope/status")
        assert missing.status_code == 404
        assert "error" in missing.json()


async def test_admin_pause_and_resume_answer_success_and_message(
    make_world: WorldFactory,
) -> None:
    async with make_world() as world, world.client(world.admin_key) as c:
        paused = await c.post("/gpu/gpu-1/pause")
        assert paused.status_code == 200
        assert paused.json()["success"] is True
        assert world.cloud.total_pauses == 1
        await world.until(lambda: world.gpu("gpu-1").cloud_status == "paused")
        resumed = await c.post("/gpu/gpu-1/resume")
        assert resumed.json()["success"] is True and resumed.json()["message"]
        assert world.cloud.total_resumes == 1


async def test_tags_and_ps_on_a_sleeping_fleet_wake_nothing(make_world: WorldFactory) -> None:
    known = {"gpu-1": ["llama3.2:latest"], "gpu-2": ["qwen3:8b"]}
    async with make_world(GpuSpec("gpu-1", status="paused"),
                          GpuSpec("gpu-2", status="paused", models=("qwen3:8b",)),
                          known=known) as world:
        client = world.ollama()
        listed = await client.list()
        assert sorted(m.model or "" for m in listed.models) == ["llama3.2:latest", "qwen3:8b"]
        assert (await client.ps()).models == []
        async with world.client() as c:
            assert (await c.get("/v1/models")).status_code == 200
            shown = await c.post("/api/show", json={"model": "qwen3:8b"})
            assert shown.status_code == 200
        await world.clock.advance(30)
        assert world.cloud.total_resumes == 0


async def test_show_is_routed_to_a_running_gpu(make_world: WorldFactory) -> None:
    async with make_world() as world:
        shown = await world.ollama().show("llama3.2")
        assert shown.modelinfo == {"general.architecture": "llama"}
        assert world.nodes["gpu-1"].requests["/api/show"] == 1


async def test_metrics_count_requests_by_route_and_status(make_world: WorldFactory) -> None:
    async with make_world() as world, world.client() as c:
        await c.post("/api/chat", json={"model": "llama3.2", "stream": False})
        await c.post("/api/chat", json={"model": "nope", "stream": False})
        text = (await c.get("/metrics")).text
        assert 'gpuctl_requests_total{route="/api/chat",status="200"} 1.0' in text
        assert 'gpuctl_requests_total{route="/api/chat",status="404"} 1.0' in text
        assert 'gpuctl_request_seconds_count{route="/api/chat"} 2.0' in text
        assert 'gpuctl_requests_total{route="/api/tags",status="200"}' not in text
        assert 'gpuctl_gpu_slots_in_use{gpu="gpu-1"} 0.0' in text
        assert 'gpuctl_gpu_state{gpu="gpu-1",state="idle"} 1.0' in text
        assert "gpuctl_queue_depth 0.0" in text


async def test_pull_goes_to_every_running_gpu_with_progress(make_world: WorldFactory) -> None:
    async with make_world(GpuSpec("gpu-1"), GpuSpec("gpu-2")) as world:
        client = world.ollama(world.admin_key)
        statuses = [p.status async for p in await client.pull("qwen3:8b", stream=True)]
        assert statuses[-1] == "success"
        assert world.nodes["gpu-1"].requests["/api/pull"] == 1
        assert world.nodes["gpu-2"].requests["/api/pull"] == 1
        assert "qwen3:8b" in world.nodes["gpu-1"].models


async def test_pull_to_the_gpu_named_in_the_header_only(make_world: WorldFactory) -> None:
    async with make_world(GpuSpec("gpu-1"), GpuSpec("gpu-2")) as world, \
            world.client(world.admin_key) as c:
        r = await c.post("/api/pull", json={"model": "qwen3:8b", "stream": False},
                         headers={"X-Gpuctl-Gpu": "gpu-2"})
        assert r.json() == {"status": "success"}
        assert world.nodes["gpu-1"].requests["/api/pull"] == 0
        assert world.nodes["gpu-2"].requests["/api/pull"] == 1


async def test_copy_and_delete_reach_the_gpus_with_the_model(make_world: WorldFactory) -> None:
    async with make_world(GpuSpec("gpu-1"), GpuSpec("gpu-2", models=("qwen3:8b",))) as world:
        client = world.ollama(world.admin_key)
        await client.copy("llama3.2", "mine:latest")
        assert "mine:latest" in world.nodes["gpu-1"].models
        assert world.nodes["gpu-2"].requests["/api/copy"] == 0
        await client.delete("mine")
        assert "mine:latest" not in world.nodes["gpu-1"].models


async def test_copy_and_delete_reach_a_leased_gpu_too(make_world: WorldFactory) -> None:
    # A clock that moves at every reading, as a real one does: two snapshots of a leased GPU
    # differ in their lease's seconds left, which once made a leased GPU drop out.
    async with make_world(GpuSpec("gpu-1"), GpuSpec("gpu-2"), drift=0.001) as world:
        ticket = await world.engine.acquire("llama3.2", "alice")
        world.engine.release(ticket)
        assert world.gpu(ticket.gpu_name).leases
        client = world.ollama(world.admin_key)
        await client.copy("llama3.2", "mine:latest")
        assert all("mine:latest" in node.models for node in world.nodes.values())
        await client.delete("mine")
        assert not any("mine:latest" in node.models for node in world.nodes.values())


async def test_blob_upload_goes_to_the_named_gpu(make_world: WorldFactory) -> None:
    data = b"weights"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with make_world() as world, world.client(world.admin_key) as c:
        missing = await c.head(f"/api/blobs/{digest}")
        assert missing.status_code == 404
        created = await c.post(f"/api/blobs/{digest}", content=data)
        assert created.status_code == 201
        assert (await c.head(f"/api/blobs/{digest}")).status_code == 200


async def test_metrics_last_resume_is_the_newest_one(make_world: WorldFactory) -> None:
    async with make_world(GpuSpec("gpu-1", status="paused")) as world, \
            world.client(world.admin_key) as c:
        machine = world.cloud.find("gpu-1")
        for resume_seconds in (60, 200):  # a quick resume first, then a slow one
            machine.resume_seconds = resume_seconds
            woken = asyncio.ensure_future(c.post("/gpu/gpu-1/resume?wait=1"))
            world.tasks.append(woken)
            await world.until(woken.done)
            assert (await woken).status_code == 200
            paused = asyncio.ensure_future(c.post("/gpu/gpu-1/pause?wait=1"))
            world.tasks.append(paused)
            await world.until(paused.done)
        text = (await c.get("/metrics")).text
        assert 'gpuctl_resume_seconds{stat="count"} 2.0' in text
        [last] = [line for line in text.splitlines()
                  if line.startswith('gpuctl_resume_seconds{stat="last"}')]
        assert float(last.split()[-1]) >= 200  # not the 60 s one
