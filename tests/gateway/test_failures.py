"""Bad input, vanished clients and dying nodes: clear errors, never a hung socket or lost slot."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import httpx
import ollama
import pytest

from gpuctl.sim.waiting import eventually

from .raw_node import OK_CHUNKED, chunked, raw_node
from .world import GpuSpec, WorldFactory


async def test_client_disconnect_mid_stream_frees_the_slot_and_stops_the_node(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1", chunks=4), slots=1) as world:
        node = world.nodes["gpu-1"]
        node.hold_after = 1
        async with world.client() as c, \
                c.stream("POST", "/api/chat", json={"model": "llama3.2"}) as r:
            first = await r.aiter_lines().__anext__()
            assert json.loads(first)["done"] is False
            assert world.gpu("gpu-1").slots_in_use == 1
        # leaving the block closed the client's connection mid-stream
        await eventually(lambda: world.gpu("gpu-1").slots_in_use == 0)
        await eventually(lambda: node.cancelled_streams == 1)
        assert node.completed_streams == 0


async def test_node_dying_mid_stream_ends_ndjson_with_an_error_line(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1", chunks=5)) as world:
        world.nodes["gpu-1"].die_after = 2
        client = world.ollama()
        seen: list[str] = []
        with pytest.raises(ollama.ResponseError) as caught:
            async for part in await client.chat(model="llama3.2", messages=[], stream=True):
                seen.append(part.message.content or "")
        assert seen == ["tok0 ", "tok1 "]
        assert "gpu-1 failed mid-stream" in caught.value.error
        assert world.gpu("gpu-1").slots_in_use == 0


async def test_node_dying_mid_sse_stream_ends_it_without_done(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1", chunks=5)) as world, world.client() as c:
        world.nodes["gpu-1"].die_after = 2
        body = {"model": "llama3.2", "messages": [], "stream": True}
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = [line async for line in r.aiter_lines() if line]
        data = [line for line in lines if line.startswith("data: ")]
        assert len(data) == 2
        assert "data: [DONE]" not in lines
        assert world.gpu("gpu-1").slots_in_use == 0


async def test_malformed_json_is_400(make_world: WorldFactory) -> None:
    async with make_world() as world, world.client() as c:
        native = await c.post("/api/chat", content=b'{"model": "llama3.2",')
        assert native.status_code == 400
        assert native.json() == {"error": "invalid JSON in request body"}
        shown = await c.post("/api/show", content=b"nope")
        assert shown.status_code == 400 and "error" in shown.json()
        openai_shape = await c.post("/v1/chat/completions", content=b"[1,")
        assert openai_shape.status_code == 400
        assert openai_shape.json()["error"]["type"] == "invalid_request_error"


async def test_missing_model_is_400(make_world: WorldFactory) -> None:
    async with make_world() as world, world.client() as c:
        r = await c.post("/api/generate", json={"prompt": "hi"})
        assert (r.status_code, r.json()) == (400, {"error": "model is required"})
        empty = await c.post("/api/embed", content=b"")
        assert (empty.status_code, empty.json()) == (400, {"error": "missing request body"})


async def test_body_over_the_limit_is_413(make_world: WorldFactory) -> None:
    async with make_world(max_body_mb=0.01) as world, world.client() as c:
        big = {"model": "llama3.2", "prompt": "x" * 20_000}
        r = await c.post("/api/generate", json=big)
        assert r.status_code == 413
        assert "max_body_mb" in r.json()["error"]
        small = await c.post("/api/generate", json={"model": "llama3.2", "stream": False})
        assert small.status_code == 200


async def test_unknown_path_is_ollamas_plain_404(make_world: WorldFactory) -> None:
    async with make_world() as world, world.client() as c:
        r = await c.get("/api/nothing-here")
        assert (r.status_code, r.text) == (404, "404 page not found")
        assert r.headers["content-type"].startswith("text/plain")


async def test_wrong_method_is_405(make_world: WorldFactory) -> None:
    async with make_world() as world, world.client() as c:
        r = await c.get("/api/chat")
        assert (r.status_code, r.text) == (405, "405 method not allowed")


async def test_unreachable_node_is_502_and_frees_the_slot(make_world: WorldFactory) -> None:
    async with make_world(GpuSpec("gpu-1", url="http://127.0.0.1:9")) as world, \
            world.client() as c:
        r = await c.post("/api/chat", json={"model": "llama3.2", "stream": False})
        assert r.status_code == 502
        assert "gpu-1" in r.json()["error"]
        assert world.gpu("gpu-1").slots_in_use == 0


async def test_chunked_request_body_is_served_and_disconnect_still_frees_the_slot(
    make_world: WorldFactory,
) -> None:
    # A chunked request body: granian hands it to the hot path as several body messages.
    async def body() -> AsyncIterator[bytes]:
        yield b'{"model": "llama3.2",'
        yield b' "stream": true}'

    async with make_world(GpuSpec("gpu-1", chunks=4), slots=1) as world:
        node = world.nodes["gpu-1"]
        node.hold_after = 1
        async with world.client() as c, c.stream("POST", "/api/chat", content=body()) as r:
            lines = r.aiter_lines()  # kept: a dropped iterator closes the stream
            assert json.loads(await lines.__anext__())["done"] is False
            assert world.gpu("gpu-1").slots_in_use == 1
        await eventually(lambda: world.gpu("gpu-1").slots_in_use == 0)
        await eventually(lambda: node.cancelled_streams == 1)


async def test_node_refusing_before_any_byte_is_retried_on_another_gpu(
    make_world: WorldFactory,
) -> None:
    dead_url = _refusing_url()
    async with make_world(GpuSpec("gpu-dead", url=dead_url), GpuSpec("gpu-ok")) as world:
        # Make the dead node the router's first choice: it has the model in memory.
        world.cloud.find("gpu-dead").loaded = ["llama3.2:latest"]
        await world.engine.refresh()
        assert world.gpu("gpu-dead").loaded == ["llama3.2:latest"]
        async with world.client() as c:
            r = await c.post("/api/chat", json={"model": "llama3.2", "stream": False})
        assert r.status_code == 200
        assert r.headers["x-gpuctl-gpu"] == "gpu-ok"
        assert r.json()["done"] is True
        assert world.gpu("gpu-dead").slots_in_use == 0
        assert world.gpu("gpu-ok").slots_in_use == 0


async def test_every_node_refusing_gives_one_clear_502(make_world: WorldFactory) -> None:
    dead_url = _refusing_url()
    async with make_world(GpuSpec("gpu-dead", url=dead_url)) as world, world.client() as c:
        r = await c.post("/api/generate", json={"model": "llama3.2", "stream": False})
        assert r.status_code == 502
        assert r.json()["error"].startswith("GPU gpu-dead failed: ")
        assert world.gpu("gpu-dead").slots_in_use == 0


def _refusing_url() -> str:
    """A loopback URL whose port nobody listens on: connections are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


