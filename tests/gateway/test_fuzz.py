"""Fuzzing both edges over real sockets: random request heads from clients, random answers
from a node. Whatever arrives, the gateway answers or closes within a bound, never hangs,
and ``/health`` answers within 1 s afterwards.

Each hypothesis example is a batch of cases run against one gateway (a world per case would
cost seconds each): shrinking still finds the smallest failing batch.
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .raw_node import RawNode, raw_node
from .world import GpuSpec, World, WorldFactory

CASES = 12
BOUND = 5.0  # seconds a case may take before it counts as a hang
FUZZ = settings(max_examples=8, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])


async def _health_within_a_second(world: World) -> None:
    async with httpx.AsyncClient(base_url=world.url, timeout=1) as c:
        assert (await asyncio.wait_for(c.get("/health"), 1)).status_code == 200


# -- node answers --------------------------------------------------------------------------------

_TOKENS = st.sampled_from([b"5", b"-6", b"+5", b"5_0", b"0x5", b"zz", b"", b"ffffffffffffffffff",
                           b"5;ext=1", b"5 ", b"0"])


@st.composite
def _node_reply(draw: st.DrawFn) -> list[bytes]:
    parts: list[bytes] = []
    for _ in range(draw(st.integers(0, 2))):
        parts.append(b"HTTP/1.1 %d Interim\r\n\r\n" % draw(st.sampled_from([100, 102, 103])))
    status = draw(st.sampled_from([200, 200, 200, 204, 400, 404, 500, 503]))
    head = [b"HTTP/1.1 %d X" % status, b"content-type: application/x-ndjson"]
    if draw(st.booleans()):
        head.append(b"x-odd: " + draw(st.binary(max_size=12)))
    body = draw(st.binary(max_size=64))
    framing = draw(st.sampled_from(["chunked", "length", "short", "long", "none", "both"]))
    if framing in ("chunked", "both"):
        head.append(b"transfer-encoding: chunked")
        frames = [b"%s\r\n%s\r\n" % (draw(_TOKENS) if draw(st.booleans()) else b"%x" % len(p), p)
                  for p in (body[:10], body[10:])]
        body = b"".join(frames) + (b"0\r\n\r\n" if draw(st.booleans()) else b"")
    if framing in ("length", "both"):
        head.append(b"content-length: %d" % len(body))
    elif framing == "short":
        head.append(b"content-length: %d" % (len(body) + 7))
    elif framing == "long":
        head.append(b"content-length: %d" % max(0, len(body) - 3))
    wire = b"\r\n".join(head) + b"\r\n\r\n" + body
    cut = draw(st.integers(0, len(wire)))
    wire = wire[:cut] if draw(st.booleans()) else wire
    pieces = draw(st.integers(1, 4))
    step = max(1, len(wire) // pieces)
    parts += [wire[i:i + step] for i in range(0, len(wire), step)]
    return parts


@FUZZ
@given(st.lists(_node_reply(), min_size=CASES, max_size=CASES))
async def test_whatever_a_node_answers_the_gateway_answers_or_closes_and_stays_up(
    make_world: WorldFactory, replies: list[list[bytes]],
) -> None:
    async with raw_node([]) as (node, url), \
            make_world(GpuSpec("gpu-1", url=url)) as world, world.client() as c:
        for reply in replies:
            await _node_case(world, node, c, reply)
        assert world.gpu("gpu-1").slots_in_use == 0


async def _node_case(world: World, node: RawNode, c: httpx.AsyncClient,
                     reply: list[bytes]) -> None:
    node.reply = reply
    body = {"model": "llama3.2", "stream": True}
    try:
        r = await asyncio.wait_for(c.post("/api/chat", json=body), BOUND)
        assert 200 <= r.status_code < 600
    except httpx.TransportError:
        pass  # the gateway closed the connection: allowed, a hang is not
    await _health_within_a_second(world)
    # A failed node is re-probed before it serves again; move engine time until it is back.
    await world.until(lambda: world.gpu("gpu-1").state.ready and
                      world.gpu("gpu-1").slots_in_use == 0, limit=300)


# -- client heads ------------------------------------------------------------------------------

_FIELD = st.sampled_from([
    b"Content-Length: 5", b"Content-Length: -1", b"Content-Length: 5, 5",
    b"Content-Length: 99999999999999999999", b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip, chunked", b"Transfer-Encoding: chunked\r\nContent-Length: 3",
    b"Expect: 100-continue", b"Connection: close", b"Upgrade: h2c", b"Host: a\r\nHost: b",
    b" folded: continuation", b"X-Nul: a\x00b", b"X-Lf: a\nb", b"Bad Name: x", b":",
    b"Authorization: Bearer ", b"Authorization: Basic Zm9v",
])


@st.composite
def _request(draw: st.DrawFn, key: str) -> bytes:
    method = draw(st.sampled_from([b"POST", b"GET", b"HEAD", b"PUT", b"P\x00ST", b"",
                                   b"OPTIONS"]))
    path = draw(st.sampled_from([b"/api/chat", b"/v1/chat/completions", b"/api/show",
                                 b"/health", b"*", b"/api/../etc", b"/%00", b""]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x"]))
    fields = [b"Host: gw"]
    if draw(st.booleans()):
        fields.append(f"Authorization: Bearer {key}".encode())
    fields += draw(st.lists(_FIELD, max_size=3))
    fields += draw(st.lists(st.binary(max_size=20), max_size=2))
    body = json.dumps({"model": "llama3.2", "stream": False}).encode()
    body = draw(st.sampled_from([body, b"", b"5\r\nhello\r\n0\r\n\r\n", b"{" * 3000]))
    ending = draw(st.sampled_from([b"\r\n\r\n", b"\n\n", b"\r\n"]))
    wire = method + b" " + path + b" " + version + b"\r\n" + b"\r\n".join(fields) + ending + body
    if draw(st.booleans()):
        wire = wire[:draw(st.integers(0, len(wire)))]
    return wire


@FUZZ
@given(st.data())
async def test_whatever_head_a_client_sends_the_gateway_answers_or_closes_and_stays_up(
    make_world: WorldFactory, data: st.DataObject,
) -> None:
    async with make_world(server={"header_timeout_seconds": 1,
                                  "body_timeout_seconds": 1}) as world:
        requests = data.draw(st.lists(_request(world.user_key), min_size=CASES,
                                      max_size=CASES))
        parts = urlsplit(world.url)
        assert parts.hostname is not None and parts.port is not None
        for wire in requests:
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
            try:
                writer.write(wire)
                await writer.drain()
                writer.write_eof()  # nothing more is coming: answer, or close
                answer = await asyncio.wait_for(reader.read(), BOUND)
                assert answer == b"" or answer.startswith(b"HTTP/1.")
            except OSError:
                pass  # reset, or closed before our half-close: allowed
            finally:
                writer.close()
            await _health_within_a_second(world)
        assert world.gpu("gpu-1").slots_in_use == 0
