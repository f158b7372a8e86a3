"""The status page at ``/ui/``, its live stream, and ``/gpu/overview`` for ``gpuctl top``.

Thin, like every face: the fleet comes from ``engine.overview()`` (through ``FleetWatch``),
usage from ``engine.usage_totals()``, actions are the engine's ``wake``/``pause``; this module only
decides who sees what. Everyone signed in sees every GPU (state, wake stage and estimate,
models, slots, who is served, leases with holder and time left) and the queue per model; a
user sees their own usage and their own place in the queues, an admin sees everyone's, the
timeline of state changes, and gets resume/pause buttons.

The page signs in with a key once (``sessions.py``: an opaque ``HttpOnly``,
``SameSite=Strict`` cookie, ``Secure`` over TLS), so these routes authenticate by cookie,
not by ``Authorization`` (the app's bearer check skips ``/ui``). Admin actions also need
the session's CSRF token in ``X-CSRF-Token``. Static files ship inside the package
(``gateway/static``): no CDN, no build step, a strict Content-Security-Policy.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from quart import Blueprint, Quart, Response, current_app, redirect, request

from gpuctl.gateway.auth import AuthError
from gpuctl.gateway.context import Gateway
from gpuctl.gateway.fleetwatch import FleetWatch, StreamLimit
from gpuctl.gateway.routes import gateway, json_response
from gpuctl.gateway.sessions import COOKIE, Session, Sessions
from gpuctl.gateway.usage_panel import UsagePanels
from gpuctl.store.keys import ApiKey

__all__ = ["KEEPALIVE_SECONDS", "MAX_SIGN_IN_BYTES", "STREAM_SECONDS", "UiParts", "blueprint",
           "install", "page_state", "ui_parts"]

blueprint = Blueprint("ui", __name__)

#: A sign-in body is a key in a small JSON object; anything larger is refused unread.
MAX_SIGN_IN_BYTES = 4096
#: A comment line this often keeps proxies from closing a quiet stream.
KEEPALIVE_SECONDS = 15.0
#: What the browser waits before reconnecting a dropped stream (the SSE ``retry`` field).
RECONNECT_MS = 1000
#: A stream ends after this long and the browser reconnects (a second, unnoticed): a
#: stopping gateway then waits at most this long for open pages, under its 30 s grace,
#: and a client that never reads cannot hold a stream slot for good.
STREAM_SECONDS = 20.0

_STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


class UiParts:
    """The page's server side state: sessions and the fleet watcher, one per gateway."""

    def __init__(self, gw: Gateway) -> None:
        self.sessions = Sessions(gw.keys)
        self.watch = FleetWatch(gw.engine)
        self.usage = UsagePanels(gw.engine)


def ui_parts() -> UiParts:
    """This gateway's sessions and watcher (``install`` made them)."""
    parts: UiParts = current_app.config["GPUCTL_UI"]
    return parts


def install(quart: Quart, gw: Gateway) -> UiParts:
    """Add the page to the gateway's Quart app; the watcher stops when serving stops."""
    parts = UiParts(gw)
    quart.config["GPUCTL_UI"] = parts
    quart.register_blueprint(blueprint)

    @quart.after_serving
    async def stop() -> None:
        parts.watch.drop_streams()
        await parts.watch.stop()

    return parts


@blueprint.after_request
async def _harden(response: Response) -> Response:
    if request.path.startswith("/ui"):
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
    return response


# -- the page and its files ------------------------------------------------------------------


def _static(name: str) -> Response:
    data = (resources.files("gpuctl.gateway") / "static" / name).read_bytes()
    return Response(data, content_type=_STATIC[name])


@blueprint.route("/ui", methods=["GET"])
async def page_redirect() -> Response:
    return redirect("/ui/", 308)  # type: ignore[return-value]


@blueprint.route("/ui/", methods=["GET"])
async def page() -> Response:
    return _static("index.html")


@blueprint.route("/ui/static/<name>", methods=["GET"])
async def static_file(name: str) -> Response:
    if name not in _STATIC or name == "index.html":
        return Response("404 page not found", status=404, content_type="text/plain")
    return _static(name)


# -- sessions ---------------------------------------------------------------------------------


def _who(key: ApiKey, session: Session) -> dict[str, Any]:
    return {"signed_in": True, "name": key.name, "admin": key.is_admin, "csrf": session.csrf}


def _signed_in() -> tuple[ApiKey, Session]:
    found = ui_parts().sessions.lookup(request.cookies.get(COOKIE))
    if found is None:
        raise AuthError("not signed in", 401)
    return found


@blueprint.route("/ui/session", methods=["POST"])
async def sign_in() -> Response:
    length = request.content_length
    if length is None or length > MAX_SIGN_IN_BYTES:
        return json_response({"error": "send {\"key\": \"sk-...\"} as JSON"}, 400)
    raw = await request.get_data(as_text=True)
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    secret = body.get("key") if isinstance(body, dict) else None
    if not isinstance(secret, str) or not secret.strip():
        return json_response({"error": "send {\"key\": \"sk-...\"} as JSON"}, 400)
    started = ui_parts().sessions.sign_in(secret.strip())
    if started is None:
        return json_response({"error": "invalid or revoked API key"}, 401)
    token, key, session = started
    response = json_response(_who(key, session))
    response.set_cookie(COOKIE, token, path="/ui", httponly=True, samesite="Strict",
                        secure=request.scheme == "https")
    return response


