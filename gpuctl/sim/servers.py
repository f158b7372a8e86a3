"""Run an ASGI app under granian on a real loopback socket, for tests, benchmarks and the demo.

The same embedded granian server as the gateway (``gpuctl.gateway.server.EmbeddedServer``),
so the simulated nodes and cloud speak HTTP through proven code too. The socket is bound
before granian starts (port 0, so the OS picks a free port), which means the URL is known at
once and there is no race for a port. ``running`` serves inside the current event loop;
``ServerThread`` serves from a thread of its own, for synchronous callers such as Typer's test
runner or the real ``ollama.Client``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

from gpuctl.gateway.server import EmbeddedServer, ServerSettings

__all__ = ["ServerThread", "bind_loopback", "running", "serve_until"]

#: How long a stopping simulator waits for its open streams before cutting them.
STOP_SECONDS = 2.0


def bind_loopback(host: str = "127.0.0.1", port: int = 0, backlog: int = 4096) -> socket.socket:
    """A listening TCP socket on loopback; port 0 lets the OS choose."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"


def _settings() -> ServerSettings:
    # A simulator is not under attack: no header timeout to trip a slow test machine.
    return ServerSettings(header_timeout_seconds=600)


async def serve_until(app: Any, sock: socket.socket, stop: asyncio.Event) -> None:
    """Serve ``app`` on ``sock`` until ``stop`` is set."""
    server = EmbeddedServer(app, sock, _settings())
    task = asyncio.ensure_future(server.serve())
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        await server.stop_within(task, STOP_SECONDS)


@contextlib.asynccontextmanager
async def running(app: Any) -> AsyncIterator[str]:
    """Serve ``app`` in this event loop while the block runs; yields its base URL."""
    sock = bind_loopback()
    stop = asyncio.Event()
    task = asyncio.ensure_future(serve_until(app, sock, stop))
    try:
        yield _url(sock)
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, timeout=3 * STOP_SECONDS)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            task.cancel()
        sock.close()


class ServerThread:
    """Serve an ASGI app from a daemon thread with its own event loop.

    Use as a context manager: ``with ServerThread(app) as url: ...``. ``call`` runs a
    coroutine in the server's loop (to flip simulated state from a synchronous test).
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.sock = bind_loopback()
        self.url = _url(self.sock)
        self.loop = asyncio.new_event_loop()
        self._shutdown: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"server {self.url}", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._shutdown = asyncio.Event()
            self._started.set()
            await serve_until(self.app, self.sock, self._shutdown)

        try:
            self.loop.run_until_complete(main())
        finally:
            self.loop.close()

    def start(self) -> str:
        self._thread.start()
        self._started.wait(5)
        return self.url

    def call(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self._shutdown is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._shutdown.set)
        self._thread.join(10)
        self.sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
