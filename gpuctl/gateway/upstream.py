"""A lean HTTP/1.1 client to the GPU nodes, with an O(1) keep-alive pool.

Why not httpx's own pool: httpcore 1.0's pool rescans every pooled connection when a request
starts and ends, so its cost grows with concurrency (7-12 ms per request at 64 connections,
stream timeouts at 512; see design.md "Performance notes"). Here each origin keeps a plain
deque of idle connections: take one from the right, put it back on the right, O(1). The
framing is parsed directly in an ``asyncio.Protocol`` (no h11, no anyio, no StreamReader),
because per relayed chunk every await counts: ``UpstreamResponse.relay`` hands each body
piece on from ``data_received`` itself.

Measured with ``tests/bench/bench_upstream.py`` (the client alone on one core, ``SimOllama``
on the other, medians of 3 on a shared, noisy 2-core machine): client CPU per non-streamed
request 140 µs with this pool (110 µs at 64 concurrent) against 1,500-1,800 µs with
``httpx.AsyncClient`` (1,800-4,600 µs at 64, default or sized limits) and 1,350-8,300 µs
with ``httpcore.AsyncConnectionPool``; per streamed piece at 512 streams 29 µs (7,900
pieces/s, first piece after 0.3 s) against 590-870 µs with httpx (1,050-1,200 pieces/s,
first piece after 2.4-5.7 s). The same pool behind httpx (``PoolTransport``) costs 390-480
µs per request and 49 µs per piece: httpx's API is affordable here, its pool is not.

``Pool.request`` is what the gateway's hot path calls. ``PoolTransport`` puts the same pool
behind an ``httpx.AsyncClient``, so the management routes and the node probes share one set
of connections.

Only what a proxy to Ollama needs: HTTP/1.1, ``Content-Length`` and chunked bodies, TLS for
``https://`` nodes, a connect timeout and no read timeout (a model load takes minutes).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httpx

__all__ = ["Origin", "Pool", "PoolTransport", "UpstreamError", "UpstreamResponse"]

#: Response headers that describe the hop, not the content; never relayed.
HOP_HEADERS = frozenset({
    b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
    b"proxy-connection", b"proxy-authenticate", b"date", b"server",
})
_READ_LIMIT = 1 << 20  # longest header block or chunk-size line we accept


class UpstreamError(Exception):
    """The node could not be reached, or broke the HTTP exchange."""

    def __init__(self, message: str, *, sent: bool = False) -> None:
        super().__init__(message)
        #: True once response bytes arrived: the request reached the node, do not retry.
        self.sent = sent


@dataclass(frozen=True)
class Origin:
    """Scheme, host and port of a node, plus the path prefix of its base URL."""

    scheme: str
    host: str
    port: int
    prefix: str
    host_header: bytes

    @classmethod
    def parse(cls, base_url: str) -> Origin:
        parts = urlsplit(base_url)
        scheme = parts.scheme or "http"
        if scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamError(f"unsupported node URL {base_url!r}")
        default = 443 if scheme == "https" else 80
        port = parts.port or default
        host = parts.hostname
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port == default else f"{shown}:{port}"
        return cls(scheme, host, port, parts.path.rstrip("/"), host_header.encode("idna"))


class _Conn(asyncio.Protocol):
    """One keep-alive connection to a node: a protocol with its own buffer.

    Reading is done two ways. ``read_until``/``read_some`` await data (head and body for
    the general path). ``relay`` switches the connection to callbacks: each body piece is
    handed to a sink from ``data_received`` itself, with no task switch per chunk, which is
    what keeps the gateway's per-chunk cost low.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.lost = False
        self.error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.relay: _RelayParser | None = None

    # -- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:
            relay.feed(data)
            return
        self.buffer += data
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.error = exc
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self.relay is not None:
            self.relay.lost()

    # -- reading --------------------------------------------------------------------------

    async def _wait(self) -> None:
        if self.lost:
            raise asyncio.IncompleteReadError(bytes(self.buffer), None)
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_until(self, separator: bytes, limit: int = _READ_LIMIT) -> bytes:
        while True:
            at = self.buffer.find(separator)
            if at >= 0:
                end = at + len(separator)
                data = bytes(self.buffer[:end])
                del self.buffer[:end]
                return data
            if len(self.buffer) > limit:
                raise ValueError("line or header block too long")
            await self._wait()

    async def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self._wait()
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def read_some(self, most: int) -> bytes:
        """Up to ``most`` bytes; ``b""`` at the end of the stream."""
        while not self.buffer:
            if self.lost:
                return b""
            await self._wait()
        data = bytes(self.buffer[:most])
        del self.buffer[:most]
        return data

    def write(self, data: bytes) -> None:
        if self.transport is None or self.lost:
            raise ConnectionResetError("connection closed")
        self.transport.write(data)

    def usable(self) -> bool:
        return (self.transport is not None and not self.lost and not self.buffer
                and not self.transport.is_closing())

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _RelayParser:
    """Chunked or fixed-length body framing, parsed in ``data_received``; pieces to a sink."""

    def __init__(self, conn: _Conn, mode: str, left: int, sink: Callable[[bytes], None],
                 done: asyncio.Future[None]) -> None:
        self.conn = conn
        self.chunked = mode == "chunked"
        self.left = left
        self.sink = sink
        self.done = done
        self.buf = bytearray()
        self.size = -1  # bytes of the current chunk still expected (+2 for its CRLF)
        self.trailers = False
        #: The last two pieces, for the usage figures of the answer's final line.
        self.prev = b""
        self.last = b""

    def feed(self, data: bytes) -> None:
        if self.done.done():
            return
        try:
            if self.chunked:
                self._chunked(data)
            else:
                self._length(data)
        except Exception as exc:  # a framing error: the node broke HTTP
            self._fail(UpstreamError(f"node sent a bad body: {exc}", sent=True))

    def _emit(self, piece: bytes) -> None:
        self.prev, self.last = self.last, piece
        self.sink(piece)

    def last_piece(self) -> bytes:
        return self.last

    def _length(self, data: bytes) -> None:
        if len(data) > self.left:
            raise ValueError("more body than Content-Length")
        self.left -= len(data)
        if data:
            self._emit(data)
        if self.left == 0:
            self._finish()

    def _chunked(self, data: bytes) -> None:
        if not self.buf and self.size < 0 and not self.trailers:
            # Fast path: a read that holds whole chunk frames, the common case for a stream.
            pos, end = 0, len(data)
            while True:
                at = data.find(b"\r\n", pos)
                if at < 0:
                    break
                size = int(data[pos:at].split(b";", 1)[0], 16)
                stop = at + 2 + size
                if size == 0 or stop + 2 > end:
                    break
                self._emit(data[at + 2:stop])
                pos = stop + 2
                if pos == end:
                    return
            data = data[pos:]
        buf = self.buf
        buf += data
        while True:
            if self.trailers:
                at = buf.find(b"\r\n")
                if at < 0:
                    return
                line = bytes(buf[:at])
                del buf[:at + 2]
                if not line:
                    self._finish()
                    return
                continue
            if self.size < 0:
                at = buf.find(b"\r\n")
                if at < 0:
                    if len(buf) > 1024:
                        raise ValueError("chunk size line too long")
                    return
                size = int(bytes(buf[:at]).split(b";", 1)[0].strip(), 16)
                del buf[:at + 2]
                if size == 0:
                    self.trailers = True
                    continue
                self.size = size
            if len(buf) < self.size + 2:
                return
            piece = bytes(buf[:self.size])
            del buf[:self.size + 2]
            self.size = -1
            self._emit(piece)

    def _finish(self) -> None:
        if self.buf:
            # bytes after the body on a non-pipelined connection: do not reuse it
            self.conn.close()
        if not self.done.done():
            self.done.set_result(None)

    def _fail(self, error: UpstreamError) -> None:
        self.conn.close()
        if not self.done.done():
            self.done.set_exception(error)

    def lost(self) -> None:
        if not self.done.done():
            self._fail(UpstreamError("node connection broke mid-response: connection closed "
                                     "early", sent=True))


