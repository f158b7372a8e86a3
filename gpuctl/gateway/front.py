"""The front door: a lean HTTP/1.1 server for the inference routes, Hypercorn behind it.

Measured on the 2-core benchmark machine, Hypercorn's own machinery (h11 events, its ASGI
queue and task per request, one ``drain`` per message) cost ~340 µs per request and about
half of the ~100 µs spent per relayed chunk, beyond the issue's budget of 500 µs and 50 µs
for the whole gateway. So the listening socket belongs to this small server:

* A request for one of ``proxy.HOT_ROUTES`` (a ``POST`` with one ``Content-Length``) whose
  head ``head.parse_head`` is sure of is handed to the same ASGI hot-path code
  (``GatewayApp``), whose ``send`` writes straight to the socket: one ``transport.write`` per
  relayed chunk, the response head sent together with the first chunk (as Ollama does).
  A body over ``server.max_body_mb`` is answered 413 from its ``Content-Length`` and read
  only to be dropped, never held.
* Anything else (listings, management, admin API, ``/metrics``, and every head the strict
  parser doubts: odd framings, duplicate lengths, obs-folds, bare LFs...) turns the
  connection into a byte pipe to Hypercorn on a private Unix socket, where h11 parses it
  (400 for a malformed request) and the Quart app answers it exactly as before. The pipe
  keeps backpressure both ways. Hypercorn also runs the app's lifespan, so Quart's
  ``before_serving``/``after_serving`` still start and stop the engine.

Shutdown: stop accepting, let requests in flight finish (bounded), close idle connections,
then let Hypercorn drain and run the lifespan shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import os
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

from gpuctl.gateway.head import MAX_HEAD, Head, bare_lf, parse_head
from gpuctl.gateway.proxy import HOT_ROUTES
from gpuctl.gateway.replies import DIRECT, FlowControl, Message

__all__ = ["FrontServer", "running_gateway", "serve_front"]

log = logging.getLogger(__name__)

ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[Message]],
                    Callable[[Message], Awaitable[None]]], Awaitable[None]]

#: How long a connection answered 413 keeps reading (and dropping) the unwanted body, so
#: the client reads the 413 rather than a reset ("lingering close", as nginx does).
_LINGER_SECONDS = 2.0
_REASONS = {s.value: s.phrase.encode() for s in http.HTTPStatus}
_HOT = frozenset(path.encode() for path in HOT_ROUTES)


class _Request:
    """One hot-path request in flight on a connection."""

    __slots__ = ("body", "chunked", "conn", "done", "gone", "gone_callback", "head",
                 "keep_alive", "started")

    def __init__(self, conn: _FrontProtocol, body: bytes, keep_alive: bool) -> None:
        self.conn = conn
        self.body: bytes | None = body
        self.keep_alive = keep_alive
        self.head: bytes | None = None
        self.started = False
        self.chunked = False
        self.done = False
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.gone_callback: Callable[[], None] | None = None

    async def receive(self) -> Message:
        body, self.body = self.body, None
        if body is not None:
            return {"type": "http.request", "body": body, "more_body": False}
        await self.gone
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.done:
            return
        conn = self.conn
        kind = message["type"]
        if kind == "http.response.start":
            status = int(message["status"])
            out = bytearray(b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"")))
            has_length = False
            for name, value in message.get("headers", ()):
                out += name + b": " + value + b"\r\n"
                if name.lower() == b"content-length":
                    has_length = True
            if not has_length:
                out += b"transfer-encoding: chunked\r\n"
                self.chunked = True
            if not self.keep_alive:
                out += b"connection: close\r\n"
            out += b"\r\n"
            self.head = bytes(out)
            return
        if kind != "http.response.body":
            return
        body: bytes = message.get("body", b"")
        more = bool(message.get("more_body", False))
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
            if not more:
                data += b"0\r\n\r\n"
        else:
            data = body
        if self.head is not None:
            data = self.head + data
            self.head = None
        if data and conn.transport is not None and not conn.lost:
            conn.transport.write(data)
            self.started = True
        if not more:
            self.finish()
        elif conn.paused:
            await conn.drained()

    def write_piece(self, piece: bytes) -> None:
        """``DirectWriter``: one body piece, framed and written at once (no await)."""
        if self.done or not piece:
            return
        conn = self.conn
        data = b"%x\r\n%s\r\n" % (len(piece), piece) if self.chunked else piece
        if self.head is not None:
            data = self.head + data
            self.head = None
        if conn.transport is not None and not conn.lost:
            conn.transport.write(data)
            self.started = True

    def on_disconnect(self, callback: Callable[[], None]) -> None:
        """``DirectWriter``: ``callback`` runs if the client leaves mid-request."""
        self.gone_callback = callback

    def client_left(self) -> None:
        if not self.gone.done():
            self.gone.set_result(None)
        callback, self.gone_callback = self.gone_callback, None
        if callback is not None and not self.done:
            callback()

    def set_flow(self, flow: FlowControl | None) -> None:
        """``DirectWriter``: what to pause while the client's socket is full."""
        self.conn.flow = flow
        if flow is not None and self.conn.paused:
            flow.pause()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        if not self.gone.done():
            self.gone.set_result(None)  # as Hypercorn does: "disconnect" after the response
        self.conn.request_done(self)


