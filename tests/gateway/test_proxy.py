"""The Ollama and OpenAI APIs through the gateway, with the real client packages."""

from __future__ import annotations

import asyncio
import json

import ollama
import openai
import pytest

from .world import NODE_TOKEN, GpuSpec, WorldFactory


async def test_ollama_client_chat_streams_every_chunk_through(make_world: WorldFactory) -> None:
    async with make_world(GpuSpec("gpu-1", chunks=6)) as world:
        client = world.ollama()
        parts = [p async for p in await client.chat(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True)]
        assert [p.message.content for p in parts[:-1]] == [f"tok{i} " for i in range(6)]
        assert parts[-1].done and parts[-1].eval_count == 6


async def test_ollama_client_generate_and_embed_without_streaming(
    make_world: WorldFactory,
) -> None:
    async with make_world() as world:
        client = world.ollama()
        answer = await client.generate(model="llama3.2", prompt="hi")
        assert answer.response == "tok0 tok1 tok2 tok3 "
        embedded = await client.embed(model="llama3.2", input=["a", "b"])
        assert len(embedded.embeddings) == 2
        legacy = await client.embeddings(model="llama3.2", prompt="a")
        assert len(legacy.embedding) == 8


async def test_served_response_names_gpu_and_wait(make_world: WorldFactory) -> None:
    async with make_world() as world, world.client() as c:
        r = await c.post("/api/chat", json={"model": "llama3.2", "messages": [], "stream": False})
        assert r.status_code == 200
        assert r.headers["x-gpuctl-gpu"] == "gpu-1"
        assert float(r.headers["x-gpuctl-wait-seconds"]) == 0.0
        assert r.headers["content-type"] == "application/json; charset=utf-8"


async def test_native_stream_keeps_upstream_content_type(make_world: WorldFactory) -> None:
    async with make_world() as world, world.client() as c:
        async with c.stream("POST", "/api/generate", json={"model": "llama3.2"}) as r:
            lines = [line async for line in r.aiter_lines()]
        assert r.headers["content-type"] == "application/x-ndjson"
        assert all(json.loads(line) for line in lines)
        assert json.loads(lines[-1])["done"] is True


async def test_body_passes_untouched_with_node_token_and_without_client_host(
    make_world: WorldFactory,
) -> None:
    body = (b'{"model":"llama3.2","messages":[],"stream":false,'
            b'"think":"high","tools":[{"type":"function"}],"x_unknown":{"a":[1,2]}}')
    async with make_world() as world, world.client() as c:
        r = await c.post("/api/chat", content=body, headers={"Host": "gateway.example.org"})
        assert r.status_code == 200
        node = world.nodes["gpu-1"]
        assert node.last_body == body
        assert node.last_headers["authorization"] == f"Bearer {NODE_TOKEN}"
        assert node.last_headers["host"].startswith("127.0.0.1:")
        assert world.user_key not in json.dumps(node.last_headers)


async def test_openai_client_chat_streaming_and_not(make_world: WorldFactory) -> None:
    async with make_world(GpuSpec("gpu-1", chunks=3)) as world:
        client = world.openai()
        whole = await client.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}])
        assert whole.choices[0].message.content == "tok0 tok1 tok2 "
        assert whole.usage is not None and whole.usage.completion_tokens == 3
        stream = await client.chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "tok0 tok1 tok2 "


async def test_openai_completions_embeddings_and_responses(make_world: WorldFactory) -> None:
    async with make_world(GpuSpec("gpu-1", chunks=2)) as world:
        client = world.openai()
        done = await client.completions.create(model="llama3.2", prompt="hi")
        assert done.choices[0].text == "tok0 tok1 "
        emb = await client.embeddings.create(model="llama3.2", input=["x", "y"])
        assert [d.index for d in emb.data] == [0, 1]
        resp = await client.responses.create(model="llama3.2", input="hi")
        assert resp.output_text == "tok0 tok1 "
        models = await client.models.list()
        assert [m.id for m in models.data] == ["llama3.2:latest"]


