"""The gateway's node client: O(1) keep-alive pool, chunked framing, failures it reports."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpuctl.gateway.upstream import (
    Origin,
    Pool,
    PoolTransport,
    UpstreamError,
    _Conn,
    _RelayParser,
)
from gpuctl.sim.ollama import SimOllama
from gpuctl.sim.servers import running


async def test_sequential_requests_reuse_one_connection() -> None:
    async with running(SimOllama()) as url:
        pool = Pool()
        for _ in range(5):
            response = await pool.request(url, "GET", "/api/version", [])
            assert json.loads(await response.read()) == {"version": "0.12.6"}
        assert pool.opened == 1
        await pool.aclose()


async def test_chunked_stream_arrives_piece_by_piece() -> None:
    async with running(SimOllama(chunks=3)) as url:
        pool = Pool()
        body = json.dumps({"model": "llama3.2"}).encode()
        response = await pool.request(url, "POST", "/api/generate", [], body)
        assert response.header(b"content-type") == b"application/x-ndjson"
        pieces = [piece async for piece in response.chunks()]
        assert len(pieces) == 4
        assert all(p.endswith(b"\n") for p in pieces)
        await pool.aclose()


async def test_concurrent_requests_open_one_connection_each_then_pool_them() -> None:
    async with running(SimOllama()) as url:
        pool = Pool()

        async def one() -> int:
            response = await pool.request(url, "GET", "/api/tags", [])
            await response.read()
            return response.status

        assert await asyncio.gather(*(one() for _ in range(8))) == [200] * 8
        assert pool.opened == 8
        await asyncio.gather(*(one() for _ in range(8)))
        assert pool.opened == 8
        await pool.aclose()


async def test_abandoned_response_closes_its_connection() -> None:
    async with running(SimOllama(chunks=3)) as url:
        pool = Pool()
        response = await pool.request(url, "POST", "/api/chat", [], b'{"model":"llama3.2"}')
        await response.aclose()
        response = await pool.request(url, "GET", "/api/version", [])
        await response.read()
        assert pool.opened == 2
        await pool.aclose()


async def test_connection_refused_is_an_upstream_error() -> None:
    pool = Pool(connect_timeout=1)
    with pytest.raises(UpstreamError, match="cannot connect"):
        await pool.request("http://127.0.0.1:9", "GET", "/", [])


async def test_node_dying_mid_body_is_an_upstream_error_marked_sent() -> None:
    node = SimOllama(chunks=5)
    node.die_after = 1
    async with running(node) as url:
        pool = Pool()
        response = await pool.request(url, "POST", "/api/chat", [], b'{"model":"llama3.2"}')
        with pytest.raises(UpstreamError) as caught:
            async for _ in response.chunks():
                pass
        assert caught.value.sent
        await pool.aclose()


async def test_httpx_client_over_the_pool_transport() -> None:
    async with running(SimOllama()) as url:
        pool = Pool()
        async with httpx.AsyncClient(transport=PoolTransport(pool)) as client:
            r = await client.post(f"{url}/api/show", json={"model": "llama3.2"})
            assert r.status_code == 200 and "model_info" in r.json()
            missing = await client.get(f"{url}/nowhere")
            assert (missing.status_code, missing.text) == (404, "404 page not found")
        assert pool.opened == 1


def test_origin_keeps_the_path_prefix_and_default_ports() -> None:
    origin = Origin.parse("https://gpu-1.src.surf-hosted.nl/ollama/")
    assert (origin.scheme, origin.port, origin.prefix) == ("https", 443, "/ollama")
    assert origin.host_header == b"gpu-1.src.surf-hosted.nl"
    assert Origin.parse("http://10.0.0.5:11434").host_header == b"10.0.0.5:11434"


@given(st.lists(st.binary(min_size=1, max_size=40), min_size=0, max_size=8),
       st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=20))
def test_chunked_relay_parser_yields_each_piece_whatever_the_reads(
    pieces: list[bytes], cuts: list[int],
) -> None:
    wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    loop = asyncio.new_event_loop()
    try:
        done: asyncio.Future[None] = loop.create_future()
        got: list[bytes] = []
        parser = _RelayParser(_Conn(), "chunked", 0, got.append, done)
        pos, i = 0, 0
        while pos < len(wire):
            step = cuts[i % len(cuts)]
            parser.feed(wire[pos:pos + step])
            pos, i = pos + step, i + 1
        assert got == pieces
        assert done.done() and done.exception() is None
    finally:
        loop.close()
