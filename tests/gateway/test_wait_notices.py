"""Wait notices (``server.wait_notice``): what a held stream hears, checked with real clients.

The GPU starts paused on the fake clock, so every request here is held for a wake; the
clients are the real ``ollama`` and ``openai`` packages, which must return only the answer
as content while the notices arrive as reasoning.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gpuctl.gateway.notices import MARKER, notifier, strip_history

from .world import GpuSpec, World, WorldFactory

ANSWER = "tok0 tok1 tok2 "


def _wake(world: World) -> None:
    world.tasks.append(asyncio.ensure_future(
        world.until(lambda: world.gpu("gpu-1").state.ready)))


async def test_ollama_chat_hears_the_wake_as_thinking_and_gets_a_clean_answer(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1", status="paused", chunks=3)) as world:
        client = world.ollama()
        stream = await client.chat(model="llama3.2", stream=True,
                                   messages=[{"role": "user", "content": "hi"}])
        _wake(world)
        parts = [part async for part in stream]
    notes = [p.message.thinking for p in parts if p.message.thinking]
    assert notes and all(n.startswith(MARKER) for n in notes), notes
    assert any("waking gpu-1" in n for n in notes), notes
    assert notes[-1] == f"{MARKER}served by gpu-1\n"
    assert all(p.message.content == "" for p in parts if p.message.thinking)
    assert "".join(p.message.content or "" for p in parts) == ANSWER
    assert parts[-1].done is True


async def test_ollama_generate_hears_the_wake_in_its_thinking_field(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1", status="paused", chunks=3)) as world:
        stream = await world.ollama().generate(model="llama3.2", prompt="hi", stream=True)
        _wake(world)
        parts = [part async for part in stream]
    notes = [p.thinking for p in parts if p.thinking]
    assert any(n.startswith(f"{MARKER}waking gpu-1") for n in notes), notes
    assert "".join(p.response for p in parts) == ANSWER


async def test_openai_stream_hears_the_wake_as_reasoning_content_only(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1", status="paused", chunks=3)) as world:
        stream = await world.openai().chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True)
        _wake(world)
        chunks = [chunk async for chunk in stream]
    reasoning = [getattr(c.choices[0].delta, "reasoning_content", None) for c in chunks
                 if c.choices]
    notes = [r for r in reasoning if r]
    assert any(n.startswith(f"{MARKER}waking gpu-1") for n in notes), notes
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == ANSWER


async def test_openai_completions_stream_falls_back_to_comments(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1", status="paused", chunks=2)) as world, \
            world.client() as c:
        body = {"model": "llama3.2", "prompt": "hi", "stream": True}
        async with c.stream("POST", "/v1/completions", json=body) as r:
            _wake(world)
            lines = [line async for line in r.aiter_lines() if line]
    assert any(line.startswith(": waking gpu-1") for line in lines), lines
    data = [json.loads(line[6:]) for line in lines
            if line.startswith("data: ") and line != "data: [DONE]"]
    assert all("reasoning_content" not in json.dumps(d) for d in data)


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
async def test_none_sends_nothing_before_the_answer(make_world: WorldFactory, path: str) -> None:
    async with make_world(GpuSpec("gpu-1", status="paused", chunks=2),
                          wait_notice="none") as world, world.client() as c:
        body = {"model": "llama3.2", "messages": [], "stream": True}
        _wake(world)  # before the call: nothing, not even headers, comes back until then
        async with c.stream("POST", path, json=body) as r:
            text = (await r.aread()).decode()
        assert MARKER not in text
        assert not text.startswith(":")
        # Held silently, the answer's own headers name the GPU and the wait.
        assert r.headers["x-gpuctl-gpu"] == "gpu-1"
        assert float(r.headers["x-gpuctl-wait-seconds"]) > 0


async def test_a_request_served_at_once_hears_no_notice(make_world: WorldFactory) -> None:
    async with make_world(GpuSpec("gpu-1", chunks=2)) as world:
        parts = [p async for p in await world.ollama().chat(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True)]
    assert not any(p.message.thinking for p in parts)


async def test_a_failure_after_notices_is_an_error_line_the_ollama_client_raises(
    make_world: WorldFactory,
) -> None:
    import ollama

    async with make_world(GpuSpec("gpu-1", status="paused")) as world:
        world.cloud.fail_calls(1000)  # every resume fails: the held request gives up
        stream = await world.ollama().chat(model="llama3.2", stream=True,
                                           messages=[{"role": "user", "content": "hi"}])
        notes: list[str] = []

        async def read() -> None:
            async for part in stream:
                notes.append(part.message.thinking or "")

        reader = asyncio.ensure_future(read())
        world.tasks.append(reader)
        world.tasks.append(asyncio.ensure_future(world.until(reader.done, limit=3000)))
        with pytest.raises(ollama.ResponseError):
            await asyncio.wait_for(reader, 10)


async def test_notices_sent_back_in_history_never_reach_the_node(
    make_world: WorldFactory,
) -> None:
    real = "The user greets me. I should greet back.\n"
    history: list[dict[str, Any]] = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "tok0 tok1 ",
         "thinking": f"{MARKER}waking gpu-1, about 65 s\n{MARKER}served by gpu-1\n"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "hello", "thinking": f"{MARKER}queued\n{real}"},
        {"role": "assistant", "content": (
            '<details type="reasoning" done="true" duration="3">\n'
            "<summary>Thought for 3 seconds</summary>\n"
            f"> {MARKER}waking gpu-1, about 65 s\n</details>\nthe answer")},
        {"role": "user", "content": f"{MARKER}is my own text"},
    ]
    async with make_world(GpuSpec("gpu-1", chunks=1)) as world:
        await world.ollama().chat(model="llama3.2", messages=history)
        sent = world.nodes["gpu-1"].last_json["messages"]
    assert "thinking" not in sent[1]
    assert sent[1]["content"] == "tok0 tok1 "
    assert sent[3]["thinking"] == real  # a thinking model's own reasoning passes untouched
    assert sent[4]["content"] == "the answer"
    assert sent[5]["content"] == f"{MARKER}is my own text"  # user turns are never touched


def test_a_body_without_the_marker_is_forwarded_byte_for_byte() -> None:
    body = b'{"model": "m",  "messages": [{"role": "assistant", "thinking": "x"}]}'
    assert strip_history(json.loads(body), body) is body


@pytest.mark.parametrize(("mode", "path", "stream", "form"), [
    ("thinking", "/api/chat", True, "ndjson"),
    ("thinking", "/api/generate", True, "ndjson"),
    ("thinking", "/v1/chat/completions", True, "sse-data"),
    ("thinking", "/v1/completions", True, "sse-comment"),
    ("thinking", "/v1/responses", True, "sse-comment"),
    ("thinking", "/api/embed", False, None),
    ("thinking", "/api/chat", False, None),
    ("comment", "/v1/chat/completions", True, "sse-comment"),
    ("comment", "/api/chat", True, None),
    ("none", "/v1/chat/completions", True, None),
])
def test_which_form_each_endpoint_hears(mode: Any, path: str, stream: bool,
                                        form: str | None) -> None:
    notes = notifier(mode, path, "m", stream=stream)
    if form is None:
        assert notes is None
        return
    assert notes is not None
    chunk = notes.chunk("waking gpu-1").decode()
    if form == "ndjson":
        assert json.loads(chunk)["done"] is False
    elif form == "sse-data":
        payload = json.loads(chunk.removeprefix("data: "))
        assert payload["choices"][0]["delta"]["content"] == ""
    else:
        assert chunk == ": waking gpu-1\n\n"
