"""``gpuctl serve``: the shared gateway, engine and HTTP server in one process.

The order matters for a server that nobody watches: the cloud provider is built first, so a
missing SURF token fails at once with exit 4 (never a prompt, never a half-started server);
then the socket is bound (a port in use fails before the engine starts); then Hypercorn runs
the app, whose ``before_serving`` starts the engine. SIGTERM or SIGINT stops accepting,
lets streams in flight finish for up to ``GRACE_SECONDS``, stops the engine (which persists
its state) and exits 0.

``--demo`` serves a simulated fleet. The simulated fleet is wired in through ``demo_fleet``:
an async context manager factory that starts it and yields the cloud provider to serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from gpuctl.errors import UsageError

if TYPE_CHECKING:
    from gpuctl.cli.context import AppContext
    from gpuctl.cloud.base import CloudProvider
    from gpuctl.config import Config

__all__ = ["GRACE_SECONDS", "demo_fleet", "run_gateway", "serve"]

#: How long streams in flight may run on after SIGTERM before the server closes them.
GRACE_SECONDS = 30.0

#: The ``--demo`` hook: given the context, start a simulated fleet, yield its provider.
demo_fleet: Callable[[AppContext], AbstractAsyncContextManager[CloudProvider]] | None = None


def serve(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(
        "--host", help="Address to listen on (default: server.host).", show_default=False)
    ] = None,
    port: Annotated[int | None, typer.Option(
        "--port", help="Port to listen on (default: server.port).", show_default=False)
    ] = None,
    demo: Annotated[bool, typer.Option(
        "--demo", help="Serve a simulated fleet: no cloud account or GPU needed.")] = False,
) -> None:
    """Run the shared gateway: the Ollama and OpenAI APIs in front of the whole fleet."""
    from gpuctl.cli.context import AppContext

    app_ctx = ctx.find_root().obj
    if not isinstance(app_ctx, AppContext):
        app_ctx = AppContext()
    if host is not None:
        app_ctx.overrides["server.host"] = host
    if port is not None:
        app_ctx.overrides["server.port"] = port
    config = app_ctx.config
    if demo:
        if demo_fleet is None:
            raise UsageError("--demo is not available in this build")
        asyncio.run(_serve_demo(app_ctx, config))
        return
    cloud = app_ctx.cloud()  # missing credentials: CredentialsError, exit 4, before binding
    asyncio.run(_serve_cloud(app_ctx, config, cloud))


async def _serve_demo(app_ctx: AppContext, config: Config) -> None:
    assert demo_fleet is not None
    async with demo_fleet(app_ctx) as cloud:
        await _serve_cloud(app_ctx, config, cloud)


async def _serve_cloud(app_ctx: AppContext, config: Config, cloud: CloudProvider) -> None:
    from gpuctl.config import state_dir
    from gpuctl.gateway.app import create_app
    from gpuctl.store.keys import KeyStore

    try:
        store = app_ctx.open_store()
        keys = KeyStore.open(state_dir(config, app_ctx.env))
        try:
            engine = app_ctx.make_engine(cloud, store)
            token = app_ctx.credentials().find("node_token")
            app = create_app(config, engine, keys, node_token=token.value if token else None)
            sock = _bind(config.server.host, config.server.port)
            try:
                app_ctx.err.print(f"gpuctl gateway on http://{_shown(sock)} "
                                  f"(Ollama API, OpenAI API under /v1); Ctrl-C stops it",
                                  markup=False, highlight=False, soft_wrap=True)
                await run_gateway(app, sock)
            finally:
                sock.close()
        finally:
            keys.close()
            store.close()
    finally:
        await cloud.aclose()


def _bind(host: str, port: int) -> socket.socket:
    try:
        sock = socket.create_server((host, port), backlog=2048,
                                    family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}",
                         hint="Pick another port with --port, or stop what uses it.") from None
    sock.set_inheritable(True)
    return sock


def _shown(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def run_gateway(app: Any, sock: socket.socket, *,
                      shutdown: asyncio.Event | None = None) -> None:
    """Serve ``app`` on ``sock`` until SIGTERM/SIGINT (or ``shutdown``), then drain and stop.

    The socket goes to the gateway's lean front (hot inference routes), which hands every
    other request to Hypercorn running the Quart app (see ``gpuctl.gateway.front``).
    """
    from gpuctl.gateway.front import serve_front

    stop = shutdown or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        await serve_front(app, sock, stop.wait, grace=GRACE_SECONDS, max_body=app.gw.max_body)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
