"""Slow clients in numbers, bounded in count and time: memory stays under a stated bound.

The gateway runs in this test process, so its growth is this process's RSS growth while the
slow clients hold on (the world, the nodes and the clients exist before the baseline is
taken). Before granian, 24 key-less 63 MB uploads took the gateway from 172 MB to 1,750 MB,
and 8 slow readers from 66 to 297 MB.
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

from gpuctl.sim.waiting import eventually

from .raw_node import OK_CHUNKED, raw_node
from .world import GpuSpec, World, WorldFactory

MB = 1024 * 1024


def _rss() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def _connect(world: World) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(world.url)
    assert parts.hostname is not None and parts.port is not None
    return await asyncio.open_connection(parts.hostname, parts.port)


async def _health(world: World) -> None:
    async with world.client() as c:
        assert (await asyncio.wait_for(c.get("/health"), 1)).status_code == 200


async def test_slowloris_heads_cost_little_and_are_cut_off(make_world: WorldFactory) -> None:
    async with make_world(server={"header_timeout_seconds": 2}) as world:
        before = _rss()
        conns = [await _connect(world) for _ in range(200)]
        for _ in range(3):  # a byte of head per connection every 0.3 s
            for _, writer in conns:
                writer.write(b"P")
            await asyncio.sleep(0.3)
        assert _rss() - before < 32 * MB
        await _health(world)
        closed = await asyncio.wait_for(
            asyncio.gather(*(reader.read() for reader, _ in conns)), 10)
        assert all(data == b"" for data in closed)  # all cut off at the header timeout
        for _, writer in conns:
            writer.close()


async def test_key_less_uploads_are_not_buffered(make_world: WorldFactory) -> None:
    async with make_world() as world:
        before = _rss()
        conns = [await _connect(world) for _ in range(24)]
        head = (b"POST /api/chat HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % (63 * MB))
        chunk = b"x" * MB
        for _, writer in conns:
            writer.write(head)
            for _ in range(4):  # try to push 4 MB each before reading the answer
                writer.write(chunk)
        answers = await asyncio.wait_for(
            asyncio.gather(*(reader.readuntil(b"\r\n\r\n") for reader, _ in conns)), 10)
        assert all(a.startswith(b"HTTP/1.1 401 ") for a in answers)
        assert _rss() - before < 64 * MB
        for _, writer in conns:
            writer.close()
        await _health(world)


async def test_slow_bodies_with_a_key_are_timed_out(make_world: WorldFactory) -> None:
    async with make_world(server={"body_timeout_seconds": 1}) as world:
        before = _rss()
        conns = [await _connect(world) for _ in range(50)]
        head = (f"POST /api/chat HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
                f"{world.user_key}\r\nContent-Length: 1000\r\n\r\n").encode()
        for _, writer in conns:
            writer.write(head + b'{"model":')
        answers = await asyncio.wait_for(
            asyncio.gather(*(reader.readuntil(b"\r\n\r\n") for reader, _ in conns)), 10)
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers)
        assert _rss() - before < 32 * MB
        for _, writer in conns:
            writer.close()
        await _health(world)


async def test_slow_readers_hold_bounded_memory_then_lose_their_slots(
    make_world: WorldFactory,
) -> None:
    frames = [b"%x\r\n%s\r\n" % (256 * 1024, b"x" * 256 * 1024)] * 128  # 32 MB per answer
    async with raw_node([OK_CHUNKED, *frames, b"0\r\n\r\n"], keep_open=True) as (_, url), \
            make_world(GpuSpec("gpu-1", url=url), slots=8,
                       server={"stall_timeout_seconds": 2, "max_slots_per_user": 8}
                       ) as world:
        before = _rss()
        body = json.dumps({"model": "llama3.2"}).encode()
        head = (f"POST /api/chat HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
                f"{world.user_key}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        conns = [await _connect(world) for _ in range(8)]
        for _, writer in conns:
            writer.write(head + body)  # and never read
        await eventually(lambda: world.gpu("gpu-1").slots_in_use == 8)
        await asyncio.sleep(1)
        grown = _rss() - before
        await _health(world)
        await eventually(lambda: world.gpu("gpu-1").slots_in_use == 0, timeout=15)
        assert grown < 128 * MB, f"{grown / MB:.0f} MB for 8 slow readers"
        for _, writer in conns:
            writer.close()