class _Pipe(asyncio.Protocol):
    """The Hypercorn side of a piped connection."""

    def __init__(self, front: _FrontProtocol) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        front = self.front.transport
        if front is not None and not self.front.lost:
            front.write(data)

    def eof_received(self) -> bool | None:
        return None  # Hypercorn closed its side: close (connection_lost closes the client)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.front.transport is not None:
            self.front.transport.close()

    # Backpressure both ways: a slow reader on one side stops reading from the other, so
    # neither transport's write buffer grows without bound.
    def pause_writing(self) -> None:
        if self.front.transport is not None and not self.front.lost:
            self.front.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.front.transport is not None and not self.front.lost:
            self.front.transport.resume_reading()


class _FrontProtocol(asyncio.Protocol):
    def __init__(self, server: FrontServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.request: _Request | None = None
        self.pipe: _Pipe | None = None
        self.piping = False
        self.lost = False
        self.paused = False
        self._drain: asyncio.Future[None] | None = None
        #: Since when the connection waits for a request (None: busy or piped).
        self.idle_since: float | None = None
        self._client: tuple[str, int] | None = None
        self.flow: FlowControl | None = None
        #: Where the search for the head's end resumes (a head may come byte by byte).
        self._scanned = 0
        #: Body bytes of a too-large request still to be read and dropped.
        self._discard = 0
        #: Answered and half-closed: whatever still comes is dropped until the close.
        self._lingering = False
        #: The client half-closed while the pipe to Hypercorn was being opened.
        self._eof_pending = False

    # -- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        self.server.connections.add(self)
        self.idle_since = asyncio.get_running_loop().time()

    def data_received(self, data: bytes) -> None:
        if self.piping:
            if self.pipe is not None and self.pipe.transport is not None:
                self.pipe.transport.write(data)
            else:
                self.buffer += data
            return
        if self._discard:
            dropped = min(self._discard, len(data))
            self._discard -= dropped
            data = data[dropped:]
            if self._lingering and not self._discard and self.transport is not None:
                self.transport.close()  # the whole unwanted body is read: nothing to reset
                return
        if self._lingering or not data:
            return
        self.buffer += data
        if self.request is None:
            self._next()
        elif len(self.buffer) > self.server.max_body + MAX_HEAD and self.transport is not None:
            self.transport.close()  # a client pushing more than any request may hold

    def eof_received(self) -> bool | None:
        """The client half-closed. Like nginx and Hypercorn, take it as leaving: a request
        in flight is cancelled (its slot freed) and the connection closed. Telling a
        half-close from a client that went away would take a write, and a request held in
        the queue for minutes must not wait for one to learn that its client is gone."""
        if not self.piping:
            return None
        # Piped: pass the half-close on and let Hypercorn decide, as if it were direct.
        if self.pipe is None:
            self._eof_pending = True  # still connecting: sent once connected
        elif self.pipe.transport is not None and self.pipe.transport.can_write_eof():
            self.pipe.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.connections.discard(self)
        request = self.request
        if request is not None:
            request.client_left()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self.pipe is not None and self.pipe.transport is not None:
            self.pipe.transport.close()

    def pause_writing(self) -> None:
        self.paused = True
        if self.flow is not None:
            self.flow.pause()
        if self.pipe is not None and self.pipe.transport is not None:
            self.pipe.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.flow is not None:
            self.flow.resume()
        if self.pipe is not None and self.pipe.transport is not None:
            self.pipe.transport.resume_reading()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drained(self) -> None:
        if not self.paused or self.lost:
            return
        self._drain = asyncio.get_running_loop().create_future()
        await self._drain

    # -- requests -------------------------------------------------------------------------

    def close_if_idle(self) -> None:
        if self.request is None and not self.piping and self.transport is not None:
            self.transport.close()

    def _next(self) -> None:
        """Parse the next request in the buffer; serve it here or pipe the connection."""
        buf = self.buffer
        end = buf.find(b"\r\n\r\n", self._scanned)
        if end < 0:
            # Searched from where the last search stopped, so a head sent byte by byte
            # costs linear time, not quadratic.
            if len(buf) > MAX_HEAD or bare_lf(buf, self._scanned):
                self._to_backend()
            else:
                self._scanned = max(0, len(buf) - 3)
            return
        self._scanned = 0
        head = None if self.server.closing else parse_head(bytes(buf[:end]), _HOT)
        if head is None:
            self._to_backend()  # not a hot request, or not one framed beyond doubt
            return
        length = head.length
        body_end = end + 4 + length
        if length > self.server.max_body:
            # Too large: the app answers 413 from the Content-Length alone, and the body
            # is read and dropped as it comes, never held.
            self._discard = max(0, length - (len(buf) - end - 4))
            buf.clear()
            self._start(head, b"", keep_alive=False)
            return
        if len(buf) < body_end:
            return
        body = bytes(buf[end + 4:body_end])
        del buf[:body_end]
        self._start(head, body, keep_alive=head.keep_alive)

    def _start(self, head: Head, body: bytes, *, keep_alive: bool) -> None:
        self.idle_since = None
        request = _Request(self, body, keep_alive and not self.server.closing)
        self.request = request
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": head.path.decode("latin-1"), "raw_path": head.path,
            "query_string": head.query, "root_path": "", "headers": head.headers,
            "client": self._client, "server": None, "extensions": {DIRECT: request},
        }
        task = asyncio.ensure_future(self._run(request, scope))
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    async def _run(self, request: _Request, scope: dict[str, Any]) -> None:
        try:
            await self.server.app(scope, request.receive, request.send)
        except Exception:
            log.exception("gateway hot path failed")
            if not request.started and request.head is None and not request.done \
                    and self.transport is not None and not self.lost:
                self.transport.write(b"HTTP/1.1 500 Internal Server Error\r\n"
                                     b"content-length: 0\r\nconnection: close\r\n\r\n")
            if self.transport is not None:
                self.transport.close()
        finally:
            if not request.done:
                # The app returned without finishing its response: the framing is broken.
                request.done = True
                if not request.gone.done():
                    request.gone.set_result(None)
                if self.transport is not None:
                    self.transport.close()

    def request_done(self, request: _Request) -> None:
        if self.request is not request:
            return
        self.request = None
        self.flow = None
        if not request.keep_alive or self.lost:
            if self.transport is not None:
                if self._discard and not self.lost and self.transport.can_write_eof():
                    self._linger(self.transport)
                else:
                    self.transport.close()
            return
        self.idle_since = asyncio.get_running_loop().time()
        if self.buffer:
            asyncio.get_running_loop().call_soon(self._resume)

    def _linger(self, transport: asyncio.Transport) -> None:
        """Send FIN after the response, read and drop the rest of the body for a while,
        then close: closing at once with unread bytes would reset the connection and the
        client could lose the response it has not read yet."""
        transport.write_eof()
        self._lingering = True
        self.buffer.clear()
        asyncio.get_running_loop().call_later(_LINGER_SECONDS, transport.close)

    def _resume(self) -> None:
        if self.request is None and not self.lost and not self.piping:
            self._next()

    # -- the pipe to Hypercorn ----------------------------------------------------------------

    def _to_backend(self) -> None:
        self.piping = True
        self.idle_since = None  # Hypercorn times the piped connection out itself
        task = asyncio.ensure_future(self._connect_backend())
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    async def _connect_backend(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, pipe = await loop.create_unix_connection(lambda: _Pipe(self), self.server.backend)
        except OSError:
            log.exception("cannot reach the gateway's Hypercorn backend")
            if self.transport is not None:
                self.transport.close()
            return
        self.pipe = pipe
        if self.lost:
            if pipe.transport is not None:
                pipe.transport.close()
            return
        if self.buffer and pipe.transport is not None:
            pipe.transport.write(bytes(self.buffer))
            self.buffer.clear()
        if self._eof_pending and pipe.transport is not None and pipe.transport.can_write_eof():
            pipe.transport.write_eof()


class FrontServer:
    """Owns the public socket; serves hot routes itself and pipes the rest to ``backend``."""

    def __init__(self, app: ASGIApp, backend: str, *, max_body: int,
                 keep_alive: float = 75.0) -> None:
        self.app = app
        self.backend = backend
        self.max_body = max_body
        self.keep_alive = keep_alive
        self.connections: set[_FrontProtocol] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closing = False

    def protocol(self) -> _FrontProtocol:
        return _FrontProtocol(self)

    async def sweep_idle(self) -> None:
        """Close keep-alive connections idle past ``keep_alive`` (one timer for all, rather
        than a timer armed and cancelled per request)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(5.0, self.keep_alive / 2))
            now = loop.time()
            for conn in list(self.connections):
                since = conn.idle_since
                if since is not None and now - since > self.keep_alive:
                    conn.close_if_idle()

    async def drain(self, grace: float) -> None:
        """Stop taking new hot requests, wait up to ``grace`` s for those in flight."""
        self.closing = True
        for conn in list(self.connections):
            conn.close_if_idle()
        pending = {t for t in self.tasks if not t.done()}
        if pending:
            await asyncio.wait(pending, timeout=grace)
        for conn in list(self.connections):
            if conn.transport is not None and not conn.piping:
                conn.transport.close()


@contextlib.asynccontextmanager
async def running_gateway(app: Any, *, grace: float = 5.0) -> AsyncIterator[str]:
    """Serve a ``GatewayApp`` through the front on a loopback port while the block runs."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    host, port = sock.getsockname()[:2]
    stop = asyncio.Event()
    task = asyncio.ensure_future(
        serve_front(app, sock, stop.wait, grace=grace, max_body=app.gw.max_body))
    try:
        yield f"http://{host}:{port}"
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=grace + 5)
        finally:
            sock.close()


