"""The gateway as one ASGI app: a lean hot path for inference beside a Quart app for the rest.

Quart costs ~0.3-0.4 ms per request and 10-20 µs per chunk (design.md "Performance notes"),
more than the whole per-request budget, so ``GatewayApp`` looks at the path first: the
inference routes (``proxy.HOT_ROUTES``) and ``/`` are answered by raw ASGI code, everything
else (listings, management, admin API, metrics, and the lifespan events) goes to Quart. Quart's
``before_serving``/``after_serving`` own the engine's start and stop and the shared
connection pool, so the server's lifespan events (``gateway/server.py``) drive the whole
lifecycle.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast
from urllib.parse import parse_qsl

from quart import Quart, Response, g, request
from werkzeug.exceptions import HTTPException

from gpuctl.config import Config
from gpuctl.errors import GpuctlError, retry_after
from gpuctl.gateway import admin, routes, ui
from gpuctl.gateway.auth import AuthError
from gpuctl.gateway.context import EngineFace, Gateway
from gpuctl.gateway.proxy import HOT_ROUTES, handle
from gpuctl.gateway.replies import (
    TEXT_CT,
    Receive,
    Scope,
    Send,
    error_body,
    reply,
    reply_error,
)
from gpuctl.store.keys import KeyStore
from gpuctl.tasks import cancel_and_wait

__all__ = ["GatewayApp", "create_app"]

#: Routes that need no key at all.
PUBLIC = frozenset({"/", "/health"})
#: Path prefixes that change nodes or the fleet: admin keys only.
ADMIN_PREFIXES = ("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete",
                  "/api/blobs/")
#: Whole paths for admin keys only: the request log names every user.
ADMIN_PATHS = frozenset({"/admin/requests"})
KEY_FLUSH_SECONDS = 30.0


def _needs_admin(path: str, args: Mapping[str, str]) -> bool:
    """Whether ``path`` (with its query ``args``) needs an admin key."""
    if path.startswith(ADMIN_PREFIXES) or path in ADMIN_PATHS:
        return True
    if path == "/gpu/discover":
        return admin.refresh_asked(args)  # reading the cloud afresh is an admin's call
    return path.startswith("/gpu/") and path.endswith(("/resume", "/pause"))


def _is_ui(path: str) -> bool:
    return path == "/ui" or path.startswith("/ui/")


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if (name == b"content-length" and value != b"0") or name == b"transfer-encoding":
            return True
    return False


class GatewayApp:
    """The ASGI callable granian serves; ``quart`` is the app behind the hot path."""

    def __init__(self, gw: Gateway, quart: Quart) -> None:
        self.gw = gw
        self.quart = quart
        # Quart types its ASGI arguments precisely; ours are the generic ASGI mappings.
        self._quart_asgi: Callable[[Scope, Receive, Send], Awaitable[None]] = cast(Any, quart)
        #: Requests in flight, so a shutdown past its grace period can end them.
        self._requests: set[asyncio.Task[Any]] = set()

    def cancel_requests(self) -> int:
        """Cancel every request still running (shutdown, after the grace period)."""
        running = [task for task in self._requests if not task.done()]
        for task in running:
            task.cancel()
        return len(running)

    def closing(self) -> None:
        """Serving is about to stop (the server calls this as its drain begins): end what
        would never end by itself, the status pages' live streams."""
        parts: ui.UiParts = self.quart.config["GPUCTL_UI"]
        parts.watch.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._quart_asgi(scope, receive, send)
            return
        client = scope.get("client")
        host = client[0] if client else ""
        clients = self.gw.clients
        if not clients.enter(host):
            await reply_error(send, 429, f"too many requests in flight from {host} (server."
                              f"max_connections_per_client = {clients.limit})",
                              openai=scope["path"].startswith("/v1/"), retry_after=1)
            return
        task = asyncio.current_task()
        assert task is not None  # granian runs each request in an asyncio task
        self._requests.add(task)
        try:
            await self._http(scope, receive, send)
        finally:
            self._requests.discard(task)
            clients.leave(host)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        route = HOT_ROUTES.get(path)
        if route is not None:
            await handle(self.gw, route, scope, receive, send)
            return
        if path == "/":
            method = scope["method"]
            if method in ("GET", "HEAD"):
                await reply(send, 200, b"Ollama is running", TEXT_CT, head=method == "HEAD")
            else:
                await reply(send, 405, b"405 method not allowed", TEXT_CT)
            return
        if path not in PUBLIC and not _is_ui(path) and _has_body(scope["headers"]):
            # Quart reads a body while the route runs: check the key from the head first, so
            # a request without a good key costs no body memory (the hot path does the same).
            try:
                query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
                self.gw.auth.check_raw(scope["headers"], admin=_needs_admin(path, query))
            except AuthError as exc:
                await reply_error(send, exc.http_status, exc.message,
                                  openai=path.startswith("/v1/"))
                return
        await self._quart_asgi(scope, receive, send)


