"""The gateway's hot path to a node through the node's own proxy, as deployed.

The whole chain over real sockets on 127.0.0.1: the real ``ollama`` and ``openai`` clients
→ the gateway (``running_gateway``, the real engine on a fake clock) → ``caddy`` running
``gpu-node/Caddyfile`` → a simulated Ollama with no token of its own (on a node, Caddy is
the only door). The engine finds the node the way ``gpuctl serve`` does: the workspace's IP
filled into ``gpu.ollama_url`` and the real ``NodeClient`` factory with the node token
handed to the engine, so the probes pass through Caddy too. HTTPS uses Caddy's internal CA,
trusted through the standard ``SSL_CERT_FILE`` variable by both the probes (httpx) and the
gateway's own upstream pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from gpuctl.config import Config
from gpuctl.engine.clock import FakeClock
from gpuctl.engine.engine import Engine
from gpuctl.gateway.app import create_app
from gpuctl.gateway.server import running_gateway
from gpuctl.sim.cloud import SimCloud
from gpuctl.sim.ollama import SimOllama
from gpuctl.sim.servers import running
from gpuctl.sim.waiting import eventually
from gpuctl.store import Store
from gpuctl.store.keys import KeyStore

from .support import CaddyProcess

pytestmark = pytest.mark.skipif(
    shutil.which("caddy") is None,
    reason="caddy is not installed (CI installs Debian's: apt-get install -y caddy)",
)

TOKEN = "node-token-0123456789abcdef"
MODEL = "llama3.2:latest"
GPU = "gpu-a10-1"
SOCKET_TIMEOUT = 5.0


@dataclass
class Chain:
    """One running chain: client-facing gateway URL down to the node behind Caddy."""

    url: str
    user_key: str
    node: SimOllama
    caddy: CaddyProcess
    engine: Engine
    #: Where Caddy finds the node (``host:port``), the Host the node sees.
    upstream: str

    @contextlib.asynccontextmanager
    async def ollama(self) -> AsyncIterator[ollama.AsyncClient]:
        client = ollama.AsyncClient(host=self.url, timeout=SOCKET_TIMEOUT,
                                    headers={"Authorization": f"Bearer {self.user_key}"})
        close: Callable[[], Awaitable[None]] = client.close  # the ollama package is untyped
        try:
            yield client
        finally:
            await close()

    def openai(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=self.user_key,
                                  max_retries=0, timeout=SOCKET_TIMEOUT)

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=SOCKET_TIMEOUT,
                                 headers={"Authorization": f"Bearer {self.user_key}"})

    def slots_in_use(self) -> int:
        return self.engine.gpu(GPU).slots_in_use


ChainFactory = Callable[..., contextlib.AbstractAsyncContextManager[Chain]]


@pytest.fixture
def make_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ChainFactory:
    """``make_chain(scheme=..., gateway_token=...)``: the whole chain, torn down after.

    ``gateway_token`` is the token the gateway's hot path sends; the probes always use the
    right one (handed to the engine), so a wrong gateway token shows on the hot path alone.
    """

    @contextlib.asynccontextmanager
    async def factory(*, scheme: str = "http", gateway_token: str = TOKEN,
                      chunks: int = 4) -> AsyncIterator[Chain]:
        node = SimOllama([MODEL], chunks=chunks)  # no token: Caddy is its only door
        home = tmp_path / f"caddy-{scheme}"
        home.mkdir()
        store = Store.open(tmp_path / "state")
        keys = KeyStore.open(tmp_path / "state")
        _, user_key = keys.create("alice", email="alice@example.org")
        try:
            async with running(node) as node_url:
                caddy = CaddyProcess(home, scheme=scheme,
                                     upstream=node_url.removeprefix("http://"), token=TOKEN)
                try:
                    await asyncio.to_thread(caddy.wait_ready)
                    if scheme == "https":
                        # Trust Caddy's internal CA the standard way, for httpx and the pool.
                        monkeypatch.setenv("SSL_CERT_FILE", str(caddy.root_cert))
                    config = Config.model_validate({
                        "gpu": {"slots": 1, "ollama_url": f"{scheme}://{{ip}}:{caddy.port}"},
                    })
                    clock = FakeClock()
                    cloud = SimCloud(clock)
                    cloud.add(GPU, status="running", models=[MODEL], ip="127.0.0.1")
                    # nodes= left out: the engine's default NodeClient factory, as in serve.
                    engine = Engine(config, cloud, store, clock=clock, node_token=TOKEN)
                    app = create_app(config, engine, keys, node_token=gateway_token)
                    async with running_gateway(app) as url:
                        chain = Chain(url, user_key, node, caddy, engine,
                                      node_url.removeprefix("http://"))
                        async with chain.http() as client:  # the lifespan starts
                            await client.get("/health")      # the engine on first request
                        await eventually(lambda: engine.gpu(GPU).state.ready)
                        yield chain
                finally:
                    caddy.stop()
        finally:
            keys.close()
            store.close()

    return factory


# --- the happy path, streamed -----------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_ollama_stream_arrives_chunk_by_chunk_through_caddy(
    make_chain: ChainFactory, scheme: str
) -> None:
    """The node parks after its first chunk: that chunk must reach the client while the
    node holds, so neither the gateway nor Caddy buffered it."""
    async with make_chain(scheme=scheme) as chain:
        node = chain.node
        node.hold_after = 1
        async with chain.ollama() as client:
            stream = await client.chat(model=MODEL, stream=True,
                                       messages=[{"role": "user", "content": "hi"}])
            first = await asyncio.wait_for(stream.__anext__(), SOCKET_TIMEOUT)
            assert first.message.content == "tok0 "
            assert node.held_streams == 1, "the node is parked after chunk 0"
            assert chain.slots_in_use() == 1
            node.release()
            rest = [part async for part in stream]
        assert [p.message.content for p in rest[:-1]] == ["tok1 ", "tok2 ", "tok3 "]
        assert rest[-1].done is True
        assert node.completed_streams == 1
        assert chain.slots_in_use() == 0


async def test_openai_stream_arrives_chunk_by_chunk_through_caddy(
    make_chain: ChainFactory,
) -> None:
    async with make_chain() as chain:
        node = chain.node
        node.hold_after = 1
        client = chain.openai()
        try:
            stream = await client.chat.completions.create(
                model=MODEL, stream=True, messages=[{"role": "user", "content": "hi"}])
            first = await asyncio.wait_for(stream.__anext__(), SOCKET_TIMEOUT)
            assert first.choices[0].delta.content == "tok0 "
            assert node.held_streams == 1, "the node is parked after chunk 0"
            node.release()
            rest = [chunk async for chunk in stream]
        finally:
            await client.close()
        texts = [c.choices[0].delta.content for c in rest if c.choices and c.choices[0].delta]
        assert "".join(t or "" for t in texts) == "tok1 tok2 tok3 "
        assert node.completed_streams == 1


async def test_the_node_sees_neither_the_users_key_nor_the_node_token(
    make_chain: ChainFactory,
) -> None:
    """The gateway swaps the user's key for the node token; Caddy checks it and strips it."""
    async with make_chain() as chain:
        async with chain.ollama() as client:
            answer = await client.chat(model=MODEL, stream=False, messages=[])
        assert answer.message.content
        node = chain.node
        assert node.last_path == "/api/chat"
        assert "authorization" not in node.last_headers
        seen = " ".join(node.last_headers.values())
        assert chain.user_key not in seen
        assert TOKEN not in seen
        assert node.last_headers["host"] == chain.upstream


