"""The gateway's HTTP server: granian (Rust, hyper), embedded in the caller's asyncio loop.

Why granian, and why not our own server any more: the hand-written front server met its
speed targets, but an attack run found what every proven server already has and ours did
not (bodies buffered before the key check, no connection cap or fd headroom, no backpressure
on its piped path). Served by granian in the same benchmark the ``GatewayApp`` measured at
parity with it (see README "Performance"), so every HTTP/1.1 and HTTP/2 framing rule, TLS,
the header-read timeout, the backlog and the backpressure are granian's, and this module only
chooses their settings.

Embedded (``granian.server.embed.Server``) rather than in worker processes: the engine and
the gateway share one loop and one process, so ``gpuctl serve`` is one process to supervise.
The listening socket is bound by ``serve`` first (a port in use fails before anything
starts; port 0 gives a known port in tests) and handed to granian as a duplicate descriptor.

Lifecycle: granian runs the ASGI lifespan, so Quart's ``before_serving``/``after_serving``
start and stop the engine. ``GatewayServer.stop_accepting`` makes granian stop accepting and
wait for connections in flight (hyper's graceful shutdown, which has no bound of its own);
``finish`` bounds that wait by cancelling the requests still running when the grace period
ends; ``closed`` waits for the lifespan shutdown (the engine persists its state).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from granian._granian import SocketHolder
from granian.constants import HTTPModes, Interfaces, SSLProtocols
from granian.http import HTTP1Settings, HTTP2Settings
from granian.server.embed import Server

from gpuctl.config import Config
from gpuctl.errors import ConfigError
from gpuctl.gateway.silent import SilentConnections

if TYPE_CHECKING:
    from gpuctl.gateway.app import GatewayApp

__all__ = [
    "EmbeddedServer",
    "GatewayServer",
    "ServerSettings",
    "fd_budget",
    "raise_fd_limit",
    "running_gateway",
]

log = logging.getLogger(__name__)

#: After the grace period the requests still running are cancelled; this long more is
#: allowed for their connections to close before the server is stopped the hard way.
_AFTER_CANCEL_SECONDS = 5.0


@dataclass(frozen=True)
class ServerSettings:
    """What granian is told; built from ``server.*`` config by ``from_config``."""

    #: Connections served at once (granian's backpressure): past it, new connections wait
    #: in the kernel's backlog instead of being accepted.
    max_connections: int = 4096
    backlog: int = 4096
    header_timeout_seconds: float = 15.0
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @classmethod
    def from_config(cls, config: Config,
                    find_file: Callable[[str, str], Path] | None = None) -> ServerSettings:
        """The settings ``server.*`` asks for. ``find_file(value, setting)`` finds the TLS
        files: ``serve`` hands in ``Credentials.setting_file`` (a path, or a systemd
        credential's name), since only ``credentials.py`` looks for secrets; without it the
        values are plain paths."""
        server = config.server
        find = find_file or _plain_path
        cert = find(server.tls_cert, "server.tls_cert") if server.tls_cert else None
        key = find(server.tls_key, "server.tls_key") if server.tls_key else None
        if (cert is None) != (key is None):
            raise ConfigError("server.tls_cert and server.tls_key go together: set both")
        return cls(max_connections=fd_budget(server.max_connections),
                   backlog=max(server.max_connections, 128),
                   header_timeout_seconds=server.header_timeout_seconds,
                   tls_cert=cert, tls_key=key)


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; return the new soft limit.

    Every connection is a descriptor: at systemd's default soft limit (1,024) a thousand idle
    connections took the old gateway down. The README's unit also sets ``LimitNOFILE=``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


#: Descriptors kept free of client connections: the listening socket, SQLite, logs, the
#: event loop's own, the cloud client, granian's threads.
FD_RESERVE = 64


def fd_budget(wanted: int) -> int:
    """``server.max_connections``, lowered so connections can never exhaust the descriptors.

    Each client connection may hold a second descriptor toward its node. Past the limit
    granian stops accepting and new connections wait in the kernel's backlog, which costs
    this process nothing; run out of descriptors instead and granian's runtime can panic
    (seen: ``TooManyOpenFiles`` unwrapped, the process aborted). So at most
    ``(soft limit − FD_RESERVE) / 2`` connections are served at once (at least 16).
    """
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(16, min(wanted, (soft - FD_RESERVE) // 2))


def _plain_path(value: str, setting: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"{setting}: file {value!r} not found")
    return path


class EmbeddedServer(Server):
    """granian's embedded server for any ASGI app, serving on a socket bound by the caller."""

    def __init__(self, app: Any, sock: socket.socket, settings: ServerSettings) -> None:
        http1 = HTTP1Settings(header_read_timeout=int(settings.header_timeout_seconds * 1000))
        super().__init__(
            app,
            interface=Interfaces.ASGI,  # with lifespan: Quart starts and stops the engine
            http=HTTPModes.auto,
            websockets=False,
            backlog=settings.backlog,
            backpressure=settings.max_connections,
            http1_settings=http1,
            http2_settings=HTTP2Settings(max_concurrent_streams=100),
            log_enabled=False,
            ssl_cert=settings.tls_cert,
            ssl_key=settings.tls_key,
            ssl_protocol_min=SSLProtocols.tls12,
        )
        # Accepted sockets inherit TCP_NODELAY from the listener; without it a streamed
        # answer's first chunk waited ~40 ms for the client's delayed ACK (Nagle), measured.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._fd = os.dup(sock.fileno())  # granian owns (and closes) its copy

    def _init_shared_socket(self) -> None:
        holder: Any = SocketHolder  # its stub lacks the constructor's arguments
        self._shd = holder(self._fd, False, self.backlog)
        self._ssp = None

    def halt(self) -> None:
        """Stop accepting; granian then waits for the connections in flight."""
        untyped: Any = self  # granian's methods carry no annotations
        untyped.stop()

    async def stop_within(self, task: asyncio.Task[None], seconds: float) -> None:
        """Stop serving (``task`` runs ``serve()``): gracefully for up to ``seconds``, then
        by cancelling the worker (its lifespan shutdown is then skipped)."""
        self.halt()
        await asyncio.wait({task}, timeout=seconds)
        if not task.done():
            workers: list[Any] = list(self.wrks)
            for worker in workers:
                worker.kill()
            await asyncio.wait({task}, timeout=seconds)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved here; the caller reports what matters


class GatewayServer:
    """One granian server for one ``GatewayApp``; see the module docstring for the order."""

    def __init__(self, app: GatewayApp, sock: socket.socket,
                 settings: ServerSettings | None = None) -> None:
        self.app = app
        self.settings = settings or ServerSettings()
        self._server = EmbeddedServer(app, sock, self.settings)
        #: Connections that never send a byte: granian keeps them for ever (see ``silent``).
        self.silent = SilentConnections(sock, self.settings.header_timeout_seconds,
                                        tls=self.settings.tls)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Serve; return once the engine has started. Raises the engine's start error."""
        started = asyncio.Event()

        async def opened() -> None:  # registered last: runs once the engine has started
            started.set()

        self.app.quart.before_serving(opened)
        self._task = asyncio.ensure_future(self._server.serve())
        waiter = asyncio.ensure_future(started.wait())
        await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            waiter.cancel()
        error = self.app.gw.startup_error
        if error is not None:
            await self._stop_now()
            raise error  # the engine's own error (a rejected token still exits 4)
        if self._task.done():
            self._task.result()  # granian failed to start: raise its error
            raise RuntimeError("the HTTP server stopped before it started")
        self.silent.start()

    def stop_accepting(self) -> None:
        """No new connections; those in flight go on (granian waits for them)."""
        self._server.halt()
        # Silent connections go on being closed: granian's graceful stop waits for them too.

    async def finish(self, grace: float) -> None:
        """Wait up to ``grace`` s for requests in flight, then cancel those still running."""
        task = self._task
        if task is None or task.done():
            return
        await asyncio.wait({task}, timeout=grace)
        if task.done():
            return
        cancelled = self.app.cancel_requests()
        if cancelled:
            log.warning("stopped %d request(s) still running after %.0f s", cancelled, grace)
        await asyncio.wait({task}, timeout=_AFTER_CANCEL_SECONDS)

    async def closed(self) -> None:
        """Wait for the server to end (the lifespan shutdown stops the engine)."""
        await self.silent.stop()
        task = self._task
        if task is None:
            return
        if not task.done():
            # Connections that outlived every bound: stop the worker the hard way, then run
            # the lifespan shutdown that its cancellation skipped.
            await self._stop_now()
            if task.cancelled() or not task.done():
                await self.app.quart.shutdown()
            return
        task.result()

    async def _stop_now(self) -> None:
        await self.silent.stop()
        if self._task is not None:
            await self._server.stop_within(self._task, _AFTER_CANCEL_SECONDS)


@contextlib.asynccontextmanager
async def running_gateway(app: GatewayApp, *, grace: float = 5.0,
                          settings: ServerSettings | None = None) -> AsyncIterator[str]:
    """Serve a ``GatewayApp`` on a loopback port while the block runs (tests, the demo)."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
    host, port = sock.getsockname()[:2]
    server = GatewayServer(app, sock, settings)
    try:
        await server.start()
        try:
            scheme = "https" if server.settings.tls else "http"
            yield f"{scheme}://{host}:{port}"
        finally:
            server.stop_accepting()
            await server.finish(grace)
            await server.closed()
    finally:
        sock.close()