async def serve_front(app: Any, sock: socket.socket, shutdown: Callable[[], Awaitable[Any]],
                      *, grace: float = 30.0, max_body: int) -> None:
    """Serve ``app`` (a ``GatewayApp``) on ``sock``: the front for hot routes, Hypercorn
    (on a private Unix socket) for the rest and for the lifespan. Returns after shutdown."""
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config as HypercornConfig

    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory(prefix="gpuctl-") as tmp:
        backend = os.path.join(tmp, "quart.sock")
        hc = HypercornConfig()
        hc.bind = [f"unix:{backend}"]
        hc.accesslog = None
        hc.loglevel = "WARNING"  # errors still logged; not "Running on <private socket>"
        hc.graceful_timeout = grace
        hc.keep_alive_timeout = 75.0
        stop_backend = asyncio.Event()
        started = asyncio.Event()

        async def opened() -> None:  # registered last: runs once the engine has started
            started.set()

        app.quart.before_serving(opened)
        backend_task = asyncio.ensure_future(
            hypercorn_serve(app, hc, shutdown_trigger=stop_backend.wait))
        front = FrontServer(app, backend, max_body=max_body)
        try:
            waiter = asyncio.ensure_future(started.wait())
            await asyncio.wait({waiter, backend_task}, return_when=asyncio.FIRST_COMPLETED)
            if backend_task.done():
                waiter.cancel()
                if app.gw.startup_error is not None:
                    raise app.gw.startup_error  # the engine's own error, not Hypercorn's wrap
                await backend_task  # startup failed: raise its error
                return
            if app.gw.startup_error is not None:
                raise app.gw.startup_error
            server = await loop.create_server(front.protocol, sock=sock, backlog=4096)
            sweeper = asyncio.ensure_future(front.sweep_idle())
            try:
                await shutdown()
            finally:
                sweeper.cancel()
                server.close()
                await front.drain(grace)
        finally:
            stop_backend.set()
            if backend_task.done():
                if not backend_task.cancelled():
                    backend_task.exception()  # already reported above
            else:
                with contextlib.suppress(asyncio.CancelledError):
                    await backend_task
