"""A lean HTTP/1.1 client to the GPU nodes: an O(1) keep-alive pool, llhttp as the parser.

Why not httpx's own pool: httpcore 1.0's pool rescans every pooled connection when a request
starts and ends, so its cost grows with concurrency (7-12 ms per request at 64 connections,
stream timeouts at 512; see design.md "Performance notes"). Here each origin keeps a plain
deque of idle connections: take one from the right, put it back on the right, O(1).
Responses are parsed by llhttp (``httptools``, the parser uvicorn and Node.js use) inside an
``asyncio.Protocol`` (no h11, no anyio, no StreamReader): one maintained framing
implementation, strict where a hand-written one was not (a chunk size of ``-6``, ``+5`` or
``5_0``, a bare CR or LF in a header value, two ``Content-Length`` headers are all refused),
interim 1xx responses skipped, and a body cut short by the node an ``UpstreamError``, never a
short answer passed off as whole.

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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools
import httpx

__all__ = ["Origin", "Pool", "PoolTransport", "UpstreamError", "UpstreamResponse"]

#: Response headers that describe the hop, not the content; never relayed.
HOP_HEADERS = frozenset({
    b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade",
    b"proxy-connection", b"proxy-authenticate", b"date", b"server",
})
_HEAD_LIMIT = 64 * 1024  # longest response head we accept (llhttp itself has no limit)
_HIGH_WATER = 1 << 20  # body bytes waiting for the client before reading from the node pauses


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
    """One keep-alive connection to a node, its responses parsed by llhttp (``httptools``).

    The parser's callbacks fill in the current response: the head (``head_ready`` resolves
    once it is in; interim 1xx heads are skipped, never taken for the answer), then body
    pieces into ``pieces`` for ``UpstreamResponse.chunks`` to take. Reading pauses while
    more than ``_HIGH_WATER`` bytes wait (a slow client never makes the gateway hold a whole
    answer). Whatever llhttp refuses (bad chunk sizes, CR or LF inside a header value, two
    lengths, bytes after the body) fails the response and closes the connection.

    A connection goes back to the pool only when its response ended by its own framing,
    the node did not ask to close, and not one byte followed it.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.lost = False
        self.received = False  # any byte of the current response
        self.error: UpstreamError | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_size = 0
        self.in_head = True
        self.head_only = False  # a HEAD request: the response has no body to read
        self.until_eof = False  # no Content-Length, not chunked: the body ends at close
        self.complete = False
        self.reusable = False
        self.pieces: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.head_ready: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def begin(self, method: str) -> asyncio.Future[None]:
        """Prepare for the response to a request about to be written."""
        self.received = False
        self.error = None
        self.status = 0
        self.headers = []
        self.head_size = 0
        self.in_head = True
        self.head_only = method == "HEAD"
        self.until_eof = False
        self.complete = False
        self.reusable = False
        self.pieces = []
        self.buffered = 0
        self.head_ready = asyncio.get_running_loop().create_future()
        return self.head_ready

    # -- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received = True
        if self.complete or self.error is not None:
            self._spoilt()
            return
        if self.in_head:
            self.head_size += len(data)  # may count body bytes too: only checked below
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if self.complete:
                self._spoilt()
            elif self.head_size > _HEAD_LIMIT:
                self._fail(f"node sent a response head over {_HEAD_LIMIT} bytes")
            else:
                self._fail(f"node sent a bad response: {exc}")
            return
        if self.in_head and self.head_size > _HEAD_LIMIT:
            # llhttp keeps a header's partial value itself, with no bound: bound it here.
            self._fail(f"node sent a response head over {_HEAD_LIMIT} bytes")

    def _spoilt(self) -> None:
        """Bytes after a complete response (we never pipeline): never reuse this one."""
        self.reusable = False
        self.close()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.complete or self.error is not None:
            return
        if self.until_eof and not self.in_head:
            self.complete = True  # the close is the end of this body
            self._wake()
            return
        detail = f": {_describe(exc)}" if exc is not None else ""
        self._fail(f"connection closed early{detail}")

    # -- llhttp callbacks -----------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:  # after the head: trailers, not relayed
            self.headers.append((name.lower(), value))

    def _head_bytes(self) -> int:
        return sum(len(name) + len(value) + 4 for name, value in self.headers)

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise httptools.HttpParserError("node switched protocols")
            self.headers = []  # interim (100 Continue, 103 Early Hints): wait for the answer
            return
        self.head_size = self._head_bytes()
        if self.head_size > _HEAD_LIMIT:
            raise httptools.HttpParserError("response head too large")
        self.status = status
        self.in_head = False
        framed = any(name == b"content-length" or (name == b"transfer-encoding"
                                                   and b"chunked" in value.lower())
                     for name, value in self.headers)
        self.until_eof = not framed and status not in (204, 304) and not self.head_only
        if self.head_only:
            self.complete = True  # llhttp would wait for the body a HEAD answer never has
        ready = self.head_ready
        if ready is not None and not ready.done():
            ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.head_only:
            return
        self.pieces.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.in_head:
            return  # the end of an interim response
        self.complete = True
        self.reusable = self.parser.should_keep_alive() and not self.head_only
        self._wake()

    # -- for the response -----------------------------------------------------------------

    def _fail(self, message: str) -> None:
        if self.error is None:
            self.error = UpstreamError(message, sent=self.received)
        ready = self.head_ready
        if ready is not None and not ready.done():
            ready.set_exception(self.error)
            ready.exception()  # retrieved: the caller reads it from ``error`` if it left
        self.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def take(self) -> bytes:
        """The body bytes received so far (reading resumes if it was paused)."""
        pieces = self.pieces
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        self.pieces = []
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    async def wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def write(self, data: bytes) -> None:
        if self.transport is None or self.lost:
            raise ConnectionResetError("connection closed")
        self.transport.write(data)

    def usable(self) -> bool:
        return (self.transport is not None and not self.lost and self.error is None
                and not self.transport.is_closing())

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """A response whose body is read as it arrives; read it all or close it when done.

    The connection goes back to the pool when ``chunks`` reaches the end of a body that the
    node framed and did not ask to close; ``aclose`` before that closes the connection.
    """

    __slots__ = ("_conn", "_origin", "_pool", "headers", "status")

    def __init__(self, pool: Pool, origin: Origin, conn: _Conn) -> None:
        self._pool = pool
        self._origin = origin
        self._conn: _Conn | None = conn
        self.status = conn.status
        #: Response headers as received (names lower-cased), hop-by-hop ones dropped.
        self.headers = [(k, v) for k, v in conn.headers if k not in HOP_HEADERS]

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, as the node sends it (chunked framing removed). Pieces that arrived
        together come as one. Raises ``UpstreamError`` (``sent=True``) if the node breaks
        off: a short ``Content-Length`` body, a broken chunk, a close mid-chunk."""
        conn = self._conn
        if conn is None:
            return
        while True:
            if conn.pieces:
                yield conn.take()
                continue
            if conn.error is not None:
                self._drop()
                raise conn.error
            if conn.complete:
                break
            await conn.wait()
        self._conn = None
        if conn.reusable:
            self._pool._put(self._origin, conn)
        else:
            conn.close()

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self.chunks()])

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
        ready = conn.begin(method)
        try:
            conn.write(bytes(head) + body if len(body) < 65536 else bytes(head))
            if len(body) >= 65536:
                conn.write(body)
            await ready
        except UpstreamError as exc:
            conn.close()
            if exc.sent:
                raise
            raise UpstreamError(f"node {origin.host}:{origin.port} closed the connection: "
                                f"{exc}") from None
        except OSError as exc:
            conn.close()
            raise UpstreamError(f"node {origin.host}:{origin.port} closed the connection: "
                                f"{_describe(exc)}") from None
        except BaseException:
            conn.close()
            raise
        return UpstreamResponse(self, origin, conn)

    async def aclose(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.pop().close()


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
