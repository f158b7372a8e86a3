"""``gpuctl serve``: the shared gateway, engine and HTTP server in one process.

The order matters for a server that nobody watches: the cloud provider is built first, so a
missing SURF token fails at once with exit 4 (never a prompt, never a half-started server);
then the socket is bound (a port in use fails before the engine starts); then granian serves
the app in this process's loop, and its ``before_serving`` starts the engine. SIGTERM or
SIGINT stops accepting, lets streams in flight finish for up to ``GRACE_SECONDS``, stops the
engine (which persists its state) and exits 0 (SIGTERM) or 130 (SIGINT, Ctrl-C), as the
exit-code table says.

``--workers N`` (with ``store.url``) makes this process the parent of N gateway processes
on the same port, each a replica (``cli/workers.py``); the parent serves nothing itself.

``--demo`` serves the simulated fleet of ``gpuctl.sim.demo`` instead: no credentials are
looked for and no state of the user's is opened (the demo has its own key store in a temp
dir). It prints the demo key and commands to try, publishes itself for ``status --demo``
(``cli/remote.py``) and logs the fleet's lifecycle as it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import signal
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

import typer

from gpuctl.errors import UsageError

if TYPE_CHECKING:
    from gpuctl.cli.context import AppContext
    from gpuctl.cloud.base import CloudProvider
    from gpuctl.config import Config
    from gpuctl.gateway.app import GatewayApp
    from gpuctl.gateway.server import ServerSettings

__all__ = ["GRACE_SECONDS", "run_gateway", "serve", "stop_on_signals"]

#: How long streams in flight may run on after SIGTERM before the server closes them.
GRACE_SECONDS = 30.0

#: More workers than this is a typo, not a machine: each holds Redis connections and a store.
MAX_WORKERS = 64


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
    insecure_http: Annotated[bool, typer.Option(
        "--insecure-http", help="Serve plain HTTP on a non-loopback address (keys cross the "
        "network in clear text): only behind a TLS proxy on a trusted network.")] = False,
    workers: Annotated[int, typer.Option(
        "--workers", min=1, max=MAX_WORKERS, help="Gateway processes sharing the port, one "
        "per core (each a replica: needs store.url).")] = 1,
    worker: Annotated[str | None, typer.Option(
        "--worker", hidden=True, help="Internal: run as worker I on inherited socket FD "
        "(I:FD), started by --workers.")] = None,
) -> None:
    """Run the shared gateway: the Ollama and OpenAI APIs in front of the whole fleet."""
    from gpuctl.cli.context import AppContext
    from gpuctl.gateway import logs
    from gpuctl.gateway.server import raise_fd_limit

    app_ctx = ctx.find_root().obj
    if not isinstance(app_ctx, AppContext):
        app_ctx = AppContext()
    if host is not None:
        app_ctx.overrides["server.host"] = host
    if port is not None:
        app_ctx.overrides["server.port"] = port
    config = app_ctx.config
    if workers > 1 and (demo or not config.store.url):
        raise UsageError(
            f"--workers {workers} needs store.url: the workers are replicas that must share "
            "slots, leases and the leader lease through Redis, or each would hand out every "
            "GPU's slots and pause GPUs the others use" + (" (--demo has no store)" if demo
                                                          else ""),
            hint="Set store.url (GPUCTL_STORE__URL=redis://HOST:6379/0), or drop --workers.")
    raise_fd_limit()  # first: the server's connection cap is sized to the descriptors
    settings = _settings(app_ctx, config, insecure_http=insecure_http)
    logs.install()
    if worker is not None:
        received = asyncio.run(_serve_worker(app_ctx, config, worker, settings))
    elif workers > 1:
        app_ctx.cloud()  # missing credentials: exit 4 here, not once per worker
        code = _run_workers(app_ctx, config, workers, settings, insecure_http=insecure_http)
        if code:
            raise typer.Exit(code)
        return
    elif demo:
        received = asyncio.run(_serve_demo(app_ctx, config, settings))
    else:
        cloud = app_ctx.cloud()  # missing credentials: CredentialsError, exit 4, before binding
        received = asyncio.run(_serve_cloud(app_ctx, config, cloud, settings))
    if signal.SIGINT in received and signal.SIGTERM not in received:
        raise typer.Exit(130)  # Ctrl-C, as the exit-code table says; SIGTERM is a clean 0


def _settings(app_ctx: AppContext, config: Config, *, insecure_http: bool) -> ServerSettings:
    """The server's settings; refuses plain HTTP off loopback unless ``--insecure-http``."""
    from gpuctl.gateway.server import ServerSettings

    settings = ServerSettings.from_config(config, app_ctx.credentials().setting_file)
    if not settings.tls and not insecure_http and not _loopback(config.server.host):
        raise UsageError(
            f"refusing to serve plain HTTP on {config.server.host}: every user's key would "
            "cross the network in clear text",
            hint="Set server.tls_cert and server.tls_key, or put a TLS proxy in front and "
                 "pass --insecure-http (see README: Running the gateway for a group).")
    return settings


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def _serve_demo(app_ctx: AppContext, config: Config,
                      settings: ServerSettings) -> list[signal.Signals]:
    from gpuctl.cli.output import message
    from gpuctl.cli.remote import DEMO_FILE, published_demo
    from gpuctl.gateway.app import create_app
    from gpuctl.sim.demo import demo_fleet

    def say(line: str) -> None:
        message(app_ctx, line)

    stop = asyncio.Event()
    # From the start: a SIGTERM right after the intro still stops cleanly (and exits 0).
    with stop_on_signals(stop) as received:
        sock = _bind(config.server.host, config.server.port)
        try:
            url = f"http://{_shown(sock, reachable=True)}"
            async with demo_fleet(config, say=say) as fleet:
                app = create_app(fleet.config, fleet.engine, fleet.keys)
                with published_demo(app_ctx.cache_dir() / DEMO_FILE, url, fleet.key):
                    for line in fleet.intro(url):  # once published: `status --demo` works
                        say(line)
                    await run_gateway(app, sock, shutdown=stop, settings=settings)
        finally:
            sock.close()
    return received