async def test_the_engine_probes_reach_the_node_through_caddy(
    make_chain: ChainFactory,
) -> None:
    """Readiness and models come from real NodeClient probes with the node token: the node
    behind Caddy answers nothing without it, so a ready GPU proves the token got through."""
    async with make_chain() as chain:
        gpu = chain.engine.gpu(GPU)
        assert gpu.state.ready
        assert chain.node.requests["/"] >= 1
        assert chain.node.requests["/api/tags"] >= 1
        assert gpu.models == [MODEL]
        assert gpu.base_url == chain.caddy.url


# --- a wrong node token on the gateway --------------------------------------------------


async def test_a_wrong_gateway_node_token_is_a_clear_502_not_the_nodes_401(
    make_chain: ChainFactory,
) -> None:
    async with make_chain(gateway_token="not-the-node-token-at-all") as chain:
        async with chain.http() as http:
            response = await http.post("/api/chat", json={"model": MODEL, "stream": False})
        assert response.status_code == 502
        error = response.json()["error"]
        assert GPU in error
        assert "refused the gateway's node token (HTTP 401)" in error
        assert "www-authenticate" not in response.headers, "the user's key was fine"
        assert chain.node.requests["/api/chat"] == 0, "nothing reached Ollama"
        assert chain.slots_in_use() == 0
        assert "node token" in (chain.engine.gpu(GPU).last_error or "")


