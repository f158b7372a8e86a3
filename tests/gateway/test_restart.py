"""``gpuctl serve`` told to stop (SIGTERM) while requests wait on a long resume.

Fault run 2 of issue 9: at the drain limit the held requests were cut without an answer and
nothing was logged. Now each gets ``503 {"error": "gateway restarting"}`` with
``Retry-After`` (a ``/v1`` stream already started: an error event), the drain is logged
with counts, and the resume in flight stays recorded for the next start to adopt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import ollama
from conftest import served_url  # tests/conftest.py

from gpuctl.gateway.drain import drain
from gpuctl.sim.ollama import SimOllama
from gpuctl.sim.servers import ServerThread
from gpuctl.sim.surf_api import SurfApiSim
from gpuctl.sim.waiting import eventually
from gpuctl.store import Store
from gpuctl.store.keys import KeyStore

from .world import GpuSpec, WorldFactory

if TYPE_CHECKING:
    from conftest import GpuctlProcess  # tests/conftest.py: the gpuctl_process fixture

TOKEN = "sim-token"


def _queued(url: str, key: str) -> float:
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"}).text
    match = re.search(r"^gpuctl_queue_depth (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


async def test_sigterm_answers_every_request_waiting_on_a_long_resume_and_logs_it(
    gpuctl_home: Path, gpuctl_process: GpuctlProcess,
) -> None:
    sim = SurfApiSim(token=TOKEN, resume_seconds=45)  # real time: it will not finish here
    node = SimOllama(["llama3.2"])
    keys = KeyStore.open(gpuctl_home / "state")
    _, secret = keys.create("alice")
    keys.close()
    with ServerThread(sim) as cloud_url, ServerThread(node) as node_url:
        machine = sim.add("gpu-a", ip="127.0.0.1")
        env = {
            "GPUCTL_CLOUD_API__BASE_URL": f"{cloud_url}/v1",
            "GPUCTL_CLOUD_API__MACHINE_NAME_FILTER": "gpu",
            "GPUCTL_GPU__OLLAMA_URL": f"http://{{ip}}:{node_url.rsplit(':', 1)[1]}",
            "GPUCTL_API_TOKEN": TOKEN,
        }
        with gpuctl_process("serve", "--port", "0", env=env) as proc:
            url = served_url(proc)
            headers = {"Authorization": f"Bearer {secret}"}
            async with httpx.AsyncClient(base_url=url, headers=headers, timeout=20) as c:
                plain = asyncio.ensure_future(
                    c.post("/api/chat", json={"model": "llama3.2", "stream": False}))
                ndjson = asyncio.ensure_future(
                    c.post("/api/generate", json={"model": "llama3.2", "prompt": "hi"}))
                client = ollama.AsyncClient(host=url, headers=headers)
                native = asyncio.ensure_future(
                    client.chat(model="llama3.2", messages=[], stream=False))

                async def sse() -> list[str]:
                    body = {"model": "llama3.2", "messages": [], "stream": True}
                    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        assert r.status_code == 200  # headers went out while waiting
                        return [line async for line in r.aiter_lines() if line]

                stream = asyncio.ensure_future(sse())
                deadline = time.monotonic() + 10
                while await asyncio.to_thread(_queued, url, secret) < 4:
                    assert time.monotonic() < deadline, "the requests never queued"
                    await asyncio.sleep(0.05)
                assert sim.resume_posts[machine.id] == 1
                sent = time.monotonic()
                proc.send_signal(signal.SIGTERM)

                answer = await plain
                assert answer.status_code == 503
                assert answer.json() == {"error": "gateway restarting"}
                assert int(answer.headers["retry-after"]) >= 5
                # A native stream started with wait notices (server.wait_notice): its last
                # line is the error, as Ollama ends a failed stream.
                streamed = await ndjson
                assert streamed.status_code == 200
                *notices, last = [json.loads(line) for line in streamed.text.splitlines()]
                assert notices and last == {"error": "gateway restarting"}
                try:
                    await native
                    raise AssertionError("the ollama client got an answer, not an error")
                except ollama.ResponseError as exc:
                    assert (exc.status_code, exc.error) == (503, "gateway restarting")
                lines = await stream
                assert len(lines) >= 2  # the wait notices, then the answer
                event = json.loads(lines[-1].removeprefix("data: "))
                assert event["error"]["message"] == "gateway restarting"
                answered_in = time.monotonic() - sent
                await client._client.aclose()
            assert answered_in < 5  # a 45 s resume cannot finish in the grace: told at once
            assert proc.wait(15) == 0
            log = proc.stderr.read()
        assert "draining for up to 30 s: 0 requests in flight, 4 waiting for a GPU" in log
        assert "0 finished, 4 told to retry (gateway restarting), 0 cut" in log
        store = Store.open(gpuctl_home / "state", reader=True)
        try:
            assert list(store.pending_actions()) == [machine.id]  # the next start adopts it
        finally:
            store.close()

        # The next start adopts the resume (never sends a second) and serves once it is up.
        with sim.lock:
            machine.until = sim.clock.now() + 1.0  # the cloud finishes the resume soon
        env["GPUCTL_TIMING__POLL_INTERVAL_SECONDS"] = "0.1"
        with gpuctl_process("serve", "--port", "0", env=env) as proc:
            assert proc.stderr is not None
            async with httpx.AsyncClient(base_url=served_url(proc), timeout=20,
                                         headers={"Authorization": f"Bearer {secret}"}) as c:
                served = await c.post("/api/chat", json={"model": "llama3.2", "stream": False})
            assert served.status_code == 200, served.text
            assert served.headers["x-gpuctl-gpu"] == "gpu-a"
            assert sim.resume_posts[machine.id] == 1


async def test_a_waiter_likely_served_within_the_grace_keeps_its_place_through_the_drain(
    make_world: WorldFactory,
) -> None:
    """Queued behind a stream that is about to end (about one service time, well inside the
    30 s grace): the drain holds it, it is served, and nothing is turned away or cut."""
    async with make_world(GpuSpec("gpu-1", chunks=3), slots=1) as world:
        node = world.nodes["gpu-1"]
        node.hold_after = 1
        async with world.client() as c:
            async with c.stream("POST", "/api/chat", json={"model": "llama3.2"}) as first:
                lines = first.aiter_lines()
                assert json.loads(await lines.__anext__())["done"] is False
                waiting = asyncio.ensure_future(
                    c.post("/api/chat", json={"model": "llama3.2", "stream": False}))
                world.tasks.append(waiting)
                await eventually(lambda: world.engine.queue_depth() == 1)
                drained = asyncio.ensure_future(drain(world.app.gw, 30.0))
                world.tasks.append(drained)
                await asyncio.sleep(0.2)  # real time passing: the drain must not answer it
                assert not waiting.done() and world.engine.queue_depth() == 1
                late = await c.post("/api/chat", json={"model": "llama3.2"})
                assert (late.status_code, late.json()) == (503, {"error": "gateway restarting"})
                node.release()
                assert [json.loads(line) async for line in lines][-1]["done"] is True
            second = await asyncio.wait_for(waiting, 5)
            report = await asyncio.wait_for(drained, 5)
        assert second.status_code == 200
        assert (report.finished, report.turned_away, report.cut) == (2, 1, 0)


async def test_a_gateway_killed_between_recording_a_resume_and_sending_it_is_covered(
    gpuctl_home: Path, gpuctl_process: GpuctlProcess,
) -> None:
    """SIGKILL while the resume POST is on its way: the store says "resume pending", the
    cloud never got it. The next start sees that at once and sends it (before: it waited
    on a paused GPU for the bridge time or the startup timeout)."""
    sim = SurfApiSim(token=TOKEN, resume_seconds=1)
    node = SimOllama(["llama3.2"])
    keys = KeyStore.open(gpuctl_home / "state")
    _, secret = keys.create("alice")
    keys.close()
    with ServerThread(sim) as cloud_url, ServerThread(node) as node_url:
        machine = sim.add("gpu-a", ip="127.0.0.1")
        env = {
            "GPUCTL_CLOUD_API__BASE_URL": f"{cloud_url}/v1",
            "GPUCTL_CLOUD_API__MACHINE_NAME_FILTER": "gpu",
            "GPUCTL_GPU__OLLAMA_URL": f"http://{{ip}}:{node_url.rsplit(':', 1)[1]}",
            "GPUCTL_API_TOKEN": TOKEN,
            "GPUCTL_TIMING__POLL_INTERVAL_SECONDS": "0.2",
        }
        headers = {"Authorization": f"Bearer {secret}"}
        sim.hold_actions()
        with gpuctl_process("serve", "--port", "0", env=env) as proc:
            assert proc.stderr is not None
            async with httpx.AsyncClient(base_url=served_url(proc), timeout=20,
                                         headers=headers) as c:
                held = asyncio.ensure_future(c.post("/api/chat", json={"model": "llama3.2"}))
                deadline = time.monotonic() + 10
                while sim.held_actions < 1:
                    assert time.monotonic() < deadline, "the resume POST never came"
                    await asyncio.sleep(0.02)
                proc.kill()
                assert proc.wait(10) == -9
                with contextlib.suppress(httpx.HTTPError):  # the gateway died under it
                    await held
        sim.release_actions(drop=True)
        assert sim.resume_posts[machine.id] == 0  # the cloud never got it...
        store = Store.open(gpuctl_home / "state", reader=True)
        try:
            assert list(store.pending_actions()) == [machine.id]  # ...but it was recorded
        finally:
            store.close()

        with gpuctl_process("serve", "--port", "0", env=env) as proc:
            assert proc.stderr is not None
            match = re.search(r"http://([\d.]+:\d+)", proc.stderr.readline())
            assert match
            started = time.monotonic()
            async with httpx.AsyncClient(base_url=f"http://{match.group(1)}", timeout=20,
                                         headers=headers) as c:
                served = await c.post("/api/chat", json={"model": "llama3.2", "stream": False})
            assert served.status_code == 200, served.text
            assert time.monotonic() - started < 10  # not the 60 s bridge, not 600 s
            assert sim.resume_posts[machine.id] == 1
