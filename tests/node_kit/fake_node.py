"""A minimal Ollama node as a raw ASGI app, for the Caddy tests.

It answers the probes (``/``, ``/api/tags``, ``/api/ps``) and streams ``/api/chat`` one line
per release: the test calls ``release()`` and exactly one more line goes out, so a test can
prove that line k reached the client before line k+1 was even written. It keeps the headers
of every request so a test can check what the proxy forwarded.
"""

from __future__ import annotations

import asyncio
import json
import time

from gpuctl.asgi import Receive, Scope, Send

MODEL = "llama3.2:latest"
TAGS = {
    "models": [
        {
            "name": MODEL,
            "model": MODEL,
            "modified_at": "2026-11-27T10:00:00Z",
            "size": 2019393189,
            "digest": "a80c4f17acd5",
            "details": {"family": "llama", "parameter_size": "3.2B"},
        }
    ]
}
PS = {"models": [{"name": MODEL, "model": MODEL, "size": 3, "size_vram": 3}]}

#: How long the node waits for a release before giving up on a stream (a safety bound).
RELEASE_TIMEOUT = 10.0


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class FakeNode:
    """The ASGI app. Create it in any thread; its asyncio objects bind to the serving loop."""

    def __init__(self, chunks: int = 4) -> None:
        self.chunks = chunks
        self.requests: list[dict[str, str]] = []
        self.sent_at: list[float] = []
        self._released: asyncio.Semaphore | None = None

    @property
    def released(self) -> asyncio.Semaphore:
        if self._released is None:
            self._released = asyncio.Semaphore(0)
        return self._released

    async def reset(self) -> None:
        """Forget releases a failed test left behind (run in the server's loop)."""
        self._released = asyncio.Semaphore(0)

    async def release(self) -> None:
        """Let the current stream write one more line (run in the server's loop)."""
        self.released.release()

    def chunk(self, k: int, content_type: str) -> bytes:
        done = k == self.chunks - 1
        line = {
            "model": MODEL,
            "created_at": "2026-11-27T10:00:00Z",
            "message": {"role": "assistant", "content": "" if done else f"tok{k} "},
            "done": done,
        }
        if content_type == "text/event-stream":
            return b"data: " + _dumps(line) + b"\n\n"
        return _dumps(line) + b"\n"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = (await receive())["type"]
                if event == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await self._read_body(receive)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append({"path": scope["path"], **headers})
        path = scope["path"]
        if path == "/":
            await self._respond(send, 200, b"text/plain; charset=utf-8", b"Ollama is running")
        elif path == "/api/tags":
            await self._respond(send, 200, b"application/json; charset=utf-8", _dumps(TAGS))
        elif path == "/api/ps":
            await self._respond(send, 200, b"application/json; charset=utf-8", _dumps(PS))
        elif path == "/api/chat":
            wanted = headers.get("accept", "application/x-ndjson")
            content_type = (
                "text/event-stream" if "event-stream" in wanted else ("application/x-ndjson")
            )
            await self._stream(send, content_type)
        else:
            await self._respond(send, 404, b"text/plain", b"404 page not found")

    async def _stream(self, send: Send, content_type: str) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", content_type.encode())],
            }
        )
        # Bind this stream to the releases of its own test: a stream a previous test left
        # parked (a proxy need not cancel it when the client goes) waits on the old
        # semaphore after ``reset`` and can never take a release meant for this one.
        released = self.released
        for k in range(self.chunks):
            await asyncio.wait_for(released.acquire(), RELEASE_TIMEOUT)
            self.sent_at.append(time.monotonic())
            await send(
                {
                    "type": "http.response.body",
                    "body": self.chunk(k, content_type),
                    "more_body": k < self.chunks - 1,
                }
            )

    @staticmethod
    async def _read_body(receive: Receive) -> bytes:
        """Consume the request body, as Ollama does, before answering."""
        body = b""
        while True:
            message = await receive()
            body += bytes(message.get("body", b""))
            if not message.get("more_body", False):
                return body

    @staticmethod
    async def _respond(send: Send, status: int, content_type: bytes, body: bytes) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type)],
            }
        )
        await send({"type": "http.response.body", "body": body})
