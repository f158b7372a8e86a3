"""The hot path: inference requests relayed to a GPU as raw ASGI, beside the Quart app.

Every chat, generate, embed and ``/v1`` inference request passes here, so it is written for
CPU per request and per chunk (design.md "Performance notes"): no framework, one JSON parse
of the request body (for ``model`` and ``stream``), the body forwarded untouched, the
upstream bytes relayed as they arrive with no re-encoding, and only the tail of the answer
parsed for token counts. Pieces that reached the gateway together go out in one ``send``;
``send`` waits while the client is slow to read, and reading from the node pauses meanwhile
(``upstream``), so a slow reader costs bounded memory.

The flow: authenticate (O(1) cache) → read the body (413 past ``server.max_body_mb``) →
``engine.acquire`` (holds while a GPU wakes or a slot frees; a streaming request hears
wait notices meanwhile, in the form ``server.wait_notice`` picks: see ``notices.py``) →
relay → ``engine.release``. A client that disconnects cancels
the request wherever it is: out of the queue, or the upstream connection closed (Ollama
stops generating) and the slot freed at once. A node that dies mid-stream ends the stream
with an error line (NDJSON) or without ``[DONE]`` (SSE, as Ollama does) and the GPU is
marked for a re-probe. A node whose proxy refuses the gateway's node token (401/403) is a
502 naming the GPU, never a relayed 401 that would blame the client's own key.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from dataclasses import dataclass
from typing import Any

from gpuctl.engine.api import Progress, RequestRow, Ticket, Usage
from gpuctl.errors import GpuctlError, retry_after
from gpuctl.gateway.auth import AuthError
from gpuctl.gateway.context import Gateway
from gpuctl.gateway.jsonbody import BadJson, load_object
from gpuctl.gateway.notices import Notifier, notifier, strip_history
from gpuctl.gateway.replies import (
    TEXT_CT,
    Receive,
    Scope,
    Send,
    error_body,
    reply,
    reply_error,
)
from gpuctl.gateway.upstream import UpstreamError, UpstreamResponse

__all__ = ["HOT_ROUTES", "Route", "handle"]


@dataclass(frozen=True)
class Route:
    openai: bool
    stream_default: bool


HOT_ROUTES: dict[str, Route] = {
    "/api/chat": Route(openai=False, stream_default=True),
    "/api/generate": Route(openai=False, stream_default=True),
    "/api/embed": Route(openai=False, stream_default=False),
    "/api/embeddings": Route(openai=False, stream_default=False),
    "/v1/chat/completions": Route(openai=True, stream_default=False),
    "/v1/completions": Route(openai=True, stream_default=False),
    "/v1/embeddings": Route(openai=True, stream_default=False),
    "/v1/responses": Route(openai=True, stream_default=False),
}

#: Client headers never forwarded: hop-by-hop ones, the client's Host (Ollama checks it),
#: the framing the pool writes itself, and the caller's gateway key.
_SKIP = frozenset({
    b"host", b"content-length", b"connection", b"keep-alive", b"transfer-encoding", b"te",
    b"upgrade", b"expect", b"authorization", b"proxy-authorization", b"proxy-connection",
})
_KEEPALIVE_SECONDS = 15.0
#: Characters of a request's model name the ledger keeps (Ollama's names are far shorter).
MODEL_NAME_KEPT = 200
_USAGE_BODY_LIMIT = 256 * 1024
#: What a node's proxy answers when the gateway's node token is wrong (gpu-node/Caddyfile).
_REFUSED = frozenset({401, 403})


class _NodeRefused(Exception):
    """The node's proxy refused the gateway's node token.

    Relaying that 401 would tell the client its own key was wrong, when the key was fine
    and the gateway is misconfigured: it becomes a 502 naming the GPU and the fix instead.
    Not retried on another GPU: every node expects the same token.
    """

    def __init__(self, status: int) -> None:
        super().__init__(f"refused the gateway's node token (HTTP {status}); set "
                         "GPUCTL_NODE_TOKEN for the gateway to the token the node expects")


async def handle(gw: Gateway, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
    """Serve one inference request end to end; never raises to the server."""
    started = time.perf_counter()
    status = await _serve(gw, route, scope, receive, send)
    gw.metrics.observe(scope["path"], status, time.perf_counter() - started)


async def _serve(gw: Gateway, route: Route, scope: Scope, receive: Receive, send: Send) -> int:
    openai = route.openai
    if scope["method"] != "POST":
        await reply(send, 405, b"405 method not allowed", TEXT_CT)
        return 405
    try:
        key = gw.auth.check_raw(scope["headers"])
    except AuthError as exc:
        await reply_error(send, exc.http_status, exc.message, openai=openai)
        return exc.http_status
    # The ledger's row: one per authenticated request, whatever its outcome.
    request = gw.engine.begin_request(key.id, key.name, scope["path"])
    remaining = gw.engine.budget_remaining(key.id)
    if remaining is not None:
        send = _with_budget(send, remaining)
    status = 499
    try:
        status = await _serve_keyed(gw, route, scope, receive, send, request, time.perf_counter())
    finally:
        gw.engine.end_request(request, status)
    return status


async def _serve_keyed(gw: Gateway, route: Route, scope: Scope, receive: Receive, send: Send,
                       request: RequestRow, started: float) -> int:
    openai = route.openai
    try:
        body = await _read_body_within(gw, scope, receive)
    except TimeoutError:
        await reply_error(send, 408, f"request body not received within "
                          f"{gw.config.server.body_timeout_seconds:g} s "
                          "(server.body_timeout_seconds)", openai=openai)
        return 408
    if body is None:
        await reply_error(send, 413, f"request body larger than {gw.config.server.max_body_mb:g}"
                          " MB (server.max_body_mb)", openai=openai)
        return 413
    try:
        payload = load_object(body)
    except BadJson as exc:
        await reply_error(send, 400, str(exc), openai=openai)
        return 400
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        await reply_error(send, 400, "model is required", openai=openai)
        return 400
    stream_field = payload.get("stream")
    stream = route.stream_default if stream_field is None else bool(stream_field)
    body = strip_history(payload, body)  # our own wait notices, sent back by a chat UI
    request.model = model[:MODEL_NAME_KEPT]  # a client's string: kept bounded in the ledger
    call = _Call(gw, route, scope, receive, send, body, model, stream, request, started)
    try:
        return await call.run()
    finally:
        request.duration_s = time.perf_counter() - started


def _with_budget(send: Send, remaining: float) -> Send:
    """``send`` that adds ``X-Gpuctl-Budget-Remaining`` to the response's headers (budgeted
    keys only, so other requests pay nothing for it)."""
    header = (b"x-gpuctl-budget-remaining", f"{remaining:.0f}".encode())

    async def send_with_budget(message: Any) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), header]}
        await send(message)

    return send_with_budget


async def _read_body_within(gw: Gateway, scope: Scope, receive: Receive) -> bytes | None:
    """``_read_body``, bounded by ``server.body_timeout_seconds`` (``TimeoutError``).

    A timer that cancels this task rather than ``wait_for``: no extra task per request.
    """
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = asyncio.get_running_loop().call_later(gw.config.server.body_timeout_seconds,
                                                  expire)
    try:
        return await _read_body(gw, scope, receive)
    except asyncio.CancelledError:
        if expired:
            uncancel = getattr(task, "uncancel", None)  # Python 3.11+
            if uncancel is not None:
                uncancel()
            raise TimeoutError from None
        raise
    finally:
        timer.cancel()


async def _read_body(gw: Gateway, scope: Scope, receive: Receive) -> bytes | None:
    """The whole request body, or None when it is larger than allowed."""
    limit = gw.max_body
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                if int(value) > limit:
                    return None
            except ValueError:
                pass
            break
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        return body if len(body) <= limit else None
    parts = bytearray(body)
    while True:
        message = await receive()
        parts += message.get("body", b"")
        if len(parts) > limit:
            return None
        if not message.get("more_body"):
            return bytes(parts)


class _Call:
    """One proxied request: acquire, relay, release, with the client watched throughout."""

    def __init__(self, gw: Gateway, route: Route, scope: Scope, receive: Receive, send: Send,
                 body: bytes, model: str, stream: bool, request: RequestRow,
                 started: float) -> None:
        self.gw = gw
        self.route = route
        self.scope = scope
        self.receive = receive
        self.send = send
        self.body = body
        self.model = model
        self.stream = stream
        self.user = request.user
        self.request = request
        self.t0 = started
        self.notifier: Notifier | None = notifier(
            gw.config.server.wait_notice, scope["path"], model, stream=stream)
        self.started = False  # response headers sent
        self.client_gone = False
        self.finished = False
        self._notes: list[str] = []
        self._note_event: asyncio.Event | None = None
        self._pump: asyncio.Task[None] | None = None
        self._pump_stop = False
        #: ``loop.time()`` when the current relayed ``send`` began (0.0: not sending); the
        #: gateway's ``StallWatch`` cancels the stream when a send waits too long.
        self.sending_since = 0.0
        self._task: asyncio.Task[Any] | None = None
        self.stalled_out = False
        #: Token counts of an answer whose client left before its end (``_relay_body``).
        self.usage: Usage | None = None

    def stalled(self) -> None:
        """The client stopped reading past ``server.stall_timeout_seconds``: end it."""
        if not self.finished and self._task is not None:
            self.stalled_out = True
            self._task.cancel()

    # -- watching the client -----------------------------------------------------------

    async def _watch(self, task: asyncio.Task[Any]) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self._client_left(task)
                return

    def _client_left(self, task: asyncio.Task[Any]) -> None:
        if not self.finished:
            self.client_gone = True
            task.cancel()

    async def run(self) -> int:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        watcher = asyncio.ensure_future(self._watch(task))
        try:
            return await self._run()
        except asyncio.CancelledError:
            if self.client_gone or self.stalled_out:
                return 499
            raise
        finally:
            self.finished = True
            watcher.cancel()

    # -- the request -------------------------------------------------------------------

    async def _run(self) -> int:
        """Acquire a slot and relay; a node that fails before answering is not the end.

        Inference has no side effects, so while nothing has reached the client a request
        whose node fails (refused, reset, died before its first byte) is routed again: the
        failed GPU is released with ``failed=`` (the engine takes it out of rotation until a
        probe finds it well), and the next acquire picks, or wakes, another one, for as long
        as the engine says so (``Engine.route_again``).
        """
        gw = self.gw
        for attempt in itertools.count(1):
            try:
                ticket = await gw.engine.acquire(
                    self.model, self.user, progress=self._progress if self.notifier else None,
                    request=self.request)
            except GpuctlError as exc:
                await self._stop_pump()
                retry = retry_after(exc)
                return await self._fail(exc.http_status, exc.message, retry_after=retry)
            except BaseException:
                await self._stop_pump(cancel=True)
                raise
            await self._stop_pump()
            failed: str | None = None
            usage: Usage | None = None
            try:
                status, usage, failed = await self._relay(ticket)
                return status
            except _NodeRefused as exc:
                failed = f"{ticket.gpu_name}: {exc}"
                return await self._fail(502, f"GPU {ticket.gpu_name} {exc}")
            except UpstreamError as exc:
                failed = f"{ticket.gpu_name}: {exc}"
                if not gw.engine.route_again(attempt, answered=exc.sent):
                    return await self._fail(502, f"GPU {ticket.gpu_name} failed: {exc}")
            finally:
                gw.engine.release(ticket, usage or self.usage, failed=failed)
        raise AssertionError("unreachable: the engine ends the attempts")

    async def _relay(self, ticket: Ticket) -> tuple[int, Usage | None, str | None]:
        path = self.scope["path"]
        query = self.scope.get("query_string") or b""
        if query:
            path = f"{path}?{query.decode('latin-1')}"
        headers = [(k, v) for k, v in self.scope["headers"] if k not in _SKIP]
        headers += self.gw.node_headers
        response = await self.gw.pool.request(ticket.base_url, "POST", path, headers, self.body)
        if response.status in _REFUSED:
            await response.aclose()
            raise _NodeRefused(response.status)
        try:
            return await self._relay_body(ticket, response)
        finally:
            await response.aclose()

    async def _relay_body(self, ticket: Ticket,
                          response: UpstreamResponse) -> tuple[int, Usage | None, str | None]:
        send = self.send
        status = response.status
        if self.started:
            if status != 200:
                # The 200 went out while we waited; say it the SSE way the openai client reads.
                text = (await response.read()).decode("utf-8", "replace")
                await self._send_error_event(_error_message(text) or f"upstream status {status}")
                return status, None, None
            assert self.notifier is not None  # only notices start a response early
            await send({"type": "http.response.body",
                        "body": self.notifier.chunk(f"served by {ticket.gpu_name}"),
                        "more_body": True})
        else:
            headers = [*response.headers, *self._gpu_headers(ticket)]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            self.started = True
        self.request.ttfb_s = time.perf_counter() - self.t0
        keep = not self.stream and (response.header(b"content-length") or b"0").isdigit() and \
            int(response.header(b"content-length") or b"0") <= _USAGE_BODY_LIMIT
        pieces: list[bytes] = []
        prev = tail = b""
        stalls = self.gw.stalls
        clock = asyncio.get_running_loop().time
        stalls.streams.add(self)
        try:
            try:
                async for piece in response.chunks():
                    self.sending_since = clock()
                    await send({"type": "http.response.body", "body": piece,
                                "more_body": True})
                    self.sending_since = 0.0
                    if keep:
                        pieces.append(piece)
                    else:
                        prev, tail = tail, piece
            except asyncio.CancelledError:
                # The client left: maybe right after the final line, before the body's end
                # (a client that stops reading at "done"). The node did the work: count what
                # its final line says (nothing, if it never came).
                if status == 200:
                    self.usage = _usage(b"".join(pieces) if keep else prev + tail)
                raise
            except UpstreamError as exc:
                reason = f"{ticket.gpu_name}: {exc}"
                tail = pieces[-1] if keep and pieces else tail
                self.sending_since = clock()
                await self._end_broken(tail, f"GPU {ticket.gpu_name} failed mid-stream: {exc}")
                return status, None, reason
            self.sending_since = clock()
            await self._end()
        finally:
            self.sending_since = 0.0
            stalls.streams.discard(self)
        usage = None
        if status == 200:
            usage = _usage(b"".join(pieces) if keep else prev + tail)
        return status, usage, None

    def _gpu_headers(self, ticket: Ticket) -> list[tuple[bytes, bytes]]:
        return [
            (b"x-gpuctl-gpu", ticket.gpu_name.encode("latin-1", "replace")),
            (b"x-gpuctl-wait-seconds", f"{ticket.waited_seconds:.3f}".encode()),
            (b"x-gpuctl-reason", ticket.reason.encode("latin-1", "replace")),
            *self.gw.replica_headers,
        ]

    async def _end_broken(self, tail: bytes, message: str) -> None:
        """End a stream whose node died: an NDJSON error line, or SSE without ``[DONE]``."""
        if self.route.openai:
            line = f": error: {message}\n\n".encode()
        else:
            line = json.dumps({"error": message}).encode() + b"\n"
            if tail and not tail.endswith(b"\n"):
                line = b"\n" + line
        await self.send({"type": "http.response.body", "body": line, "more_body": True})
        await self._end()

    async def _fail(self, status: int, message: str, *, retry_after: float | None = None) -> int:
        if self.started:  # the 200 went out while waiting: the notifier ends it its way
            await self._send_error_event(message)
            return status
        self.finished = True
        await reply_error(self.send, status, message, openai=self.route.openai,
                          retry_after=retry_after)
        self.started = True
        return status

    async def _send_error_event(self, message: str) -> None:
        if self.notifier is not None:
            body = self.notifier.error(message)
        else:
            body = b"data: " + error_body(message, 500, openai=True) + b"\n\n"
        await self.send({"type": "http.response.body", "body": body, "more_body": True})
        await self._end()

    async def _end(self) -> None:
        """The last send: from here on, the server's ``http.disconnect`` is the normal close."""
        self.finished = True
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})

    # -- wait notices while held (notices.py renders them) --------------------------------

    def _progress(self, progress: Progress) -> None:
        self._notes.append(_describe_progress(progress))
        if self._note_event is None:
            self._note_event = asyncio.Event()
            self._pump = asyncio.ensure_future(self._run_pump(self._note_event))
        self._note_event.set()

    async def _run_pump(self, event: asyncio.Event) -> None:
        send = self.send
        notices = self.notifier
        assert notices is not None
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", notices.content_type), (b"cache-control", b"no-cache"),
        ]})
        self.started = True
        began = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(event.wait(), _KEEPALIVE_SECONDS)
            except asyncio.TimeoutError:
                self._notes.append(f"still waiting ({time.monotonic() - began:.0f} s so far)")
            event.clear()
            notes, self._notes = self._notes, []
            if notes:
                await send({"type": "http.response.body",
                            "body": b"".join(notices.chunk(note) for note in notes),
                            "more_body": True})
            if self._pump_stop:
                return

    async def _stop_pump(self, *, cancel: bool = False) -> None:
        pump = self._pump
        if pump is None:
            return
        self._pump_stop = True
        if cancel:
            pump.cancel()
        elif self._note_event is not None:
            self._note_event.set()
        try:
            await pump
        except asyncio.CancelledError:
            if not cancel:
                raise