def _run_workers(app_ctx: AppContext, config: Config, count: int, settings: ServerSettings,
                 *, insecure_http: bool) -> int:
    """Bind one listening socket per worker here (``SO_REUSEPORT``, one port), then
    supervise ``count`` workers, each serving its own (``workers.py`` says why)."""
    from gpuctl.cli.output import message
    from gpuctl.cli.workers import Workers

    socks = [_bind(config.server.host, config.server.port, reuse_port=True)]
    try:
        port = socks[0].getsockname()[1]  # --port 0: the others share the one picked
        socks += [_bind(config.server.host, port, reuse_port=True) for _ in range(count - 1)]
        scheme = "https" if settings.tls else "http"
        app_ctx.err.print(f"gpuctl gateway on {scheme}://{_shown(socks[0])} with {count} "
                          "workers (Ollama API, OpenAI API under /v1); Ctrl-C stops it",
                          markup=False, highlight=False, soft_wrap=True)
        args = ["--insecure-http"] if insecure_http else []
        return Workers(socks, args, grace=GRACE_SECONDS,
                       say=lambda line: message(app_ctx, line)).run()
    finally:
        for sock in socks:
            sock.close()


async def _serve_worker(app_ctx: AppContext, config: Config, worker: str,
                        settings: ServerSettings) -> list[signal.Signals]:
    """One of ``--workers``: serve the inherited socket until a signal or the parent's end."""
    import os

    try:
        index, fd = (int(part) for part in worker.split(":"))
        sock = socket.socket(fileno=fd)
    except (ValueError, OSError):
        raise UsageError(f"--worker {worker!r}: not a socket inherited from `serve --workers`",
                         hint="--worker is internal; use --workers N.") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def parent_gone() -> None:  # stdin is the parent's pipe: EOF when the parent is gone
        if not os.read(0, 4096):
            loop.remove_reader(0)
            stop.set()

    loop.add_reader(0, parent_gone)
    try:
        with stop_on_signals(stop) as received:
            await _serve_cloud(app_ctx, config, app_ctx.cloud(), settings, sock=sock,
                               worker=index, shutdown=stop)
    finally:
        loop.remove_reader(0)
    return received


