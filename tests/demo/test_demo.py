"""``gpuctl serve --demo``'s fleet behind the real gateway, called by the real clients."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys

import httpx
import pytest

from gpuctl.engine.api import GpuState
from gpuctl.sim.demo import try_commands
from gpuctl.sim.waiting import eventually

from .conftest import DemoFactory, gpuctl_beside

HELLO = [{"role": "user", "content": "Hello!"}]


async def test_first_request_wakes_exactly_one_gpu_and_streams_its_answer(
    start_demo: DemoFactory,
) -> None:
    async with start_demo() as demo:
        parts = [part.message.content or "" async for part in
                 await demo.ollama().chat(model="llama3.2", messages=HELLO, stream=True)]
        cloud = demo.fleet.cloud
        assert cloud.total_resumes == 1
        assert cloud.resume_calls[cloud.find("gpu-1").id] == 1
        assert len(parts) > 10  # one chunk per word, not one blob
        assert "".join(parts).startswith("Hello! This is llama3.2 on gpu-1")
        assert demo.gpu("gpu-1").state is GpuState.IDLE
        assert {demo.gpu(n).state for n in ("gpu-2", "gpu-3")} == {GpuState.PAUSED}


async def test_openai_client_wakes_the_gpu_that_has_its_model(start_demo: DemoFactory) -> None:
    async with start_demo() as demo:
        stream = await demo.openai().chat.completions.create(
            model="mistral", messages=[{"role": "user", "content": "Hello!"}], stream=True)
        words = [chunk.choices[0].delta.content or "" async for chunk in stream]
        assert len(words) > 10
        assert "".join(words).startswith("Hello! This is mistral on gpu-3")
        cloud = demo.fleet.cloud
        assert dict(cloud.resume_calls) == {cloud.find("gpu-3").id: 1}


async def test_a_second_model_on_an_awake_gpu_wakes_nothing_more(
    start_demo: DemoFactory,
) -> None:
    async with start_demo() as demo:
        client = demo.ollama()
        await client.chat(model="llama3.2", messages=HELLO)
        answer = await client.chat(model="qwen2.5:7b", messages=HELLO)
        assert "qwen2.5:7b on gpu-1" in (answer.message.content or "")
        assert demo.fleet.cloud.total_resumes == 1


async def test_status_demo_shows_the_woken_gpu_ready_with_a_lease(
    start_demo: DemoFactory,
) -> None:
    async with start_demo() as demo:
        await demo.ollama().chat(model="llama3.2", messages=HELLO)
        result = await gpuctl_beside("status", "--demo", "--json")
        assert result.exit_code == 0, result.output
        gpus = {g["name"]: g for g in json.loads(result.stdout)["gpus"]}
        assert gpus["gpu-1"]["state"] == "idle"
        assert gpus["gpu-1"]["cloud_status"] == "running"
        assert [lease["user"] for lease in gpus["gpu-1"]["leases"]] == ["demo"]
        assert 0 < gpus["gpu-1"]["leases"][0]["expires_in_seconds"] <= 60
        assert "llama3.2:latest" in gpus["gpu-1"]["loaded"]
        assert (gpus["gpu-2"]["state"], gpus["gpu-2"]["leases"]) == ("paused", [])
        table = await gpuctl_beside("status", "--demo")
        (row,) = [line for line in table.stdout.splitlines() if line.startswith("gpu-1")]
        assert row.split()[1:3] == ["idle", "running"]
        assert "llama3.2:latest*" in row


async def test_status_demo_of_one_gpu_shows_its_lease(start_demo: DemoFactory) -> None:
    async with start_demo() as demo:
        await demo.ollama().chat(model="llama3.2", messages=HELLO)
        result = await gpuctl_beside("status", "gpu-1", "--demo")
        assert result.exit_code == 0, result.output
        assert re.search(r"demo \((1 min|\d+ s) left\)", result.stdout), result.stdout
        missing = await gpuctl_beside("status", "gpu-9", "--demo")
        assert missing.exit_code == 1
        assert "gpu-9" in missing.stderr


async def test_discover_demo_lists_the_three_gpus(start_demo: DemoFactory) -> None:
    async with start_demo():
        result = await gpuctl_beside("discover", "--demo", "--json")
        assert result.exit_code == 0, result.output
        body = json.loads(result.stdout)
        assert body["discovered_gpus"] == 3
        assert [(g["name"], g["cloud_status"], g["size"]) for g in body["gpus"]] == [
            (f"gpu-{n}", "paused", "A10 - 1 GPU") for n in (1, 2, 3)]


async def test_log_tells_the_wake_and_who_is_served_and_why(start_demo: DemoFactory) -> None:
    async with start_demo() as demo:
        await demo.ollama().chat(model="llama3.2", messages=HELLO)
        lines = [line.split("  ", 1)[1] for line in demo.log]  # without the time of day
        assert len(lines) == 3, lines
        assert lines[0] == "gpu-1  waking up (about 0 s)"
        assert lines[1].startswith("gpu-1  ready after ")
        assert lines[1].endswith(" s: llama3.2:latest, qwen2.5:7b")
        assert lines[2].startswith("gpu-1  serving demo: llama3.2 (first in line after ")


async def test_gpu_pauses_when_its_lease_runs_out(start_demo: DemoFactory) -> None:
    async with start_demo(reservation_minutes=0.01) as demo:
        await demo.ollama().chat(model="llama3.2", messages=HELLO)
        await eventually(lambda: demo.gpu("gpu-1").state is GpuState.PAUSED)
        await eventually(lambda: demo.logged("gpu-1  paused"))
        events = [line.split("  ", 2)[2] for line in demo.log if "gpu-1" in line]
        tail = events[events.index("lease of demo expired"):]
        assert tail == ["lease of demo expired",
                        "pausing: no lease, no request, nothing queued", "paused"]
        assert demo.fleet.cloud.total_pauses == 1


async def test_a_paused_gpus_node_does_not_answer_until_it_runs(
    start_demo: DemoFactory,
) -> None:
    async with start_demo() as demo:
        node_url = demo.fleet.cloud.find("gpu-1").base_url
        assert node_url is not None
        async with httpx.AsyncClient(timeout=5) as http:
            assert (await http.get(f"{node_url}/")).status_code == 503
            await demo.ollama().chat(model="llama3.2", messages=HELLO)
            assert (await http.get(f"{node_url}/")).status_code == 200
            tags = (await http.get(f"{node_url}/api/tags")).json()
        # What the gateway proxies to is what the engine probed.
        assert sorted(m["name"] for m in tags["models"]) == demo.gpu("gpu-1").models


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_the_printed_commands_work_when_pasted_into_a_shell(
    start_demo: DemoFactory,
) -> None:
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    async with start_demo() as demo:
        outputs = []
        for _, command in try_commands(demo.url, demo.fleet.key):
            proc = await asyncio.create_subprocess_shell(
                command, env=env, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
            assert proc.returncode == 0, err.decode()
            outputs.append(out.decode())
    curl, with_ollama, with_openai = outputs
    head, _, body = curl.partition("\r\n\r\n")  # -i: the headers, as the comment promises
    assert head.startswith("HTTP/1.1 200")
    lines = [json.loads(line) for line in body.splitlines()]
    thinking = [x["message"].get("thinking") for x in lines]
    assert "[gpuctl] served by gpu-1\n" in thinking  # the wake was told as it happened
    assert lines[-1]["done"] is True and len(lines) > 10
    assert "".join(x["message"]["content"] for x in lines).startswith("Hello! This is llama3.2")
    assert with_ollama.startswith("Hello! This is qwen2.5:7b on gpu-1")
    assert with_openai.startswith("Hello! This is mistral on gpu-3")