def create_app(config: Config, engine: EngineFace, keys: KeyStore, *,
               node_token: str | None = None, manage_engine: bool = True) -> GatewayApp:
    """Build the gateway. With ``manage_engine``, serving starts and stops the engine."""
    gw = Gateway(config, engine, keys, node_token=node_token, manage_engine=manage_engine)
    quart = Quart("gpuctl.gateway")
    quart.config.update(
        GPUCTL_GATEWAY=gw,
        MAX_CONTENT_LENGTH=gw.max_body,
        BODY_TIMEOUT=config.server.body_timeout_seconds,
        RESPONSE_TIMEOUT=None,
        PROVIDE_AUTOMATIC_OPTIONS=False,
    )
    quart.register_blueprint(routes.blueprint)
    quart.register_blueprint(admin.blueprint)
    ui.install(quart, gw)
    _install_lifecycle(quart, gw)
    _install_auth(quart, gw)
    _install_errors(quart, gw)
    return GatewayApp(gw, quart)


def _install_lifecycle(quart: Quart, gw: Gateway) -> None:
    flusher: list[asyncio.Task[None]] = []

    async def flush_keys() -> None:
        while True:
            await asyncio.sleep(KEY_FLUSH_SECONDS)
            gw.keys.flush()

    @quart.before_serving
    async def start() -> None:
        if gw.manage_engine:
            try:
                await gw.engine.start()
            except GpuctlError as exc:
                # Not raised through the server (it would log a traceback): kept
                # for `serve`, which reports it (a rejected token still exits 4, with a hint).
                gw.startup_error = exc
                return
        flusher.append(asyncio.ensure_future(flush_keys()))
        gw.stalls.start()

    @quart.after_serving
    async def stop() -> None:
        await gw.stalls.stop()
        for task in flusher:
            await cancel_and_wait(task)
        gw.keys.flush()
        if gw.manage_engine and gw.startup_error is None:
            await gw.engine.stop()
        await gw.aclose()


def _install_auth(quart: Quart, gw: Gateway) -> None:
    @quart.before_request
    async def authenticate() -> None:
        g.started = time.perf_counter()
        path = request.path
        if path in PUBLIC or request.url_rule is None:
            return  # unknown paths get Ollama's 404, with or without a key
        if _is_ui(path):
            return  # the status page signs in once and checks its cookie (gateway/ui.py)
        gw.auth.check(request.headers.get("Authorization"),
                      admin=_needs_admin(path, request.args))

    @quart.after_request
    async def observe(response: Response) -> Response:
        started = getattr(g, "started", None)
        if started is not None:
            rule = request.url_rule.rule if request.url_rule is not None else "other"
            gw.metrics.observe(rule, response.status_code, time.perf_counter() - started)
        return response


def _error_response(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    openai = request.path.startswith("/v1/")
    return Response(error_body(message, status, openai=openai), status=status,
                    content_type="application/json; charset=utf-8", headers=headers or {})


def _install_errors(quart: Quart, gw: Gateway) -> None:
    @quart.errorhandler(GpuctlError)
    async def gpuctl_error(exc: GpuctlError) -> Response:
        headers: dict[str, str] = {}
        wait = retry_after(exc)
        if wait is not None:
            headers["Retry-After"] = str(max(1, math.ceil(wait)))
        if isinstance(exc, AuthError) and exc.http_status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="gpuctl"'
        return _error_response(exc.message, exc.http_status, headers)

    @quart.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        if code == 404:
            return Response("404 page not found", status=404,
                            content_type="text/plain; charset=utf-8")
        if code == 405:
            return Response("405 method not allowed", status=405,
                            content_type="text/plain; charset=utf-8")
        if code == 413:
            return _error_response(f"request body larger than "
                                   f"{gw.config.server.max_body_mb:g} MB (server.max_body_mb)",
                                   413)
        return _error_response(exc.description or exc.name, code)