async def test_openai_unknown_model_is_a_not_found_error(make_world: WorldFactory) -> None:
    async with make_world() as world:
        client = world.openai(max_retries=0)
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="nope", messages=[])
        assert caught.value.body == {"message": 'model "nope" not found, try pulling it first',
                                     "type": "not_found_error", "param": None, "code": None}


async def test_ollama_unknown_model_is_ollamas_404(make_world: WorldFactory) -> None:
    async with make_world() as world:
        client = world.ollama()
        with pytest.raises(ollama.ResponseError) as caught:
            await client.chat(model="nope", messages=[])
        assert caught.value.status_code == 404
        assert caught.value.error == 'model "nope" not found, try pulling it first'


async def test_usage_is_recorded_per_user(make_world: WorldFactory) -> None:
    async with make_world(GpuSpec("gpu-1", chunks=5)) as world:
        client = world.ollama()
        async for _ in await client.chat(model="llama3.2", messages=[], stream=True):
            pass
        usage = world.store.usage()["alice"]
        assert (usage.requests, usage.tokens_in, usage.tokens_out) == (1, 7, 5)


async def test_sync_ollama_and_openai_clients_streaming_and_not(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1", chunks=3)) as world:

        def use_sync_clients() -> list[str]:
            client = ollama.Client(host=world.url, headers=world.headers())
            oai = openai.OpenAI(base_url=f"{world.url}/v1", api_key=world.user_key)
            try:
                messages = [{"role": "user", "content": "hi"}]
                whole = client.chat(model="llama3.2", messages=messages).message.content
                streamed = "".join(p.message.content or "" for p in client.chat(
                    model="llama3.2", messages=messages, stream=True))
                oai_whole = oai.chat.completions.create(
                    model="llama3.2", messages=[{"role": "user", "content": "hi"}])
                oai_stream = oai.chat.completions.create(
                    model="llama3.2", messages=[{"role": "user", "content": "hi"}],
                    stream=True)
                oai_streamed = "".join(c.choices[0].delta.content or ""
                                       for c in oai_stream if c.choices)
                return [whole or "", streamed, oai_whole.choices[0].message.content or "",
                        oai_streamed]
            finally:
                client.close()  # type: ignore[no-untyped-call]
                oai.close()

        results = await asyncio.to_thread(use_sync_clients)
        assert results == ["tok0 tok1 tok2 "] * 4


async def test_large_body_under_the_limit_reaches_the_node_byte_for_byte(
    make_world: WorldFactory,
) -> None:
    image = "A" * 3_000_000  # a base64 image of a few MB, as multimodal chats send
    body = json.dumps({"model": "llama3.2", "stream": False,
                       "messages": [{"role": "user", "content": "?", "images": [image]}]})
    async with make_world() as world, world.client() as c:
        r = await c.post("/api/chat", content=body.encode())
        assert r.status_code == 200
        assert world.nodes["gpu-1"].last_body == body.encode()


async def test_keep_alive_connection_serves_requests_back_to_back(
    make_world: WorldFactory,
) -> None:
    async with make_world() as world, world.client() as c:
        for _ in range(3):
            r = await c.post("/api/generate", json={"model": "llama3.2", "stream": False})
            assert r.status_code == 200
        tags = await c.get("/api/tags")  # the same connection, now piped to Quart
        assert tags.status_code == 200
        r = await c.post("/api/generate", json={"model": "llama3.2", "stream": False})
        assert r.json()["done"] is True


async def test_the_engine_learns_load_times_from_ollamas_final_line(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1", models=("llama3.2:latest", "qwen3:8b"))) as world:
        node = world.nodes["gpu-1"]
        node.load_seconds = 30.0
        client = world.ollama()
        await client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
        await client.chat(model="llama3.2", messages=[])  # warm now: nothing to learn
        node.load_seconds = 12.5
        parts = [p async for p in await client.generate(model="qwen3:8b", prompt="hi",
                                                         stream=True)]
        assert parts[-1].load_duration == 12_500_000_000
        await world.clock.advance(10)  # the engine's next tick writes what it learnt
        assert world.store.load_history() == {"llama3.2:latest": [30.0], "qwen3:8b": [12.5]}