def _describe_progress(p: Progress) -> str:
    if p.message:
        return p.message
    where = p.gpu_name or p.gpu_id or "a GPU"
    about = f", about {p.estimate_seconds:.0f} s" if p.estimate_seconds is not None else ""
    if p.stage == "queued":
        pos = f" (position {p.position})" if p.position is not None else ""
        return f"queued for a slot{pos}{about}"
    if p.stage == "resuming":
        return f"waking {where}{about}"
    if p.stage == "running":
        return f"{where} is up, waiting for Ollama{about}"
    if p.stage == "ollama_ready":
        return f"{where} ready"
    return f"loading the model on {where}{about}"


def _error_message(text: str) -> str | None:
    try:
        value = json.loads(text)
    except ValueError:
        return text.strip() or None
    error = value.get("error") if isinstance(value, dict) else None
    if isinstance(error, dict):
        return str(error.get("message"))
    return str(error) if error else None


#: At most 20 digits: a node that sends a 5,000-digit count cannot make ``int()`` raise
#: (Python refuses to convert more than 4,300 digits) after its answer was relayed.
_COUNTS = {
    name: re.compile(rb'"' + name.encode() + rb'"\s*:\s*(\d{1,20})')
    for name in ("prompt_eval_count", "eval_count", "load_duration", "prompt_tokens",
                 "completion_tokens", "input_tokens", "output_tokens")
}