class UpstreamResponse:
    """A response whose body is read as it arrives; close it (or read it all) when done."""

    __slots__ = ("_conn", "_left", "_mode", "_origin", "_pool", "_reuse", "headers",
                 "last_piece", "status")

    def __init__(self, pool: Pool, origin: Origin, conn: _Conn, status: int,
                 headers: list[tuple[bytes, bytes]], mode: str, length: int) -> None:
        self._pool = pool
        self._origin = origin
        self._conn: _Conn | None = conn
        self.status = status
        #: Response headers as received (names lower-cased), hop-by-hop ones dropped.
        self.headers = headers
        # "length", "chunked", "eof" or "none"; a "-close" suffix: the node will close after.
        self._mode, _, close = mode.partition("-")
        self._reuse = not close
        self._left = length
        #: After ``relay`` started: the last piece it handed on (to end a broken stream).
        self.last_piece: Callable[[], bytes] = lambda: b""

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, piece by piece as the node sends it (chunked framing removed)."""
        conn = self._conn
        if conn is None:
            return
        try:
            if self._mode == "chunked":
                while True:
                    line = await conn.read_until(b"\n")
                    size = int(line.split(b";", 1)[0].strip(), 16)
                    if size == 0:
                        while (await conn.read_until(b"\n")).strip():
                            pass  # trailers: ignored
                        break
                    data = await conn.read_exactly(size + 2)
                    yield data[:-2]
            elif self._mode == "length":
                while self._left > 0:
                    data = await conn.read_some(min(self._left, 65536))
                    if not data:
                        raise asyncio.IncompleteReadError(b"", self._left)
                    self._left -= len(data)
                    yield data
            elif self._mode == "eof":
                while data := await conn.read_some(65536):
                    yield data
                self._drop()
                return
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            self._drop()
            raise UpstreamError(f"node connection broke mid-response: {_describe(exc)}",
                                sent=True) from None
        self._conn = None
        if self._reuse:
            self._pool._put(self._origin, conn)
        else:
            conn.close()

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self.chunks()])

    @property
    def relayable(self) -> bool:
        """True when ``relay`` can carry this body (chunked or with a Content-Length)."""
        return self._conn is not None and self._mode in ("chunked", "length")

    async def relay(self, sink: Callable[[bytes], None]) -> tuple[bytes, bytes]:
        """Hand every body piece to ``sink`` from the socket callback; return the last two.

        Raises ``UpstreamError`` when the node breaks off. Cancelling closes the connection
        (the node sees the client go away and stops generating).
        """
        conn = self._conn
        assert conn is not None and self.relayable
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        parser = _RelayParser(conn, self._mode, self._left, sink, done)
        self.last_piece = parser.last_piece
        pending = bytes(conn.buffer)
        conn.buffer.clear()
        conn.relay = parser
        if self._mode == "length" and self._left == 0:
            parser._finish()
        elif pending:
            parser.feed(pending)
        elif conn.lost:
            parser.lost()
        try:
            await done
        except BaseException:
            conn.relay = None
            self._drop()
            raise
        conn.relay = None
        self._conn = None
        if conn.transport is not None:
            conn.transport.resume_reading()  # flow control may have paused it at the end
        if self._reuse and not conn.lost:
            self._pool._put(self._origin, conn)
        else:
            conn.close()
        return parser.prev, parser.last

    def pause(self) -> None:
        """Stop reading from the node (the client cannot keep up)."""
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.pause_reading()

    def resume(self) -> None:
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.resume_reading()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def aclose(self) -> None:
        """Abandon the rest of the body: the connection cannot be reused, close it."""
        self._drop()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed early"
    return str(exc) or type(exc).__name__


class Pool:
    """Keep-alive connections per origin in a deque: O(1) to take and to return.

    ``https://`` nodes are verified with ``ssl.create_default_context()`` unless an
    ``ssl_context`` is given; it honours ``SSL_CERT_FILE``/``SSL_CERT_DIR``, the way to trust
    a private CA (httpx, which the node probes use, reads the same variables).
    """

    def __init__(self, *, connect_timeout: float = 5.0, max_idle_per_origin: int = 2048,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle_per_origin
        self._ssl = ssl_context
        self._idle: dict[Origin, deque[_Conn]] = {}
        self._origins: dict[str, Origin] = {}
        self.opened = 0

    def origin(self, base_url: str) -> Origin:
        origin = self._origins.get(base_url)
        if origin is None:
            origin = self._origins[base_url] = Origin.parse(base_url)
        return origin

    def _put(self, origin: Origin, conn: _Conn) -> None:
        idle = self._idle.setdefault(origin, deque())
        if len(idle) < self.max_idle and conn.usable():
            idle.append(conn)
        else:
            conn.close()

    async def _connect(self, origin: Origin) -> _Conn:
        ssl_ctx: ssl.SSLContext | None = None
        if origin.scheme == "https":
            ssl_ctx = self._ssl or ssl.create_default_context()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(_Conn, origin.host, origin.port, ssl=ssl_ctx),
                self.connect_timeout,
            )
        except asyncio.TimeoutError:
            raise UpstreamError(
                f"cannot connect to {origin.host}:{origin.port}: timed out") from None
        except OSError as exc:
            raise UpstreamError(
                f"cannot connect to {origin.host}:{origin.port}: {_describe(exc)}") from None
        self.opened += 1
        return conn

    async def request(self, base_url: str, method: str, path: str,
                      headers: list[tuple[bytes, bytes]], body: bytes = b"") -> UpstreamResponse:
        """Send one request; returns once the response headers are in.

        ``headers`` must not contain ``host``, ``content-length`` or hop-by-hop headers: the
        pool writes those itself. A kept-alive connection that the node closed meanwhile is
        retried once on a fresh one (nothing reached the node, so that is safe).
        """
        origin = self.origin(base_url)
        head = bytearray(f"{method} {origin.prefix}{path} HTTP/1.1\r\n".encode("latin-1"))
        head += b"host: " + origin.host_header + b"\r\n"
        for name, value in headers:
            head += name + b": " + value + b"\r\n"
        if body or method in ("POST", "PUT", "PATCH"):
            head += b"content-length: " + str(len(body)).encode() + b"\r\n"
        head += b"\r\n"
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if not conn.usable():
                conn.close()
                continue
            try:
                return await self._exchange(origin, conn, head, body, method)
            except UpstreamError as exc:
                if exc.sent:
                    raise
        conn = await self._connect(origin)
        return await self._exchange(origin, conn, head, body, method)

    async def _exchange(self, origin: Origin, conn: _Conn, head: bytearray, body: bytes,
                        method: str) -> UpstreamResponse:
        try:
            conn.write(bytes(head) + body if len(body) < 65536 else bytes(head))
            if len(body) >= 65536:
                conn.write(body)
            block = await conn.read_until(b"\r\n\r\n")
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            conn.close()
            raise UpstreamError(f"node {origin.host}:{origin.port} closed the connection: "
                                f"{_describe(exc)}") from None
        except BaseException:
            conn.close()
            raise
        try:
            status, headers, mode, length = _parse_head(block, method)
        except ValueError as exc:
            conn.close()
            raise UpstreamError(f"node sent a bad response: {exc}", sent=True) from None
        return UpstreamResponse(self, origin, conn, status, headers, mode, length)

    async def aclose(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().close()


def _parse_head(block: bytes, method: str) -> tuple[int, list[tuple[bytes, bytes]], str, int]:
    lines = block.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError(f"status line {lines[0][:80]!r}")
    status = int(parts[1])
    headers: list[tuple[bytes, bytes]] = []
    chunked = False
    length = -1
    close = parts[0] == b"HTTP/1.0"
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError(f"header line {line[:80]!r}")
        name = name.strip().lower()
        value = value.strip()
        if name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
            continue
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            low = value.lower()
            close = b"close" in low or (close and b"keep-alive" not in low)
            continue
        if name not in HOP_HEADERS:
            headers.append((name, value))
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return status, headers, "none", 0
    if chunked:
        headers = [(k, v) for k, v in headers if k != b"content-length"]
        return status, headers, "chunked-close" if close else "chunked", 0
    if length >= 0:
        return status, headers, "length-close" if close else "length", length
    return status, headers, "eof", 0


class _BodyStream(httpx.AsyncByteStream):
    def __init__(self, response: UpstreamResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for piece in self._response.chunks():
                yield piece
        except UpstreamError as exc:
            raise httpx.RemoteProtocolError(str(exc)) from None

    async def aclose(self) -> None:
        await self._response.aclose()


class PoolTransport(httpx.AsyncBaseTransport):
    """The O(1) ``Pool`` behind an ``httpx.AsyncClient`` (``AsyncClient(transport=...)``)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        base = f"{url.scheme}://{url.netloc.decode('ascii')}"
        path = url.raw_path.decode("ascii")
        skip = {b"host", b"content-length", b"transfer-encoding", b"connection"}
        headers = [(k.lower(), v) for k, v in request.headers.raw if k.lower() not in skip]
        body = await request.aread()
        try:
            response = await self.pool.request(base, request.method, path, headers, body)
        except UpstreamError as exc:
            raise httpx.ConnectError(str(exc), request=request) from None
        return httpx.Response(response.status, headers=response.headers,
                              stream=_BodyStream(response), request=request)

    async def aclose(self) -> None:
        await self.pool.aclose()