@blueprint.route("/ui/session", methods=["GET"])
async def session_info() -> Response:
    """Who is signed in; not signed in is a 200 too (the page asks on every load, and a
    401 there would be an error in the browser's console on every first visit)."""
    found = ui_parts().sessions.lookup(request.cookies.get(COOKIE))
    if found is None:
        return json_response({"signed_in": False})
    return json_response(_who(*found))


@blueprint.route("/ui/session", methods=["DELETE"])
async def sign_out() -> Response:
    _, session = _signed_in()
    _require_csrf(session)
    ui_parts().sessions.sign_out(request.cookies.get(COOKIE))
    response = json_response({"signed_out": True})
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="Strict",
                           secure=request.scheme == "https")
    return response


def _require_csrf(session: Session) -> None:
    if not Sessions.csrf_ok(session, request.headers.get("X-CSRF-Token")):
        raise AuthError("missing or wrong X-CSRF-Token: reload the page", 403)


# -- what each caller sees ---------------------------------------------------------------------


def page_state(watch: FleetWatch, key: ApiKey) -> dict[str, Any]:
    """The page's data for ``key``: the fleet, and only the usage and names it may see."""
    if watch.snapshot is None:
        watch.look()
    assert watch.snapshot is not None
    fleet = watch.snapshot.model_dump(mode="json")
    admin = key.is_admin
    if not admin:
        for line in fleet["queue"]:
            line["users"] = [u for u in line["users"] if u == key.name]
    usage = []
    for user, totals in sorted(watch.usage.items()):
        if admin or user == key.name:
            usage.append({"user": user, "requests": totals.requests,
                          "tokens_in": totals.tokens_in, "tokens_out": totals.tokens_out,
                          "gpu_hours": round(totals.gpu_seconds / 3600, 4),
                          "last_at": totals.last_at})
    state: dict[str, Any] = {"me": {"name": key.name, "admin": admin}, "version": watch.version,
                             "fleet": fleet, "usage": usage}
    if admin:
        state["timeline"] = [e.model_dump(mode="json") for e in reversed(watch.timeline)]
    return state


@blueprint.route("/ui/state", methods=["GET"])
async def state() -> Response:
    key, _ = _signed_in()
    watch = ui_parts().watch
    watch.ensure_running()
    return json_response(page_state(watch, key))


@blueprint.route("/ui/usage", methods=["GET"])
async def usage() -> Response:
    """Today, this month, your requests (and the admin chart), from the ledger."""
    key, _ = _signed_in()
    return json_response(await ui_parts().usage.for_key(key))


@blueprint.route("/gpu/overview", methods=["GET"])
async def overview() -> Response:
    """The page's data for a bearer key (``gpuctl top``); the app checked the key."""
    gw = gateway()
    key = gw.auth.check(request.headers.get("Authorization"))
    watch = ui_parts().watch
    watch.ensure_running()
    return json_response(page_state(watch, key))


@blueprint.route("/ui/events", methods=["GET"])
async def events() -> Response:
    """The live page: one ``state`` event now and one after each change, until the browser
    leaves, the session ends or the stream is dropped (the browser then reconnects)."""
    _signed_in()
    parts = ui_parts()
    watch = parts.watch
    watch.ensure_running()
    try:
        generation = watch.open_stream()
    except StreamLimit as exc:
        response = json_response({"error": str(exc)}, 503)
        response.headers["Retry-After"] = "5"
        return response
    token = request.cookies.get(COOKIE)

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield f"retry: {RECONNECT_MS}\n\n".encode()
            sent = -1
            loop = asyncio.get_running_loop()
            ends = loop.time() + STREAM_SECONDS
            while watch.generation == generation and loop.time() < ends:
                found = parts.sessions.lookup(token)
                if found is None:
                    yield b"event: signed-out\ndata: {}\n\n"
                    return
                if watch.version != sent:
                    sent = watch.version
                    data = json.dumps(page_state(watch, found[0]), separators=(",", ":"))
                    yield f"event: state\nid: {sent}\ndata: {data}\n\n".encode()
                else:
                    yield b": keepalive\n\n"
                await watch.changed_since(sent, min(KEEPALIVE_SECONDS,
                                                    max(0.0, ends - loop.time())))
        finally:
            watch.close_stream()

    response = Response(stream(), content_type="text/event-stream")
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Accel-Buffering"] = "no"
    response.timeout = None
    return response


# -- admin actions ----------------------------------------------------------------------------


async def _act(ref: str, action: str) -> Response:
    key, session = _signed_in()
    if not key.is_admin:
        raise AuthError("resuming and pausing GPUs needs an admin key", 403)
    _require_csrf(session)
    gw = gateway()
    if action == "resume":
        result = await gw.engine.wake(ref, wait=False)
    else:
        result = await gw.engine.pause(ref, wait=False)
    ui_parts().watch.look()  # the change shows at once, not at the next look
    return json_response({"success": result.success, "message": result.message,
                          "gpu": result.gpu.name, "state": result.gpu.state.value})


@blueprint.route("/ui/gpu/<ref>/resume", methods=["POST"])
async def resume(ref: str) -> Response:
    return await _act(ref, "resume")


@blueprint.route("/ui/gpu/<ref>/pause", methods=["POST"])
async def pause(ref: str) -> Response:
    return await _act(ref, "pause")
