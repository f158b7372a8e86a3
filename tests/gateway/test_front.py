"""The front server over raw sockets: it serves only heads it is sure of, pipes the rest.

Two levels. ``Front`` runs ``FrontServer`` alone, with a recording ASGI app and, as the
backend, a Unix socket that records the bytes it is handed: so a test sees exactly what the
front served itself and what it passed to Hypercorn, byte for byte. The tests at the end run
the real gateway (``make_world``), where Hypercorn (h11) answers what the front declined.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gpuctl.gateway.front import FrontServer
from gpuctl.gateway.head import MAX_HEAD, MAX_HEADERS
from gpuctl.gateway.replies import Message

from .world import GpuSpec, WorldFactory, eventually

TIMEOUT = 5.0
PIPED_REPLY = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 6\r\nconnection: close\r\n\r\npiped!"


# -- a front alone, between a recording app and a recording backend -------------------------


@dataclass
class Call:
    scope: dict[str, Any]
    body: bytes
    disconnected: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Front:
    server: FrontServer
    port: int
    calls: list[Call]
    piped: list[bytes]  # what the backend received, one entry per piped connection
    hold: asyncio.Event  # the app answers only once this is set

    async def exchange(self, *pieces: bytes, half_close: bool = True) -> bytes:
        """Send ``pieces`` (one write each, drained), then read until the server closes."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
            if half_close:
                writer.write_eof()
            return await asyncio.wait_for(reader.read(), TIMEOUT)
        finally:
            writer.close()


