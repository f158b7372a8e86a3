"""NodeClient against a simulated Ollama over a real loopback socket."""

from __future__ import annotations

import pytest

from gpuctl.cloud.base import Workspace
from gpuctl.errors import NodeError
from gpuctl.node.client import NodeClient, node_url
from gpuctl.sim.ollama import SimOllama
from gpuctl.sim.servers import bind_loopback, running

WS = Workspace(id="w1", name="gpu-a", status="running", ip="10.0.0.5",
               fqdn="gpu-a.myco.src.surf-hosted.nl", host_name="gpu-a")


def test_node_url_fills_every_placeholder_and_strips_the_slash() -> None:
    assert node_url("http://{ip}:11434/", WS) == "http://10.0.0.5:11434"
    assert node_url("https://{fqdn}", WS) == "https://gpu-a.myco.src.surf-hosted.nl"
    assert node_url("http://{host_name}.internal:8080", WS) == "http://gpu-a.internal:8080"


def test_node_url_without_the_needed_field_is_a_node_error() -> None:
    creating = WS.model_copy(update={"ip": None})
    with pytest.raises(NodeError, match="no ip"):
        node_url("http://{ip}:11434", creating)


def test_a_fixed_node_url_wins_over_the_template() -> None:
    static = WS.model_copy(update={"node_url": "https://lab.example.org/"})
    assert node_url("http://{ip}:11434", static) == "https://lab.example.org"


async def test_ready_tags_and_ps_read_the_node() -> None:
    sim = SimOllama(["llama3.2", "qwen2.5:7b"])
    sim.loaded.add("llama3.2:latest")
    async with running(sim) as url:
        client = NodeClient(url)
        try:
            assert await client.ready() is True
            assert sorted(m.name for m in await client.tags()) == [
                "llama3.2:latest", "qwen2.5:7b"]
            assert [m["name"] for m in await client.ps()] == ["llama3.2:latest"]
        finally:
            await client.aclose()


async def test_node_token_is_sent_as_bearer() -> None:
    sim = SimOllama(token="node-secret")
    async with running(sim) as url:
        client = NodeClient.for_workspace(
            WS.model_copy(update={"node_url": url}), "unused", token="node-secret")
        try:
            assert client.headers == {"Authorization": "Bearer node-secret"}
            assert len(await client.tags()) == 1
        finally:
            await client.aclose()
    assert sim.last_headers["authorization"] == "Bearer node-secret"


async def test_a_wrong_node_token_is_a_clear_node_error() -> None:
    sim = SimOllama(token="node-secret")
    async with running(sim) as url:
        client = NodeClient(url, token="wrong")
        try:
            with pytest.raises(NodeError, match="rejected the node token"):
                await client.tags()
        finally:
            await client.aclose()


async def test_a_node_that_is_down_is_not_ready_and_tags_fail_cleanly() -> None:
    sock = bind_loopback()  # a port nobody listens on: connections are refused
    port = sock.getsockname()[1]
    sock.close()
    client = NodeClient(f"http://127.0.0.1:{port}")
    try:
        assert await client.ready() is False
        with pytest.raises(NodeError, match="did not answer"):
            await client.tags()
    finally:
        await client.aclose()
