"""The gateway's edges under hostile clients, over real sockets: each limit, broken on purpose.

Every test here failed on the hand-written front server (or had no limit to test): bodies
read before the key, JSON that crashed the parser, no header timeout, no TLS.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import resource
import socket
import ssl
import time
import warnings
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gpuctl.gateway.jsonbody import MAX_DEPTH
from gpuctl.gateway.logs import BURST, WINDOW, RepeatLimit
from gpuctl.gateway.server import raise_fd_limit
from gpuctl.gateway.silent import SilentConnections, tcp_activity
from gpuctl.sim.waiting import eventually

from .raw_node import OK_CHUNKED, raw_node
from .world import GpuSpec, WorldFactory

TIMEOUT = 5.0


async def _open(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return await asyncio.open_connection(parts.hostname, parts.port)


async def _read_all(reader: asyncio.StreamReader, timeout: float = TIMEOUT) -> bytes:
    """Everything the server sends until it closes (bounded in time)."""
    return await asyncio.wait_for(reader.read(), timeout)


def _head(path: str, *, key: str | None, length: int, extra: bytes = b"") -> bytes:
    auth = f"Authorization: Bearer {key}\r\n".encode() if key else b""
    return (f"POST {path} HTTP/1.1\r\nHost: gw\r\n".encode() + auth + extra
            + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % length)


# -- the key before the body -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions", "/api/show",
                                  "/api/pull", "/gpu/gpu-1/resume"])
@pytest.mark.parametrize("key", [None, "sk-wrong"])
async def test_a_request_without_a_good_key_is_refused_before_its_body_is_sent(
    make_world: WorldFactory, path: str, key: str | None,
) -> None:
    async with make_world() as world:
        reader, writer = await _open(world.url)
        # Announce 60 MB, send none of it: the answer must come from the head alone.
        writer.write(_head(path, key=key, length=60 * 1024 * 1024))
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 401 ")


async def test_a_user_key_on_an_admin_route_is_refused_before_its_body(
    make_world: WorldFactory,
) -> None:
    async with make_world() as world:
        reader, writer = await _open(world.url)
        writer.write(_head("/api/pull", key=world.user_key, length=60 * 1024 * 1024))
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 403 ")


# -- JSON that is not a usable object ----------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions", "/api/show"])
@pytest.mark.parametrize("body", [
    b'{"model": "llama3.2", "x": ' + b"[" * 2000 + b"]" * 2000 + b"}",
    b'{"model": "llama3.2", "x": ' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"}",
    b'{"model": "\\ud800"}',
    b'{"model": "llama3.2", "messages": [{"role": "user", "content": "\\udfff x"}]}',
    b"\xff\xfe not json",
])
async def test_json_too_deep_or_undecodable_is_a_400_with_an_error(
    make_world: WorldFactory, path: str, body: bytes,
) -> None:
    async with make_world() as world, world.client() as c:
        r = await c.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400
        error = r.json()["error"]
        assert error if isinstance(error, str) else error["message"]


async def test_json_nested_within_the_limit_and_paired_surrogates_still_pass(
    make_world: WorldFactory,
) -> None:
    nested: object = "ok"
    for _ in range(MAX_DEPTH - 8):
        nested = [nested]
    body = {"model": "llama3.2", "stream": False, "options": {"deep": nested},
            "messages": [{"role": "user", "content": "emoji \U0001f600"}]}
    async with make_world() as world, world.client() as c:
        # json.dumps writes the emoji as a surrogate pair escape: valid, and relayed.
        r = await c.post("/api/chat", content=json.dumps(body).encode(),
                         headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text


# -- slow heads ------------------------------------------------------------------------------


async def test_a_head_sent_too_slowly_is_cut_off_at_the_header_timeout(
    make_world: WorldFactory,
) -> None:
    async with make_world(server={"header_timeout_seconds": 1}) as world:
        reader, writer = await _open(world.url)
        started = time.monotonic()
        writer.write(b"POST /api/chat HTTP/1.1\r\nHost: gw\r\n")  # and never the rest
        await writer.drain()
        await _read_all(reader, timeout=TIMEOUT)
        writer.close()
        assert time.monotonic() - started < 3
        async with world.client() as c:  # and the gateway serves on
            assert (await c.get("/health")).status_code == 200


async def test_connections_that_never_send_a_byte_are_closed_at_the_header_timeout(
    make_world: WorldFactory,
) -> None:
    """granian's header timer starts at the first byte: without the sweeper these stayed
    open for good, each holding a share of ``server.max_connections``."""
    async with make_world(server={"header_timeout_seconds": 1}) as world:
        silent = [await _open(world.url) for _ in range(64)]
        talking, talking_writer = await _open(world.url)
        talking_writer.write(b"GET /health HTTP/1.1\r\nHost: gw\r\n")  # half a head: hyper's
        started = time.monotonic()
        closed = await asyncio.wait_for(
            asyncio.gather(*(reader.read() for reader, _ in silent)), 8)
        assert closed == [b""] * 64
        assert time.monotonic() - started < 7
        assert await _read_all(talking) == b""  # hyper timed the half head out itself
        for _, writer in [*silent, (talking, talking_writer)]:
            writer.close()
        async with world.client() as c:  # and the gateway serves on
            assert (await c.get("/health")).status_code == 200


async def test_a_request_held_longer_than_the_header_timeout_is_not_closed_as_silent(
    make_world: WorldFactory,
) -> None:
    """The sweeper closes only what never spoke: a request waiting for a waking GPU (its
    client silent for minutes after the head) is served."""
    async with make_world(GpuSpec("gpu-1", status="paused"),
                          server={"header_timeout_seconds": 1}) as world:
        reader, writer = await _open(world.url)
        body = b'{"model": "llama3.2", "stream": false}'
        writer.write(_head("/api/chat", key=world.user_key, length=len(body)) + body)
        await writer.drain()
        await eventually(lambda: world.engine.queue_depth() == 1)
        # Real time, not the engine's: the sweeper reads the kernel's silence counter, which
        # passes the 1 s timeout here (several sweeps run meanwhile).
        await asyncio.sleep(2.5)
        await world.until(lambda: world.gpu("gpu-1").state.ready)
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 ")


def test_the_sweeper_reads_what_the_kernel_says_a_connection_did() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    sweeper = SilentConnections(listener, 0.2, tls=False)
    quiet = socket.create_connection(listener.getsockname())
    spoken = socket.create_connection(listener.getsockname())
    accepted = [listener.accept()[0] for _ in range(2)]
    try:
        spoken.sendall(b"GET")
        fresh = [tcp_activity(s) for s in accepted]
        assert all(a is not None and a.silent_seconds < 0.2 for a in fresh)
        assert sweeper.sweep() == 0  # too young to judge
        time.sleep(0.3)  # real time: the kernel counts the silence
        assert sweeper.sweep() == 1
        assert quiet.recv(10) == b""  # the silent one was shut down
        spoken.settimeout(0.2)
        with pytest.raises(TimeoutError):
            spoken.recv(10)  # the one that spoke is untouched
        assert sweeper.sweep() == 0 and sweeper.closed == 1
    finally:
        for s in (listener, quiet, spoken, *accepted):
            s.close()


# -- file descriptors ----------------------------------------------------------------------------


def test_the_open_file_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and soft == hard and hard > 64:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard // 2, hard))
        raised = raise_fd_limit()
        assert raised == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raised == hard or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- TLS -----------------------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "gateway.crt", directory / "gateway.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_tls_serves_the_api_over_tls_1_2_and_1_3_only(make_world: WorldFactory,
                                                            tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server = {"tls_cert": str(cert), "tls_key": str(key)}
    async with make_world(server=server) as world:
        assert world.url.startswith("https://")
        trusting = ssl.create_default_context(cafile=str(cert))
        async with world.client(verify=trusting) as c:
            assert (await c.get("/health")).status_code == 200
            r = await c.post("/api/chat", json={"model": "llama3.2", "stream": False})
            assert r.status_code == 200 and r.json()["done"] is True
        async with world.client(verify=False) as c:  # the key never crosses in clear text
            plain = world.url.replace("https://", "http://")
            with pytest.raises(httpx.HTTPError):
                await c.get(f"{plain}/api/tags")
        async with world.client(verify=trusting, http2=True) as c:  # h2 over ALPN
            r = await c.post("/api/chat", json={"model": "llama3.2", "stream": False})
            assert (r.http_version, r.status_code) == ("HTTP/2", 200)
        tls12 = ssl.create_default_context(cafile=str(cert))
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2  # granian's own minimum is 1.3
        async with world.client(verify=tls12) as c:
            assert (await c.get("/health")).status_code == 200
        old = ssl.create_default_context(cafile=str(cert))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        async with world.client(verify=old) as c:
            with pytest.raises(httpx.ConnectError):
                await c.get("/health")


async def test_tls_files_may_come_from_systemd_credentials(
    make_world: WorldFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    cert, key = _self_signed(tmp_path)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    async with make_world(server={"tls_cert": cert.name, "tls_key": key.name}) as world:
        trusting = ssl.create_default_context(cafile=str(cert))
        async with world.client(verify=trusting) as c:
            assert (await c.get("/health")).status_code == 200


async def test_tls_connections_that_never_finish_a_handshake_are_closed(
    make_world: WorldFactory, tmp_path: Path,
) -> None:
    cert, key = _self_signed(tmp_path)
    server = {"tls_cert": str(cert), "tls_key": str(key), "header_timeout_seconds": 1}
    async with make_world(server=server) as world:
        address = world.url.replace("https://", "http://")
        silent = [await _open(address) for _ in range(8)]
        half_hello = [await _open(address) for _ in range(8)]
        for _, writer in half_hello:  # a TLS record header and a few bytes of ClientHello
            writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        closed = await asyncio.wait_for(
            asyncio.gather(*(reader.read() for reader, _ in [*silent, *half_hello])), 8)
        assert closed == [b""] * 16
        for _, writer in [*silent, *half_hello]:
            writer.close()
        trusting = ssl.create_default_context(cafile=str(cert))
        async with world.client(verify=trusting) as c:
            assert (await c.get("/health")).status_code == 200


# -- slow bodies, stalled readers, greedy clients ---------------------------------------------


@pytest.mark.parametrize("path", ["/api/chat", "/api/show"])
async def test_a_body_sent_too_slowly_gets_408_at_the_body_timeout(
    make_world: WorldFactory, path: str,
) -> None:
    async with make_world(server={"body_timeout_seconds": 1}) as world:
        reader, writer = await _open(world.url)
        started = time.monotonic()
        writer.write(_head(path, key=world.user_key, length=100) + b'{"model": "ll')
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert time.monotonic() - started < 4


async def test_a_client_that_stops_reading_loses_its_stream_and_its_slot(
    make_world: WorldFactory,
) -> None:
    # The node has 16 MB to say; the client reads none of it.
    frames = [b"%x\r\n%s\r\n" % (256 * 1024, b"x" * 256 * 1024)] * 64
    async with raw_node([OK_CHUNKED, *frames, b"0\r\n\r\n"]) as (_, url), \
            make_world(GpuSpec("gpu-1", url=url), server={"stall_timeout_seconds": 1}
                       ) as world:
        _, writer = await _open(world.url)
        body = json.dumps({"model": "llama3.2"}).encode()
        writer.write(_head("/api/chat", key=world.user_key, length=len(body)) + body)
        await writer.drain()
        await eventually(lambda: world.gpu("gpu-1").slots_in_use == 1)
        await eventually(lambda: world.gpu("gpu-1").slots_in_use == 0, timeout=15)
        assert world.app.gw.stalls.cancelled == 1
        writer.close()


async def test_one_client_address_holds_at_most_its_share_of_requests(
    make_world: WorldFactory,
) -> None:
    async with make_world(GpuSpec("gpu-1", chunks=4), slots=4,
                          server={"max_connections_per_client": 2}) as world:
        node = world.nodes["gpu-1"]
        node.hold_after = 1
        async with world.client() as c, \
                c.stream("POST", "/api/chat", json={"model": "llama3.2"}) as one, \
                c.stream("POST", "/api/chat", json={"model": "llama3.2"}) as two:
            first, second = one.aiter_lines(), two.aiter_lines()
            await first.__anext__()
            await second.__anext__()
            refused = await c.get("/api/tags")
            assert refused.status_code == 429
            assert "max_connections_per_client" in refused.json()["error"]
            node.release()
            async for _ in first:
                pass
        async with world.client() as c:
            assert (await c.get("/api/tags")).status_code == 200


# -- logs that cannot flood --------------------------------------------------------------------


def test_a_repeated_log_message_is_let_through_a_few_times_a_minute() -> None:
    now = [0.0]
    limit = RepeatLimit(clock=lambda: now[0])

    def record(arg: int) -> logging.LogRecord:
        return logging.LogRecord("gpuctl.x", logging.ERROR, __file__, 1, "accept failed: %s",
                                 (arg,), None)

    passed = [limit.filter(record(n)) for n in range(1000)]
    assert sum(passed) == BURST
    other = logging.LogRecord("gpuctl.x", logging.ERROR, __file__, 1, "other", (), None)
    assert limit.filter(other)  # another message is not held back by the first
    now[0] = WINDOW + 1
    summary = record(0)
    assert limit.filter(summary)
    assert f"{1000 - BURST} more like it" in str(summary.msg)
