"""``gpu-node/Caddyfile`` run by a real ``caddy`` in front of a simulated Ollama node.

Caddy runs as a child process bound to 127.0.0.1, with the site address and the upstream
set through the same environment variables the compose file uses: plain HTTP for most
tests, and HTTPS with Caddy's internal CA (trusted by the test) for gpuctl's node client.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpuctl.cloud.base import Workspace
from gpuctl.errors import NodeError
from gpuctl.node.client import NodeClient, node_url
from gpuctl.sim.servers import ServerThread

from .fake_node import MODEL, FakeNode
from .support import CADDYFILE, CaddyProcess, caddy_env

pytestmark = pytest.mark.skipif(
    shutil.which("caddy") is None,
    reason="caddy is not installed (CI installs Debian's: apt-get install -y caddy)",
)

TOKEN = "node-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Node:
    """The fake node served from its own thread, and the Caddy in front of it."""

    def __init__(self, fake: FakeNode, server: ServerThread, caddy: CaddyProcess) -> None:
        self.fake = fake
        self.server = server
        self.caddy = caddy

    def release(self) -> None:
        self.server.call(self.fake.release())


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[FakeNode, ServerThread]]:
    fake = FakeNode(chunks=4)
    # Caddy keeps its upstream connections for minutes; granian keeps idle keep-alive
    # connections open (a short keep-alive would close one just as Caddy reuses it).
    server = ServerThread(fake)
    server.start()
    yield fake, server
    server.stop()


def _start_caddy(home: Path, scheme: str, upstream: str, token: str) -> CaddyProcess:
    caddy = CaddyProcess(home, scheme=scheme, upstream=upstream, token=token)
    try:
        caddy.wait_ready()
    except BaseException:
        caddy.stop()
        raise
    return caddy


@pytest.fixture(scope="module")
def node(
    fake_server: tuple[FakeNode, ServerThread], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    fake, server = fake_server
    upstream = server.url.removeprefix("http://")
    caddy = _start_caddy(tmp_path_factory.mktemp("caddy-http"), "http", upstream, TOKEN)
    yield Node(fake, server, caddy)
    caddy.stop()


@pytest.fixture(scope="module")
def tls_node(
    fake_server: tuple[FakeNode, ServerThread], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    fake, server = fake_server
    upstream = server.url.removeprefix("http://")
    caddy = _start_caddy(tmp_path_factory.mktemp("caddy-tls"), "https", upstream, TOKEN)
    yield Node(fake, server, caddy)
    caddy.stop()


# --- the token check ------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"bearer {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
    ],
    ids=["none", "wrong", "prefix", "longer", "lowercase-scheme", "no-scheme", "basic"],
)
def test_a_request_without_the_exact_token_gets_401(node: Node, headers: dict[str, str]) -> None:
    before = len(node.fake.requests)

    response = httpx.get(f"{node.caddy.url}/api/tags", headers=headers)

    assert response.status_code == 401
    assert response.json() == {"error": "unauthorized"}
    assert response.headers["www-authenticate"] == 'Bearer realm="gpuctl-node"'
    assert len(node.fake.requests) == before, "nothing reached Ollama"


def test_the_right_token_passes_and_stays_at_the_proxy(node: Node) -> None:
    response = httpx.get(f"{node.caddy.url}/api/tags", headers=AUTH)

    assert response.status_code == 200
    assert [m["name"] for m in response.json()["models"]] == [MODEL]
    forwarded = node.fake.requests[-1]
    assert forwarded["path"] == "/api/tags"
    assert "authorization" not in forwarded, "Ollama never sees the node token"
    upstream = node.server.url.removeprefix("http://")
    assert forwarded["host"] == upstream, "Host is the upstream's, which Ollama always accepts"


def test_upstream_errors_pass_through_unchanged(node: Node) -> None:
    response = httpx.get(f"{node.caddy.url}/api/nope", headers=AUTH)

    assert response.status_code == 404
    assert response.text == "404 page not found"


@pytest.mark.parametrize("token", ["", "short-token"], ids=["unset", "too-short"])
def test_a_node_without_a_usable_token_refuses_everything_with_503(
    fake_server: tuple[FakeNode, ServerThread], tmp_path: Path, token: str
) -> None:
    _, server = fake_server
    caddy = _start_caddy(tmp_path, "http", server.url.removeprefix("http://"), token)
    try:
        for headers in ({}, {"Authorization": f"Bearer {token}".strip()}):
            response = httpx.get(f"{caddy.url}/api/tags", headers=headers)
            assert response.status_code == 503
            assert "GPUCTL_NODE_TOKEN is not set" in response.json()["error"]
    finally:
        caddy.stop()


# --- streaming ------------------------------------------------------------------------


@pytest.mark.parametrize("accept", ["application/x-ndjson", "text/event-stream"])
def test_streamed_chunks_arrive_one_by_one(node: Node, accept: str) -> None:
    """The node writes line k+1 only after the test has read line k through the proxy.

    A proxy that buffered (whole body, or a few KB) would never deliver line 0 alone, and
    the read would time out: passing means each line was relayed as it was written.
    """
    fake = node.fake
    node.server.call(fake.reset())
    sent_before = len(fake.sent_at)
    received_at: list[float] = []
    node.release()  # line 0 may go (headers travel with it)
    with (
        httpx.Client(timeout=httpx.Timeout(5.0)) as client,
        client.stream(
            "POST",
            f"{node.caddy.url}/api/chat",
            headers={**AUTH, "Accept": accept},
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == accept
        lines = (line for line in response.iter_lines() if line)
        for k in range(fake.chunks):
            line = next(lines)
            received_at.append(time.monotonic())
            body = json.loads(line.removeprefix("data: "))
            assert body["done"] is (k == fake.chunks - 1)
            assert len(fake.sent_at) - sent_before == k + 1, (
                f"line {k} arrived while the node had written exactly {k + 1} lines"
            )
            if k + 1 < fake.chunks:
                node.release()
        assert list(lines) == []
    sent = fake.sent_at[sent_before:]
    assert all(sent[k] < received_at[k] for k in range(fake.chunks))
    assert all(received_at[k] < sent[k + 1] for k in range(fake.chunks - 1))


# --- gpuctl's node client through the proxy -------------------------------------------


def _workspace(**fields: Any) -> Workspace:
    return Workspace(id="ws-1", name="gpu-a10-1", status="running", **fields)


async def test_node_client_reaches_the_node_through_the_proxy(node: Node) -> None:
    port = node.caddy.port
    ws = _workspace(ip="127.0.0.1", fqdn="gpu-a10-1.src.surf-hosted.nl")
    client = NodeClient.for_workspace(ws, f"http://{{ip}}:{port}", token=TOKEN)
    try:
        assert client.base_url == node_url(f"http://{{ip}}:{port}", ws) == node.caddy.url
        assert await client.ready() is True
        assert [m.name for m in await client.tags()] == [MODEL]
        assert [m["name"] for m in await client.ps()] == [MODEL]
    finally:
        await client.aclose()


async def test_node_client_without_the_token_is_refused(node: Node) -> None:
    client = NodeClient(node.caddy.url, token=None)
    wrong = NodeClient(node.caddy.url, token="not-the-node-token-at-all")
    try:
        assert await client.ready() is False
        with pytest.raises(NodeError, match="rejected the node token"):
            await wrong.tags()
    finally:
        await client.aclose()
        await wrong.aclose()


async def test_node_client_reaches_the_node_over_https(tls_node: Node) -> None:
    """``https://…`` as in ``gpu.ollama_url = "https://{fqdn}"``, with Caddy's certificate
    checked against its internal CA (an IP-address site; a real node gets a public one)."""
    port = tls_node.caddy.port
    ws = _workspace(ip="127.0.0.1")
    trust = ssl.create_default_context(cafile=str(tls_node.caddy.root_cert))
    async with httpx.AsyncClient(verify=trust) as http:
        client = NodeClient.for_workspace(ws, f"https://{{ip}}:{port}", token=TOKEN, http=http)
        assert client.base_url.startswith("https://127.0.0.1:")
        assert await client.ready() is True
        assert [m.name for m in await client.tags()] == [MODEL]

    async with httpx.AsyncClient() as untrusting:
        client = NodeClient(tls_node.caddy.url, token=TOKEN, http=untrusting)
        assert await client.ready() is False, "an unknown CA is not trusted"


# --- the config itself ----------------------------------------------------------------


def _adapt(tmp_path: Path, **settings: str) -> dict[str, Any]:
    result = subprocess.run(
        ["caddy", "adapt", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
        env=caddy_env(tmp_path, **settings),
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "not formatted" not in result.stderr, "run: caddy fmt --overwrite gpu-node/Caddyfile"
    adapted: dict[str, Any] = json.loads(result.stdout)
    return adapted


def _find(obj: Any, key: str) -> list[Any]:
    """Every value stored under ``key`` anywhere in a JSON document."""
    found: list[Any] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                found.append(v)
            found.extend(_find(v, key))
    elif isinstance(obj, list):
        for item in obj:
            found.extend(_find(item, key))
    return found


def test_production_config_serves_the_fqdn_with_automatic_https(tmp_path: Path) -> None:
    config = _adapt(tmp_path, GPUCTL_NODE_FQDN="gpu-a10-1.src.surf-hosted.nl")
    (server,) = config["apps"]["http"]["servers"].values()

    assert config["admin"] == {"disabled": True}
    assert server["listen"] == ["0.0.0.0:443"]
    assert "automatic_https" not in server, "automatic HTTPS is on for the node's name"
    assert _find(server, "host") == [["gpu-a10-1.src.surf-hosted.nl"]]
    (proxy,) = [h for h in _find(server, "handle") for h in h if h["handler"] == "reverse_proxy"]
    assert proxy["upstreams"] == [{"dial": "ollama:11434"}]
    assert proxy["flush_interval"] == -1
    assert proxy["headers"]["request"]["delete"] == ["Authorization"]
    assert proxy["transport"]["dial_timeout"] == 5 * 10**9
    assert proxy["transport"]["response_header_timeout"] == 15 * 60 * 10**9
    assert server["read_header_timeout"] == 30 * 10**9


def test_the_token_never_appears_in_the_adapted_config(tmp_path: Path) -> None:
    """Caddy autosaves its config to disk; the token is read per request, never stored."""
    config = _adapt(tmp_path, GPUCTL_NODE_FQDN="node.example.org", GPUCTL_NODE_TOKEN=TOKEN)

    assert TOKEN not in json.dumps(config)