async def _serve_cloud(app_ctx: AppContext, config: Config, cloud: CloudProvider,
                       settings: ServerSettings, *, sock: socket.socket | None = None,
                       worker: int | None = None,
                       shutdown: asyncio.Event | None = None) -> list[signal.Signals]:
    """Serve the fleet; ``worker``: as one of ``--workers``, on the ``sock`` the parent
    bound for it, with a store of its own (``workers.py`` says why)."""
    from gpuctl.config import state_dir
    from gpuctl.engine.replicas import ReplicaSet
    from gpuctl.gateway.app import create_app
    from gpuctl.store import Store
    from gpuctl.store.keys import KeyStore
    from gpuctl.store.shared import ReplicaKeys

    try:
        if worker is None:
            store = app_ctx.open_store()
        else:
            from gpuctl.cli.workers import seed_worker_store, worker_state_dir

            main_dir = state_dir(config, app_ctx.env)
            store = Store.open(worker_state_dir(main_dir, worker))
            if worker:  # worker 0's store is the state dir's own
                seed_worker_store(main_dir, store)
        replicas = ReplicaSet(config.store.url) if config.store.url else None
        keys = (ReplicaKeys if replicas else KeyStore).open(state_dir(config, app_ctx.env))
        try:
            if replicas is not None and isinstance(keys, ReplicaKeys):
                await replicas.share_keys(keys)
            engine = app_ctx.make_engine(replicas.cloud(cloud) if replicas else cloud, store)
            if replicas is not None:  # store.url: one of several gateways sharing the fleet
                await replicas.join(engine)
            app = create_app(config, engine, keys, node_token=app_ctx.node_token())
            if replicas is not None:  # which replica answered: for operators and tests
                app.gw.replica_headers = [(b"x-gpuctl-replica", replicas.holder.replica.encode())]
            if sock is None:
                sock = _bind(config.server.host, config.server.port)
                scheme = "https" if settings.tls else "http"
                app_ctx.err.print(f"gpuctl gateway on {scheme}://{_shown(sock)} "
                                  f"(Ollama API, OpenAI API under /v1); Ctrl-C stops it",
                                  markup=False, highlight=False, soft_wrap=True)
            try:
                return await run_gateway(app, sock, settings=settings, shutdown=shutdown)
            finally:
                sock.close()
        finally:
            if replicas is not None:
                await replicas.close()
            keys.close()
            store.close()
    finally:
        await cloud.aclose()


def _bind(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    try:
        sock = socket.create_server((host, port), backlog=2048, reuse_port=reuse_port,
                                    family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}",
                         hint="Pick another port with --port, or stop what uses it.") from None
    sock.set_inheritable(True)
    return sock


def _shown(sock: socket.socket, *, reachable: bool = False) -> str:
    """``host:port`` of ``sock``; ``reachable``: a wildcard address becomes loopback, for
    URLs meant to be pasted on this machine."""
    host, port = sock.getsockname()[:2]
    if reachable and host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[list[signal.Signals]]:
    """While the block runs, SIGTERM and SIGINT set ``stop`` instead of killing the process;
    the list it yields collects the signals received (Ctrl-C exits 130, SIGTERM 0)."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    received: list[signal.Signals] = []

    def handler(sig: signal.Signals) -> None:
        received.append(sig)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, handler, sig)
            installed.append(sig)
    try:
        yield received
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def run_gateway(app: GatewayApp, sock: socket.socket, *,
                      shutdown: asyncio.Event | None = None,
                      settings: ServerSettings | None = None) -> list[signal.Signals]:
    """Serve ``app`` on ``sock`` until SIGTERM/SIGINT, then drain and stop. A caller that
    passes ``shutdown`` owns the signals (see ``stop_on_signals``): serving ends when it is set.

    granian serves the app (``gpuctl.gateway.server``); the whole shutdown sequence is here.
    """
    from gpuctl.gateway.drain import drain
    from gpuctl.gateway.server import GatewayServer

    stop = shutdown or asyncio.Event()
    received: list[signal.Signals] = []  # stays empty when the caller owns the signals
    with contextlib.ExitStack() as stack:
        if shutdown is None:
            received = stack.enter_context(stop_on_signals(stop))
        server = GatewayServer(app, sock, settings)
        await server.start()  # the engine starts; its start error is raised here
        try:
            await stop.wait()
        finally:
            # Shutdown, in this order:
            server.stop_accepting()             # 1. no new connections
            app.closing()                       # 2. end the status pages' live streams
            # 3. requests in flight finish, or are ended; every request still waiting for a
            #    GPU is answered "gateway restarting" before the grace ends (drain.py)
            finishing = asyncio.ensure_future(server.finish(GRACE_SECONDS))
            await drain(app.gw, GRACE_SECONDS, finishing)
            await finishing
            await server.closed()               # 4. the engine stops and persists its state
    return received
