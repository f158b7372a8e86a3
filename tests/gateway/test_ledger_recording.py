"""What the gateway writes on the ledger: the GPU timeline and one row per request."""

from __future__ import annotations

import asyncio

import ollama
import pytest

from gpuctl.sim.waiting import eventually

from .world import GpuSpec, WorldFactory


def _events(world: object, gpu_id: str) -> list[tuple[str, str]]:
    store = world.store  # type: ignore[attr-defined]
    return [(e.status, e.cause) for e in store.ledger.timeline(until=1e12) if e.gpu_id == gpu_id]


async def test_a_cold_request_leaves_the_wake_on_the_timeline_and_a_full_row(
    make_world: WorldFactory,
) -> None:
    known = {"gpu-1": ["llama3.2:latest"]}  # seen awake before: a wake for requests
    async with make_world(GpuSpec("gpu-1", status="paused"), known=known) as world:
        gpu_id = world.gpu("gpu-1").id
        ask = asyncio.ensure_future(world.ollama().chat(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}]))
        world.tasks.append(ask)
        await eventually(lambda: world.engine.queue_depth() == 1)
        await world.until(lambda: ask.done(), step=5)
        answer = await ask
        assert answer.message.content
        events = _events(world, gpu_id)
        # The resume was written before it was sent, with its cause; the rest was observed.
        assert events[0] == ("paused", "outside")
        assert events[1] == ("resuming", "gateway")
        assert events[-1] == ("ready", "observed")
        rows = world.store.requests(0, 1e12)
        assert len(rows) == 1
        row = rows[0]
        assert (row.user, row.model, row.route, row.status, row.outcome) == (
            "alice", "llama3.2", "/api/chat", 200, "ok")
        assert row.gpu_id == gpu_id and row.wake_gpu == gpu_id and row.cold
        assert row.queued_s >= 60  # the sim's resume takes 60 s of clock time
        assert row.tokens_out > 0 and row.lease_s == 600
        assert row.ttfb_s is not None and row.duration_s >= row.ttfb_s
        assert row.served_at is not None and row.served_at >= row.at + row.queued_s - 1e-6


async def test_refusals_and_cancels_get_a_row_each(make_world: WorldFactory) -> None:
    async with make_world(GpuSpec("gpu-1"), slots=1, max_queue=0) as world:
        node = world.nodes["gpu-1"]
        node.hold_after = 1
        async with world.client() as c:
            bad = await c.post("/api/chat", content=b"{not json")
            assert bad.status_code == 400
            async with c.stream("POST", "/api/generate", json={"model": "llama3.2"}) as held:
                lines = held.aiter_lines()  # kept: a dropped iterator closes the stream
                await lines.__anext__()
                full = await c.post("/api/generate", json={"model": "llama3.2"})
                assert full.status_code == 503
            # Leaving the stream early closes it: the client cancelled.
            await eventually(lambda: len(world.store.requests(0, 1e12)) == 3)
            node.release()
        outcomes = sorted((r.outcome, r.status) for r in world.store.requests(0, 1e12))
        assert outcomes == [("cancelled", 499), ("refused", 400), ("refused", 503)]


async def test_an_unknown_key_leaves_no_row(make_world: WorldFactory) -> None:
    async with make_world() as world:
        client = ollama.AsyncClient(host=world.url, headers=world.headers("sk-wrong"))
        world.closers.append(client.close)
        with pytest.raises(ollama.ResponseError):
            await client.chat(model="llama3.2", messages=[])
        assert world.store.requests(0, 1e12) == []


async def test_request_rows_reach_the_disk_only_at_the_flush(make_world: WorldFactory) -> None:
    async with make_world() as world:
        async with world.client() as c:
            ok = await c.post("/api/generate", json={"model": "llama3.2", "stream": False})
            assert ok.status_code == 200
        on_disk = "SELECT COUNT(*) FROM request_log"
        assert world.store.conn.execute(on_disk).fetchone()[0] == 0
        await world.clock.advance(10)  # one poll interval: the background loop flushes
        await eventually(lambda: world.store.conn.execute(on_disk).fetchone()[0] == 1)


async def test_a_portal_resume_is_marked_outside(make_world: WorldFactory) -> None:
    async with make_world(GpuSpec("gpu-1", status="paused")) as world:
        gpu_id = world.gpu("gpu-1").id
        await world.cloud.resume(gpu_id)  # the portal, behind gpuctl's back
        await world.until(lambda: world.gpu("gpu-1").state.ready, step=5)
        events = _events(world, gpu_id)
        assert ("resuming", "outside") in events or ("running", "outside") in events
        assert all(cause in ("outside", "observed") for _, cause in events)
        assert events[-1][0] == "ready"


async def test_a_megabyte_model_name_is_kept_bounded_in_the_ledger(
    make_world: WorldFactory,
) -> None:
    async with make_world() as world:
        async with world.client() as c:
            answer = await c.post("/api/generate", json={"model": "x" * 1_000_000})
        assert answer.status_code == 404
        (row,) = world.store.requests(0, 1e12)
        assert row.model == "x" * 200 and row.outcome == "refused"