class RecordingApp:
    """Echoes the body it got as JSON with the path; ``hold`` gates the answer."""

    def __init__(self, calls: list[Call], hold: asyncio.Event) -> None:
        self.calls = calls
        self.hold = hold

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        message: Message = await receive()
        call = Call(scope, message["body"])
        self.calls.append(call)
        direct = scope["extensions"]["gpuctl.direct"]
        direct.on_disconnect(call.disconnected.set)
        await self.hold.wait()
        body = json.dumps({"path": scope["path"], "body": call.body.decode()}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def front() -> AsyncIterator[Front]:
    calls: list[Call] = []
    piped: list[bytes] = []
    hold = asyncio.Event()
    hold.set()

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        piped.append(await asyncio.wait_for(reader.read(), TIMEOUT))  # until the half-close
        writer.write(PIPED_REPLY)
        writer.close()

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "backend.sock")
        backend_server = await asyncio.start_unix_server(backend, path)
        server = FrontServer(RecordingApp(calls, hold), path, max_body=1000)
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(server.protocol, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        try:
            yield Front(server, port, calls, piped, hold)
        finally:
            listener.close()
            await server.drain(1.0)
            backend_server.close()


def request(*headers: str, body: bytes = b"hello", line: str = "POST /api/chat HTTP/1.1",
            length: bool = True) -> bytes:
    """A request in wire form; ``Host`` and (unless ``length`` is false) a right
    ``Content-Length`` come first."""
    lines = [line, "Host: gw"]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    lines += headers
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream into HTTP/1.1 responses, honouring their framing exactly."""
    out: list[tuple[int, dict[str, str], bytes]] = []
    while raw:
        head, sep, raw = raw.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {head!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
        if "content-length" in headers:
            size = int(headers["content-length"])
            body, raw = raw[:size], raw[size:]
            assert len(body) == size, "response body cut short"
        else:
            assert headers.get("transfer-encoding") == "chunked"
            body = b""
            while True:
                size_line, _, raw = raw.partition(b"\r\n")
                size = int(size_line, 16)
                body, raw = body + raw[:size], raw[size + 2:]
                if size == 0:
                    break
        out.append((int(status_line.split()[1]), headers, body))
    return out


# -- what the front must leave to Hypercorn, byte for byte ----------------------------------

DOUBTFUL = {
    "duplicate equal Content-Length": request("Content-Length: 5"),
    "conflicting Content-Length": request("Content-Length: 6"),
    "Content-Length list": request("Content-Length: 5, 5", length=False),
    "Content-Length with plus sign": request("Content-Length: +5", length=False),
    "Content-Length with minus sign": request("Content-Length: -5", length=False),
    "Content-Length with inner space": request("Content-Length: 0 5", length=False),
    "Content-Length in hex": request("Content-Length: 0x5", length=False),
    "empty Content-Length": request("Content-Length:", length=False),
    "huge Content-Length": request("Content-Length: " + "9" * 40, length=False),
    "no Content-Length": request(length=False, body=b""),
    "space before the colon": request("Content-Length : 5", length=False),
    "tab before the colon": request("Content-Length\t: 5", length=False),
    "obs-fold continuation line": request("X-Note: one", " two"),
    "obs-fold with a tab": request("X-Note: one", "\ttwo"),
    "folded Content-Length": request("Content-Length:", " 5", length=False),
    "invalid token char in a name": request("X(Note): 1"),
    "space inside a name": request("X Note: 1"),
    "NUL in a name": request("X-No\x00te: 1"),
    "NUL in a value": request("X-Note: a\x00b"),
    "bare CR in a value": request("X-Note: a\rb"),
    "one bare LF line ending": request("X-Note: 1\nX-Other: 2"),
    "Transfer-Encoding with Content-Length": request(
        "Transfer-Encoding: chunked", body=b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n"),
    "Content-Length then Transfer-Encoding": request(
        "Content-Length: 5", "Transfer-Encoding: chunked", length=False),
    "Transfer-Encoding with space before colon": request("Transfer-Encoding : chunked"),
    "Transfer-Encoding alone": request("Transfer-Encoding: chunked", length=False,
                                       body=b"5\r\nhello\r\n0\r\n\r\n"),
    "Expect 100-continue": request("Expect: 100-continue"),
    "Upgrade": request("Upgrade: h2c", "Connection: Upgrade"),
    "lowercase method": request(line="post /api/chat HTTP/1.1"),
    "absolute-form target": request(line="POST http://gw/api/chat HTTP/1.1"),
    "HTTP/1.0": request(line="POST /api/chat HTTP/1.0"),
    "two spaces after the method": request(line="POST  /api/chat HTTP/1.1"),
    "two spaces before the version": request(line="POST /api/chat  HTTP/1.1"),
    "trailing space in the request line": request(line="POST /api/chat HTTP/1.1 "),
    "NUL in the target": request(line="POST /api/chat\x00x HTTP/1.1"),
    "no Host": b"POST /api/chat HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
    "two Hosts": request("Host: other"),
    "too many headers": request(*(f"X-N{i}: {i}" for i in range(MAX_HEADERS))),
    "oversized head": request("X-Big: " + "a" * MAX_HEAD),
    "a GET, not a hot request": request(line="GET /api/chat HTTP/1.1", length=False, body=b""),
    "a POST to a path that is not hot": request(line="POST /api/pull HTTP/1.1"),
}


@pytest.mark.parametrize("raw", DOUBTFUL.values(), ids=DOUBTFUL.keys())
async def test_a_doubtful_request_goes_to_hypercorn_byte_for_byte(front: Front, raw: bytes
                                                                  ) -> None:
    answer = await front.exchange(raw)

    assert front.calls == []  # the front served nothing itself
    assert front.piped == [raw]
    assert answer == PIPED_REPLY


async def test_a_head_with_bare_lf_line_endings_is_piped_not_awaited(front: Front) -> None:
    # No CRLFCRLF ever comes: the front must not wait for one (h11 accepts bare LF).
    raw = b"POST /api/chat HTTP/1.1\nHost: gw\nContent-Length: 5\n\nhello"

    answer = await front.exchange(raw)

    assert (front.calls, front.piped, answer) == ([], [raw], PIPED_REPLY)


async def test_a_piped_head_sent_byte_by_byte_arrives_whole(front: Front) -> None:
    raw = request("Content-Length: 6")

    await front.exchange(*(raw[i:i + 1] for i in range(len(raw))))

    assert (front.calls, front.piped) == ([], [raw])


# -- what the front serves itself ----------------------------------------------------------


async def test_a_clean_hot_request_is_served_with_its_scope(front: Front) -> None:
    raw = request("Authorization: Bearer k", "X-Note:  spaced\t", "Connection: close",
                  line="POST /api/chat?x=1 HTTP/1.1")

    (status, _, body), = responses(await front.exchange(raw, half_close=False))

    assert front.piped == []
    assert (status, json.loads(body)) == (200, {"path": "/api/chat", "body": "hello"})
    scope = front.calls[0].scope
    assert (scope["method"], scope["query_string"]) == ("POST", b"x=1")
    assert (b"x-note", b"spaced") in scope["headers"]  # OWS around a value is legal
    assert (b"content-length", b"5") in scope["headers"]


async def test_a_head_sent_byte_by_byte_is_served(front: Front) -> None:
    raw = request("Connection: close")

    answer = await front.exchange(*(raw[i:i + 1] for i in range(len(raw))), half_close=False)

    assert [(s, json.loads(b)["body"]) for s, _, b in responses(answer)] == [(200, "hello")]
    assert front.piped == []


async def test_two_pipelined_posts_in_one_write_are_answered_in_order(front: Front) -> None:
    raw = request(body=b"first") + request("Connection: close", body=b"second!")

    answer = await front.exchange(raw, half_close=False)

    assert [(s, json.loads(b)["body"]) for s, _, b in responses(answer)] == [
        (200, "first"), (200, "second!")]
    assert "connection" not in responses(answer)[0][1]  # the first kept the connection open
    assert front.piped == []


async def test_a_hot_post_then_a_get_pipelined_serves_one_and_pipes_the_other(front: Front
                                                                              ) -> None:
    get = b"GET /api/tags HTTP/1.1\r\nHost: gw\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
    try:
        writer.write(request() + get)  # both in one write
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        size = int(first.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        first += await asyncio.wait_for(reader.readexactly(size), TIMEOUT)
        writer.write_eof()  # the recording backend answers once its input ends
        rest = await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()

    assert [(s, json.loads(b)["body"]) for s, _, b in responses(first)] == [(200, "hello")]
    assert rest == PIPED_REPLY  # the GET's answer, after the POST's
    assert front.piped == [get]


async def test_a_body_over_the_limit_is_answered_from_its_length_and_dropped(front: Front
                                                                             ) -> None:
    front.hold.clear()  # the app answers once the test has pushed more body
    reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
    try:
        writer.write(request(body=b"x" * 100_000, length=False)
                     .replace(b"\r\n\r\n", b"\r\nContent-Length: 10000000\r\n\r\n", 1))
        await writer.drain()
        await eventually(lambda: len(front.calls) == 1)
        for _ in range(20):
            writer.write(b"y" * 100_000)
            await writer.drain()
        await eventually(lambda: sum(c._discard for c in front.server.connections)
                         == 10_000_000 - 2_100_000)

        assert [len(c.buffer) for c in front.server.connections] == [0]  # nothing held
        assert front.calls[0].body == b""  # the app judges by Content-Length alone
        front.hold.set()
        answer = await asyncio.wait_for(reader.read(), TIMEOUT)  # FIN after the answer
    finally:
        writer.close()

    (status, headers, _), = responses(answer)
    assert (status, headers["connection"]) == (200, "close")
    assert front.piped == []


async def test_a_client_leaving_mid_body_leaves_nothing_behind(front: Front) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", front.port)
    writer.write(request(body=b"x" * 500)[:-100])
    await writer.drain()
    await eventually(lambda: any(c.buffer for c in front.server.connections))
    writer.close()

    await eventually(lambda: not front.server.connections)
    assert front.calls == [] and front.piped == []
    assert not front.server.tasks


async def test_a_client_half_closing_mid_request_is_taken_as_gone(front: Front) -> None:
    front.hold.clear()  # the app is still working when the client half-closes
    reader, writer = await asyncio.open_connection("127.0.0.1", front.port)
    try:
        writer.write(request())
        await writer.drain()
        await eventually(lambda: len(front.calls) == 1)
        writer.write_eof()

        await asyncio.wait_for(front.calls[0].disconnected.wait(), TIMEOUT)
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    finally:
        writer.close()
        front.hold.set()


# -- the real gateway: Hypercorn answers what the front declined ----------------------------


async def raw_exchange(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()


def chat(key: str, *extra: str, body: bytes | None = None, length: bool = True) -> bytes:
    body = body if body is not None else b'{"model": "llama3.2", "stream": false}'
    return request(f"Authorization: Bearer {key}", *extra, body=body, length=length)


@pytest.mark.parametrize("extra", [
    ("Content-Length: 7",),
    ("Content-Length : 38",),
    ("X-Note: one", " two"),
    ("Transfer-Encoding: chunked",),
    ("X-Big: " + "a" * MAX_HEAD,),
], ids=["duplicate length", "space before colon", "obs-fold", "chunked with a length",
        "oversized head"])
async def test_the_gateway_rejects_malformed_framing_with_400(
    make_world: WorldFactory, extra: tuple[str, ...],
) -> None:
    async with make_world(GpuSpec("gpu-1")) as world:
        smuggled = b"GET /api/tags HTTP/1.1\r\nHost: gw\r\n\r\n"
        raw = chat(world.user_key, *extra, "Connection: close") + smuggled

        answer = await raw_exchange(world.url, raw)

        assert answer.startswith(b"HTTP/1.1 400 ")
        assert world.nodes["gpu-1"].requests["/api/chat"] == 0
        assert world.nodes["gpu-1"].requests["/api/tags"] == 0


async def test_the_gateway_answers_413_without_reading_the_body(make_world: WorldFactory
                                                                ) -> None:
    async with make_world(GpuSpec("gpu-1"), max_body_mb=0.001) as world:
        raw = chat(world.user_key, "Content-Length: 50000000", length=False, body=b"{")

        answer = await raw_exchange(world.url, raw)  # 50 MB announced, 1 byte sent

        (status, headers, body), = responses(answer)
        assert (status, headers["connection"]) == (413, "close")
        assert "server.max_body_mb" in json.loads(body)["error"]
        assert world.nodes["gpu-1"].requests["/api/chat"] == 0


async def test_the_gateway_answers_a_pipelined_chat_and_listing_in_order(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1")) as world:
        tags = (f"GET /api/tags HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {world.user_key}"
                "\r\nConnection: close\r\n\r\n").encode()
        raw = chat(world.user_key) + chat(world.user_key) + tags

        answer = await raw_exchange(world.url, raw)

        (s1, h1, b1), (s2, _, b2), (s3, _, b3) = responses(answer)
        assert (s1, s2, s3) == (200, 200, 200)
        assert json.loads(b1)["done"] and json.loads(b2)["done"]
        assert h1["x-gpuctl-gpu"] == "gpu-1"  # served by the hot path
        assert [m["name"] for m in json.loads(b3)["models"]] == ["llama3.2:latest"]
        assert world.nodes["gpu-1"].requests["/api/chat"] == 2
