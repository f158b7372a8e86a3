"""A fast simulated Ollama node: a raw ASGI app that speaks Ollama's HTTP API.

It exists so the gateway can be tested and benchmarked against real sockets without a GPU.
It answers the endpoints gpuctl proxies with the shapes of ``facts/ollama-api.md`` (NDJSON
and SSE streams, Ollama's error bodies, ``404 page not found`` for an unknown path), and it
lets a test steer it: switch it down, make it die in the middle of a stream, hold a stream
open until released, or demand a node token. It counts requests and keeps the last request
body and headers so tests can check what the gateway forwarded.

It is a raw ASGI app (no framework) so that, in benchmarks, the node costs as little CPU as
possible and the figures measure the gateway.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter
from collections.abc import MutableMapping
from typing import Any

from gpuctl.sim.asgi import Receive, Scope, Send, answer_lifespan

__all__ = ["NodeDied", "SimOllama"]

Message = MutableMapping[str, Any]

JSON_CT = b"application/json; charset=utf-8"
NDJSON_CT = b"application/x-ndjson"
SSE_CT = b"text/event-stream"
TEXT_CT = b"text/plain; charset=utf-8"

NATIVE_STREAMS = ("/api/chat", "/api/generate")
OPENAI_STREAMS = ("/v1/chat/completions", "/v1/completions")


class NodeDied(Exception):
    """Raised inside the app to drop the connection mid-stream, like a crashed node."""


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _normalise(model: str) -> str:
    return model if ":" in model else f"{model}:latest"


def _tag_entry(name: str) -> dict[str, Any]:
    digest = hashlib.sha256(name.encode()).hexdigest()
    return {
        "name": name,
        "model": name,
        "modified_at": "2026-01-01T00:00:00Z",
        "size": 2_019_393_189,
        "digest": digest,
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "3.2B",
            "quantization_level": "Q4_K_M",
        },
    }


class SimOllama:
    """One simulated Ollama server. Mount it with ``gpuctl.sim.servers.running``.

    ``chunks`` and ``interval`` shape every stream (``chunks`` content pieces, ``interval``
    seconds apart, then the final ``done`` line); a non-streamed answer comes after
    ``delay``. ``text`` replaces the default answer (``tok0 tok1 …``) with words of its own,
    one chunk per word, ``{model}`` standing for the model asked for (``serve --demo``
    streams readable text this way). Steering attributes, all safe to flip between
    requests: ``up`` (False: every route but ``/`` answers 503), ``die_after`` (drop the
    connection after that many chunks), ``hold_after`` with ``release()`` (park streams
    after that many chunks until released; call it in the server's loop), ``linger``
    (seconds between a stream's ``done`` line and the end of its body), ``token``
    (demand ``Authorization: Bearer <token>``), ``load_seconds`` (the ``load_duration``
    reported when the model was not loaded yet).
    """

    def __init__(
        self,
        models: tuple[str, ...] | list[str] = ("llama3.2:latest",),
        *,
        chunks: int = 4,
        interval: float = 0.0,
        version: str = "0.12.6",
        token: str | None = None,
        embed_dim: int = 8,
        delay: float = 0.0,
        text: str | None = None,
        load_seconds: float = 0.0,
    ) -> None:
        names = [_normalise(m) for m in models]
        self.models: dict[str, dict[str, Any]] = {m: _tag_entry(m) for m in names}
        self.loaded: set[str] = set()
        self.text = text
        self.chunks = len(text.split()) if text is not None else chunks
        self.interval = interval
        self.delay = delay
        self.version = version
        self.token = token
        self.embed_dim = embed_dim
        #: The ``load_duration`` a request reports when its model was not in memory yet
        #: (reported, never slept: the engine learns load times from it).
        self.load_seconds = load_seconds
        #: Raw bytes sent as a native stream's last line instead of the usual one: a broken
        #: or hostile node, byte for byte.
        self.final_line: bytes | None = None
        self.up = True
        self.die_after: int | None = None
        self.hold_after: int | None = None
        #: Seconds between a stream's last line and the end of its body.
        self.linger = 0.0
        self._release = asyncio.Event()
        self.blobs: set[str] = set()
        self.requests: Counter[str] = Counter()
        self.last_path: str | None = None
        self.last_body: bytes = b""
        self.last_headers: dict[str, str] = {}
        self.active_streams = 0
        #: The most streams ever in flight at once (replica tests check slots with it).
        self.peak_streams = 0
        self.held_streams = 0
        self.cancelled_streams = 0
        self.completed_streams = 0
        self._seq = 0

    # -- steering ---------------------------------------------------------------------

    def release(self) -> None:
        """Let held streams continue (and stop holding new ones)."""
        self.hold_after = None
        self._release.set()

    @property
    def last_json(self) -> Any:
        return json.loads(self.last_body) if self.last_body else None

    # -- ASGI -------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method: str = scope["method"]
        path: str = scope["path"]
        body = bytearray()
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.requests[path] += 1
        self.last_path = path
        self.last_body = bytes(body)
        self.last_headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}

        if path == "/" and method in ("GET", "HEAD"):
            await _respond(send, 200, b"Ollama is running", TEXT_CT, head=method == "HEAD")
            return
        wanted = f"Bearer {self.token}"
        if self.token is not None and self.last_headers.get("authorization") != wanted:
            await _respond(send, 401, b"unauthorized\n", TEXT_CT)
            return
        if not self.up:
            await _respond(send, 503, _dumps({"error": "node down"}), JSON_CT)
            return
        # Like Ollama, stop working when the client goes away: watch for the disconnect.
        task = asyncio.current_task()
        watcher = asyncio.ensure_future(self._watch(receive, task))
        try:
            await self._route(method, path, bytes(body), send)
        except asyncio.CancelledError:
            if not watcher.done() or watcher.cancelled() or not watcher.result():
                raise
        finally:
            watcher.cancel()

    @staticmethod
    async def _watch(receive: Receive, task: asyncio.Task[Any] | None) -> bool:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if task is not None:
                    task.cancel()
                return True

    async def _route(self, method: str, path: str, body: bytes, send: Send) -> None:
        if path == "/api/version" and method in ("GET", "HEAD"):
            await _json(send, 200, {"version": self.version})
        elif path == "/api/tags" and method in ("GET", "HEAD"):
            await _json(send, 200, {"models": list(self.models.values())})
        elif path == "/api/ps" and method == "GET":
            await _json(send, 200, {"models": [self._ps_entry(m) for m in sorted(self.loaded)]})
        elif path == "/v1/models" and method == "GET":
            data = [
                {"id": m, "object": "model", "created": 1_767_225_600, "owned_by": "library"}
                for m in self.models
            ]
            await _json(send, 200, {"object": "list", "data": data or None})
        elif path.startswith("/api/blobs/"):
            await self._blobs(method, path.removeprefix("/api/blobs/"), body, send)
        elif method == "POST" and path in _POST_ROUTES:
            await self._post(path, body, send)
        elif method == "DELETE" and path == "/api/delete":
            req = _parse(body)
            name = _normalise(str((req or {}).get("model") or (req or {}).get("name") or ""))
            if req is None or name not in self.models:
                await _json(send, 404, {"error": f"model '{name}' not found"})
            else:
                del self.models[name]
                self.loaded.discard(name)
                await _respond(send, 200, b"", JSON_CT)
        elif path in _ALL_PATHS:
            await _respond(send, 405, b"405 method not allowed", TEXT_CT)
        else:
            await _respond(send, 404, b"404 page not found", TEXT_CT)

    async def _post(self, path: str, body: bytes, send: Send) -> None:
        openai = path.startswith("/v1/")
        req = _parse(body)
        if req is None:
            await _error(send, 400, "missing request body" if not body else "invalid JSON", openai)
            return
        if path == "/api/copy":
            src = _normalise(str(req.get("source", "")))
            dst = _normalise(str(req.get("destination", "")))
            if src not in self.models:
                await _json(send, 404, {"error": f"model '{src}' not found"})
                return
            self.models[dst] = _tag_entry(dst)
            await _respond(send, 200, b"", JSON_CT)
            return
        raw_model = req.get("model") or req.get("name")
        if not isinstance(raw_model, str) or not raw_model:
            await _error(send, 400, "model is required", openai)
            return
        model = _normalise(raw_model)
        if path in ("/api/pull", "/api/push", "/api/create"):
            await self._pull(model, req, send)
            return
        if model not in self.models:
            await _error(send, 404, f'model "{raw_model}" not found, try pulling it first', openai)
            return
        cold = model not in self.loaded
        self.loaded.add(model)
        if path == "/api/show":
            await _json(send, 200, self._show(model))
        elif path == "/api/embed":
            inputs = req.get("input", "")
            count = len(inputs) if isinstance(inputs, list) else 1
            await _json(send, 200, {
                "model": raw_model,
                "embeddings": [self._vector(i) for i in range(count)],
                "total_duration": 1000, "load_duration": 10, "prompt_eval_count": count,
            })
        elif path == "/api/embeddings":
            await _json(send, 200, {"embedding": self._vector(0)})
        elif path == "/v1/embeddings":
            inputs = req.get("input", "")
            count = len(inputs) if isinstance(inputs, list) else 1
            await _json(send, 200, {
                "object": "list",
                "data": [{"object": "embedding", "embedding": self._vector(i), "index": i}
                         for i in range(count)],
                "model": raw_model,
                "usage": {"prompt_tokens": count, "total_tokens": count},
            })
        else:
            await self._generate(path, raw_model, req, send, cold=cold)

    # -- inference --------------------------------------------------------------------

    async def _generate(self, path: str, model: str, req: dict[str, Any], send: Send, *,
                        cold: bool = False) -> None:
        openai = path.startswith("/v1/")
        stream = bool(req.get("stream", not openai))
        self._seq += 1
        if not stream:
            await self._sleep(self.delay)
            await _json(send, 200, self._whole(path, model, req, cold))
            return
        content_type = SSE_CT if openai else NDJSON_CT
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type)]})
        self.active_streams += 1
        self.peak_streams = max(self.peak_streams, self.active_streams)
        try:
            for i in range(self.chunks):
                if self.die_after is not None and i >= self.die_after:
                    raise NodeDied("simulated node died mid-stream")
                if self.hold_after is not None and i >= self.hold_after:
                    self.held_streams += 1
                    try:
                        await self._release.wait()
                    finally:
                        self.held_streams -= 1
                if i:
                    await self._sleep(self.interval)
                await send({"type": "http.response.body",
                            "body": self._chunk(path, model, req, i), "more_body": True})
            final = self._final(path, model, req, cold)
            if self.linger:  # the last line out, the end of the body later
                await send({"type": "http.response.body", "body": final, "more_body": True})
                await self._sleep(self.linger)
                final = b""
            await send({"type": "http.response.body", "body": final, "more_body": False})
            self.completed_streams += 1
        except (asyncio.CancelledError, OSError):
            self.cancelled_streams += 1
            raise
        finally:
            self.active_streams -= 1

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)

    def _chunk(self, path: str, model: str, req: dict[str, Any], i: int) -> bytes:
        token = f"tok{i} " if self.text is None else self._words(model)[i]
        if path == "/api/chat":
            message = {"role": "assistant", "content": token}
            return _dumps({"model": model, "created_at": _now(), "message": message,
                           "done": False}) + b"\n"
        if path == "/api/generate":
            return _dumps({"model": model, "created_at": _now(), "response": token,
                           "done": False}) + b"\n"
        if path == "/v1/responses":
            return _sse({"type": "response.output_text.delta", "item_id": "msg_1",
                         "output_index": 0, "content_index": 0, "delta": token,
                         "sequence_number": i + 1}, event="response.output_text.delta")
        if path == "/v1/completions":
            return _sse({"id": f"cmpl-{self._seq}", "object": "text_completion",
                         "created": int(time.time()), "model": model,
                         "system_fingerprint": "fp_ollama",
                         "choices": [{"text": token, "index": 0, "finish_reason": None}]})
        delta: dict[str, Any] = {"content": token}
        if i == 0:
            delta = {"role": "assistant", "content": token}
        return _sse({"id": f"chatcmpl-{self._seq}", "object": "chat.completion.chunk",
                     "created": int(time.time()), "model": model,
                     "system_fingerprint": "fp_ollama",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})

    def _final(self, path: str, model: str, req: dict[str, Any], cold: bool) -> bytes:
        if path in NATIVE_STREAMS:
            if self.final_line is not None:
                return self.final_line
            line: dict[str, Any] = {"model": model, "created_at": _now(), "done": True,
                                    "done_reason": "stop", **self._durations(cold)}
            if path == "/api/chat":
                line["message"] = {"role": "assistant", "content": ""}
            else:
                line["response"] = ""
            return _dumps(line) + b"\n"
        if path == "/v1/responses":
            return _sse({"type": "response.completed", "sequence_number": self.chunks + 1,
                         "response": self._response_object(model)}, event="response.completed")
        obj = "text_completion" if path == "/v1/completions" else "chat.completion.chunk"
        prefix = "cmpl" if path == "/v1/completions" else "chatcmpl"
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
        if path == "/v1/completions":
            choice["text"] = ""
        else:
            choice["delta"] = {}
        out = _sse({"id": f"{prefix}-{self._seq}", "object": obj, "created": int(time.time()),
                    "model": model, "system_fingerprint": "fp_ollama", "choices": [choice]})
        if (req.get("stream_options") or {}).get("include_usage"):
            out += _sse({"id": f"{prefix}-{self._seq}", "object": obj,
                         "created": int(time.time()), "model": model,
                         "system_fingerprint": "fp_ollama", "choices": [],
                         "usage": self._usage()})
        return out + b"data: [DONE]\n\n"

    def _whole(self, path: str, model: str, req: dict[str, Any], cold: bool) -> dict[str, Any]:
        text = self._answer(model)
        if path == "/api/chat":
            return {"model": model, "created_at": _now(),
                    "message": {"role": "assistant", "content": text}, "done": True,
                    "done_reason": "stop", **self._durations(cold)}
        if path == "/api/generate":
            return {"model": model, "created_at": _now(), "response": text, "done": True,
                    "done_reason": "stop", **self._durations(cold)}
        if path == "/v1/responses":
            return self._response_object(model)
        if path == "/v1/completions":
            return {"id": f"cmpl-{self._seq}", "object": "text_completion",
                    "created": int(time.time()), "model": model, "system_fingerprint": "fp_ollama",
                    "choices": [{"text": text, "index": 0, "finish_reason": "stop"}],
                    "usage": self._usage()}
        return {"id": f"chatcmpl-{self._seq}", "object": "chat.completion",
                "created": int(time.time()), "model": model, "system_fingerprint": "fp_ollama",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}],
                "usage": self._usage()}

    def _response_object(self, model: str) -> dict[str, Any]:
        text = self._answer(model)
        usage = self._usage()
        return {
            "id": f"resp_{self._seq}", "object": "response", "created_at": int(time.time()),
            "status": "completed", "model": model,
            "output": [{"type": "message", "id": "msg_1", "status": "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "usage": {"input_tokens": usage["prompt_tokens"],
                      "output_tokens": usage["completion_tokens"],
                      "total_tokens": usage["total_tokens"]},
        }

    def _words(self, model: str) -> list[str]:
        if self.text is None:
            return [f"tok{i} " for i in range(self.chunks)]
        return [f"{word} " for word in self.text.replace("{model}", model).split()]

    def _answer(self, model: str) -> str:
        return "".join(self._words(model))

    def _durations(self, cold: bool) -> dict[str, int]:
        load = int(self.load_seconds * 1e9) if cold and self.load_seconds else 1_000_000
        return {"total_duration": 5_000_000 + load, "load_duration": load,
                "prompt_eval_count": 7,
                "prompt_eval_duration": 1_000_000, "eval_count": self.chunks,
                "eval_duration": 3_000_000}

    def _usage(self) -> dict[str, int]:
        return {"prompt_tokens": 7, "completion_tokens": self.chunks,
                "total_tokens": 7 + self.chunks}

    def _vector(self, i: int) -> list[float]:
        return [round((i + 1) / (j + 1), 4) for j in range(self.embed_dim)]

    def _show(self, model: str) -> dict[str, Any]:
        entry = self.models[model]
        return {"license": "", "modelfile": f"FROM {model}\n", "parameters": "",
                "template": "{{ .Prompt }}", "details": entry["details"],
                "model_info": {"general.architecture": "llama"},
                "capabilities": ["completion"], "modified_at": entry["modified_at"]}

    def _ps_entry(self, model: str) -> dict[str, Any]:
        entry = self.models.get(model) or _tag_entry(model)
        return {"name": model, "model": model, "size": entry["size"], "size_vram": entry["size"],
                "digest": entry["digest"], "details": entry["details"],
                "expires_at": "2099-01-01T00:00:00Z", "context_length": 4096}

    # -- management -------------------------------------------------------------------

    async def _pull(self, model: str, req: dict[str, Any], send: Send) -> None:
        digest = "sha256:" + hashlib.sha256(model.encode()).hexdigest()
        steps: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        steps += [{"status": f"pulling {digest[7:19]}", "digest": digest, "total": 300,
                   "completed": 100 * k} for k in range(1, 4)]
        steps += [{"status": "verifying sha256 digest"}, {"status": "writing manifest"},
                  {"status": "success"}]
        self.models[model] = _tag_entry(model)
        if not req.get("stream", True):
            await _json(send, 200, steps[-1])
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", NDJSON_CT)]})
        for i, step in enumerate(steps):
            await send({"type": "http.response.body", "body": _dumps(step) + b"\n",
                        "more_body": i < len(steps) - 1})

    async def _blobs(self, method: str, digest: str, body: bytes, send: Send) -> None:
        if method == "HEAD":
            await _respond(send, 200 if digest in self.blobs else 404, b"", JSON_CT, head=True)
        elif method == "POST":
            if "sha256:" + hashlib.sha256(body).hexdigest() != digest:
                await _json(send, 400, {"error": "digest mismatch"})
                return
            existed = digest in self.blobs
            self.blobs.add(digest)
            await _respond(send, 200 if existed else 201, b"", JSON_CT)
        else:
            await _respond(send, 405, b"405 method not allowed", TEXT_CT)


_POST_ROUTES = frozenset({
    "/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show", "/api/pull",
    "/api/push", "/api/create", "/api/copy", "/v1/chat/completions", "/v1/completions",
    "/v1/embeddings", "/v1/responses",
})
_ALL_PATHS = _POST_ROUTES | {"/", "/api/version", "/api/tags", "/api/ps", "/api/delete",
                             "/v1/models"}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())


def _sse(obj: dict[str, Any], *, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + _dumps(obj) + b"\n\n"


def _parse(body: bytes) -> dict[str, Any] | None:
    if not body:
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def _respond(send: Send, status: int, body: bytes, content_type: bytes, *,
                   head: bool = False) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _json(send: Send, status: int, obj: Any) -> None:
    await _respond(send, status, _dumps(obj), JSON_CT)


async def _error(send: Send, status: int, message: str, openai: bool) -> None:
    if openai:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        await _json(send, status, {"error": {"message": message, "type": kind, "param": None,
                                             "code": None}})
    else:
        await _json(send, status, {"error": message})