#: More tokens than this in one answer is a node's nonsense: counted as none, so the
#: ledger's sums (SQLite integers, 2**63 at most) stay far from overflowing.
_MAX_TOKENS = 10**9


def _count(data: bytes, name: str) -> int | None:
    """The last ``"name": N`` in ``data``. A JSON string cannot hold it unescaped, so a
    prompt that mentions the field cannot fool this; no JSON parse of the answer needed."""
    found = _COUNTS[name].findall(data)
    return int(found[-1]) if found else None


def _tokens(data: bytes, name: str) -> int:
    """A token count from ``data``; 0 when absent or absurd (see ``_MAX_TOKENS``)."""
    count = _count(data, name)
    return count if count is not None and count <= _MAX_TOKENS else 0


def _usage(data: bytes) -> Usage | None:
    """Token counts from the end of an answer: Ollama's final line, or OpenAI's usage.

    Ollama's final line also says how long loading the model took (``load_duration``, ns),
    which is how the engine learns load times; the ``/v1`` answers do not carry it.
    """
    if b"eval_count" in data:
        load = _count(data, "load_duration")
        return Usage(tokens_in=_tokens(data, "prompt_eval_count"),
                     tokens_out=_tokens(data, "eval_count"),
                     load_seconds=load / 1e9 if load else None)
    if b'"usage"' not in data:
        return None
    if _count(data, "prompt_tokens") is not None:
        return Usage(tokens_in=_tokens(data, "prompt_tokens"),
                     tokens_out=_tokens(data, "completion_tokens"))
    return Usage(tokens_in=_tokens(data, "input_tokens"),
                 tokens_out=_tokens(data, "output_tokens"))