async def test_a_wrong_gateway_node_token_reaches_ollama_and_openai_clients_as_502(
    make_chain: ChainFactory,
) -> None:
    async with make_chain(gateway_token="not-the-node-token-at-all") as chain:
        async with chain.ollama() as client:
            with pytest.raises(ollama.ResponseError) as caught:
                await client.chat(model=MODEL, stream=False, messages=[])
        assert caught.value.status_code == 502
        assert "node token" in caught.value.error

        # The failed GPU is re-probed (with the right token) and comes back: wait for it.
        await eventually(lambda: chain.engine.gpu(GPU).state.ready)
        oai = chain.openai()
        try:
            with pytest.raises(openai.APIStatusError) as refused:
                await oai.chat.completions.create(model=MODEL, messages=[])
        finally:
            await oai.close()
        assert refused.value.status_code == 502
        assert "node token" in str(refused.value.message)
        assert chain.node.requests["/api/chat"] == 0
        assert chain.node.requests["/v1/chat/completions"] == 0


# --- a client that goes away -------------------------------------------------------------


async def test_a_disconnecting_client_frees_its_slot_through_caddy(
    make_chain: ChainFactory,
) -> None:
    """Closing mid-stream frees the only slot at once: the next request is served while
    the abandoned stream is still parked on the node.

    Caddy (2.6.2, Debian's) does not cancel its upstream request while the node is silent;
    it notices the client is gone when it next relays a token, and drops the connection to
    Ollama then. So the test asserts what the gateway owns, the slot, not the node's stop.
    """
    async with make_chain() as chain:
        node = chain.node
        node.hold_after = 1
        async with chain.http() as http, http.stream(
            "POST", "/api/chat", json={"model": MODEL, "messages": []}
        ) as response:
            assert response.status_code == 200
            first = await asyncio.wait_for(response.aiter_lines().__anext__(), SOCKET_TIMEOUT)
            assert '"tok0 "' in first
            assert chain.slots_in_use() == 1
        await eventually(lambda: chain.slots_in_use() == 0)

        node.hold_after = None  # new streams run through; the abandoned one stays parked
        async with chain.ollama() as client:
            answer = await asyncio.wait_for(
                client.chat(model=MODEL, stream=False, messages=[]), SOCKET_TIMEOUT)
        assert answer.message.content == "tok0 tok1 tok2 tok3 "
        assert node.held_streams == 1, "served beside the abandoned stream, not after it"
        assert chain.slots_in_use() == 0
        node.release()  # let the abandoned stream end before the servers stop


async def test_the_gateway_checks_the_nodes_certificate(
    make_chain: ChainFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``SSL_CERT_FILE`` naming Caddy's CA, the hot path refuses the node's
    certificate: a 502 naming the GPU and the reason, never an unverified connection."""
    async with make_chain(scheme="https") as chain:
        # The probes' client already trusts the CA; the pool reads it at each connect.
        monkeypatch.delenv("SSL_CERT_FILE")
        async with chain.http() as http:
            response = await http.post("/api/chat", json={"model": MODEL, "stream": False})
        assert response.status_code == 502
        error = response.json()["error"]
        assert GPU in error
        assert "CERTIFICATE_VERIFY_FAILED" in error
        assert chain.node.requests["/api/chat"] == 0
