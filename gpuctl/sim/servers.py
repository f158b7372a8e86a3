"""Run an ASGI app under Hypercorn on a real loopback socket, for tests, benchmarks and the demo.

The socket is bound before Hypercorn starts (port 0, so the OS picks a free port), which
means the URL is known at once and there is no race for a port. ``running`` serves inside
the current event loop; ``ServerThread`` serves from a thread of its own, for synchronous
callers such as Typer's test runner or the real ``ollama.Client``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config as HypercornConfig

__all__ = ["ServerThread", "bind_loopback", "hypercorn_config", "running"]


def bind_loopback(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket on loopback; port 0 lets the OS choose."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def hypercorn_config(sock: socket.socket, **options: Any) -> HypercornConfig:
    """A quiet Hypercorn config serving on ``sock`` (access log off: it costs ~45 %/request)."""
    config = HypercornConfig()
    # Hypercorn takes ownership of (and closes) the descriptor it is given: hand it a copy.
    config.bind = [f"fd://{os.dup(sock.fileno())}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 1.0
    for key, value in options.items():
        setattr(config, key, value)
    return config


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def running(app: Any, **options: Any) -> AsyncIterator[str]:
    """Serve ``app`` in this event loop while the block runs; yields its base URL."""
    sock = bind_loopback()
    shutdown = asyncio.Event()
    task = asyncio.ensure_future(
        serve(app, hypercorn_config(sock, **options), shutdown_trigger=shutdown.wait)
    )
    try:
        yield _url(sock)
    finally:
        shutdown.set()
        try:
            await asyncio.wait_for(task, timeout=5)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            task.cancel()
        sock.close()


class ServerThread:
    """Serve an ASGI app from a daemon thread with its own event loop.

    Use as a context manager: ``with ServerThread(app) as url: ...``. ``call`` runs a
    coroutine in the server's loop (to flip simulated state from a synchronous test).
    """

    def __init__(self, app: Any, **options: Any) -> None:
        self.app = app
        self.options = options
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
            await serve(
                self.app,
                hypercorn_config(self.sock, **self.options),
                shutdown_trigger=self._shutdown.wait,
            )

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
