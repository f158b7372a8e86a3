"""The gateway's node client: O(1) keep-alive pool, llhttp framing, the failures it reports."""

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
    UpstreamResponse,
    _Conn,
)
from gpuctl.sim.ollama import SimOllama
from gpuctl.sim.servers import running

from .raw_node import OK_CHUNKED, chunked, raw_node


async def test_sequential_requests_reuse_one_connection() -> None:
    async with running(SimOllama()) as url:
        pool = Pool()
        for _ in range(5):
            response = await pool.request(url, "GET", "/api/version", [])
            assert json.loads(await response.read()) == {"version": "0.12.6"}
        assert pool.opened == 1
        await pool.aclose()


async def test_chunked_stream_arrives_in_whole_lines() -> None:
    async with running(SimOllama(chunks=3)) as url:
        pool = Pool()
        body = json.dumps({"model": "llama3.2"}).encode()
        response = await pool.request(url, "POST", "/api/generate", [], body)
        assert response.header(b"content-type") == b"application/x-ndjson"
        pieces = [piece async for piece in response.chunks()]
        # Chunks that arrived together come as one piece; none is split.
        assert len(b"".join(pieces).splitlines()) == 4
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


class _Wire(asyncio.Transport):
    """A transport that swallows writes: the test feeds the node's side by hand."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _parse_in_reads(wire: bytes, cuts: list[int]) -> bytes:
    """The body ``_Conn`` makes of ``wire`` delivered in reads of the sizes in ``cuts``."""
    loop = asyncio.new_event_loop()
    try:
        async def run() -> bytes:
            conn = _Conn()
            conn.connection_made(_Wire())
            ready = conn.begin("POST")
            pos, i = 0, 0
            while pos < len(wire):
                step = cuts[i % len(cuts)]
                conn.data_received(wire[pos:pos + step])
                pos, i = pos + step, i + 1
            await ready
            response = UpstreamResponse(Pool(), Origin.parse("http://node"), conn)
            return await response.read()

        return loop.run_until_complete(run())
    finally:
        loop.close()


@given(st.lists(st.binary(min_size=1, max_size=40), min_size=0, max_size=8),
       st.lists(st.integers(min_value=1, max_value=30), min_size=1, max_size=20),
       st.booleans())
def test_a_chunked_body_parses_the_same_whatever_the_reads(
    pieces: list[bytes], cuts: list[int], interim: bool,
) -> None:
    head = b"HTTP/1.1 100 Continue\r\n\r\n" if interim else b""
    wire = head + OK_CHUNKED + chunked(*pieces)
    assert _parse_in_reads(wire, cuts) == b"".join(pieces)


@pytest.mark.parametrize("size", [b"-6", b"+5", b"5_0", b"0x5", b" 5", b"fffffffffffffffff"])
async def test_a_chunk_size_that_is_not_plain_hex_fails_the_response(size: bytes) -> None:
    reply = OK_CHUNKED + size + b"\r\nabcde\r\n0\r\n\r\n"
    async with raw_node([reply]) as (_, url):
        pool = Pool()
        response = await pool.request(url, "POST", "/api/chat", [], b"{}")
        with pytest.raises(UpstreamError, match=r"(?i)chunk size") as caught:
            await asyncio.wait_for(response.read(), 5)
        assert caught.value.sent
        await pool.aclose()


@pytest.mark.parametrize("header", [b"x-a: one\nx-injected: two", b"x-a: one\rx-b: two",
                                    b"x-a: \x00"])
async def test_a_header_value_with_a_bare_cr_lf_or_nul_fails_the_response(header: bytes
                                                                         ) -> None:
    reply = b"HTTP/1.1 200 OK\r\n" + header + b"\r\ncontent-length: 2\r\n\r\nok"
    async with raw_node([reply]) as (_, url):
        pool = Pool()
        with pytest.raises(UpstreamError, match="bad response"):
            await asyncio.wait_for(pool.request(url, "GET", "/api/tags", []), 5)
        await pool.aclose()


@pytest.mark.parametrize("interim", [b"HTTP/1.1 100 Continue\r\n\r\n",
                                     b"HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\n"
                                     b"HTTP/1.1 102 Processing\r\n\r\n"])
async def test_interim_responses_are_skipped_for_the_final_one(interim: bytes) -> None:
    final = b"HTTP/1.1 200 OK\r\nx-final: yes\r\ncontent-length: 2\r\n\r\nok"
    async with raw_node([interim, final]) as (_, url):
        pool = Pool()
        response = await pool.request(url, "POST", "/api/chat", [], b"{}")
        assert response.status == 200
        assert response.headers == [(b"x-final", b"yes"), (b"content-length", b"2")]
        assert await response.read() == b"ok"
        await pool.aclose()


async def test_a_body_cut_short_of_its_content_length_is_an_error_not_a_short_body() -> None:
    reply = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nonly5"
    async with raw_node([reply]) as (_, url):
        pool = Pool()
        response = await pool.request(url, "POST", "/api/chat", [], b"{}")
        with pytest.raises(UpstreamError, match="closed early") as caught:
            await asyncio.wait_for(response.read(), 5)
        assert caught.value.sent
        await pool.aclose()


async def test_bytes_after_a_complete_body_keep_the_body_but_not_the_connection() -> None:
    reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokGARBAGE"
    async with raw_node([reply], keep_open=True) as (node, url):
        pool = Pool()
        for _ in range(2):
            response = await pool.request(url, "GET", "/api/tags", [])
            assert await response.read() == b"ok"
        assert node.connections == 2
        await pool.aclose()


async def test_a_body_without_framing_ends_at_the_close() -> None:
    async with raw_node([b"HTTP/1.1 200 OK\r\n\r\nuntil ", b"the end"]) as (_, url):
        pool = Pool()
        response = await pool.request(url, "GET", "/api/tags", [])
        assert await asyncio.wait_for(response.read(), 5) == b"until the end"
        await pool.aclose()


async def test_a_response_head_past_the_limit_fails() -> None:
    reply = b"HTTP/1.1 200 OK\r\n" + b"x-big: " + b"a" * 70_000 + b"\r\n\r\n"
    async with raw_node([reply]) as (_, url):
        pool = Pool()
        with pytest.raises(UpstreamError, match="head over"):
            await asyncio.wait_for(pool.request(url, "GET", "/api/tags", []), 5)
        await pool.aclose()