@pytest.mark.parametrize("size", [b"-6", b"+5", b"5_0"])
async def test_a_node_sending_a_bad_chunk_size_ends_the_stream_and_the_gateway_serves_on(
    make_world: WorldFactory, size: bytes,
) -> None:
    # Hand-parsed, "-6" once looped the event loop forever (int("-6", 16) is accepted).
    reply = [OK_CHUNKED + chunked(b'{"done":false}\n')[:-5], size + b"\r\nabcdef\r\n0\r\n\r\n"]
    async with raw_node(reply) as (_, url), \
            make_world(GpuSpec("gpu-1", url=url)) as world, world.client() as c:
        r = await asyncio.wait_for(c.post("/api/chat", json={"model": "llama3.2"}), 5)
        lines = r.text.splitlines()
        assert lines[0] == '{"done":false}'
        assert "failed mid-stream" in json.loads(lines[-1])["error"]
        assert (await asyncio.wait_for(c.get("/health"), 1)).status_code == 200
        assert world.gpu("gpu-1").slots_in_use == 0


async def test_a_node_dying_inside_a_content_length_body_ends_the_client_response_visibly(
    make_world: WorldFactory,
) -> None:
    reply = [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
             b'{"partial":']
    async with raw_node(reply) as (_, url), \
            make_world(GpuSpec("gpu-1", url=url)) as world, world.client() as c:
        # The client must not take a short body for a whole one: it sees the cut.
        with pytest.raises(httpx.RemoteProtocolError):
            await asyncio.wait_for(
                c.post("/api/chat", json={"model": "llama3.2", "stream": False}), 5)
        assert (await asyncio.wait_for(c.get("/health"), 1)).status_code == 200


async def test_a_node_header_with_a_bare_lf_is_never_relayed_as_a_header(
    make_world: WorldFactory,
) -> None:
    reply = [b"HTTP/1.1 200 OK\r\nx-a: one\nset-cookie: evil=1\r\ncontent-length: 2\r\n\r\n{}"]
    async with raw_node(reply) as (_, url), \
            make_world(GpuSpec("gpu-1", url=url)) as world, world.client() as c:
        r = await asyncio.wait_for(
            c.post("/api/chat", json={"model": "llama3.2", "stream": False}), 5)
        assert r.status_code == 502
        assert "set-cookie" not in r.headers


async def test_a_node_interim_100_is_not_relayed_as_the_answer(make_world: WorldFactory
                                                             ) -> None:
    reply = [b"HTTP/1.1 100 Continue\r\n\r\n",
             b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 13\r\n\r\n"
             b'{"done":true}']
    async with raw_node(reply) as (_, url), \
            make_world(GpuSpec("gpu-1", url=url)) as world, world.client() as c:
        r = await asyncio.wait_for(
            c.post("/api/chat", json={"model": "llama3.2", "stream": False}), 5)
        assert (r.status_code, r.json()) == (200, {"done": True})


async def test_a_node_with_absurd_counts_in_its_last_line_cannot_break_the_request(
    make_world: WorldFactory,
) -> None:
    async with make_world() as world, world.client() as c:
        node = world.nodes["gpu-1"]
        # 5,000 digits: more than Python's int() takes; a 30-digit load_duration (~3e13 s)
        node.final_line = (b'{"done":true,"eval_count":' + b"9" * 5000 + b',"load_duration":'
                           + b"9" * 30 + b',"prompt_eval_count":-3}\n')
        async with c.stream("POST", "/api/chat", json={"model": "llama3.2"}) as r:
            lines = [line async for line in r.aiter_lines()]
        assert r.status_code == 200
        assert lines[-1].startswith('{"done":true,"eval_count":999')  # relayed untouched
        assert world.gpu("gpu-1").slots_in_use == 0
        metrics = (await c.get("/metrics")).text  # counted as answered: nothing raised
        assert 'gpuctl_requests_total{route="/api/chat",status="200"} 1.0' in metrics
        await world.clock.advance(10)  # the tick would write a learnt load
        assert world.store.load_history() == {}
        node.final_line = b'{"done":true,"eval_count":' + b"9" * 20 + b"}\n"  # > 2**63
        async with c.stream("POST", "/api/chat", json={"model": "llama3.2"}) as r:
            assert [line async for line in r.aiter_lines()][-1].startswith('{"done":true')
        assert world.store.usage()["alice"].tokens_out == 0  # absurd counts count as none
        ok = await c.post("/api/chat", json={"model": "llama3.2", "stream": False})
        assert ok.status_code == 200  # the gateway and the node still serve
