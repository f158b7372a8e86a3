"""Raw ASGI replies in the exact shapes clients expect: Ollama's, OpenAI's, and gin's 404.

Shared by the hot path and the dispatcher so an error looks the same whichever code answered.
Ollama clients read ``{"error": "..."}``; the ``openai`` package reads
``{"error": {"message", "type", "param", "code"}}``; an unknown path gets gin's plain-text
``404 page not found``, as from a real Ollama.
"""

from __future__ import annotations

import json
import math
from typing import Any

from gpuctl.asgi import Message, Receive, Scope, Send

__all__ = [
    "JSON_CT",
    "Message",
    "Receive",
    "Scope",
    "Send",
    "error_body",
    "reply",
    "reply_error",
    "reply_json",
    "reply_not_found",
]


JSON_CT = b"application/json; charset=utf-8"
TEXT_CT = b"text/plain; charset=utf-8"

_OPENAI_TYPES = {400: "invalid_request_error", 404: "not_found_error", 401: "authentication_error",
                 403: "permission_error", 413: "invalid_request_error", 503: "api_error"}


def error_body(message: str, status: int, *, openai: bool = False) -> bytes:
    """The JSON error body for a native (``/api``) or OpenAI (``/v1``) route."""
    if openai:
        kind = _OPENAI_TYPES.get(status, "api_error")
        payload: Any = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    else:
        payload = {"error": message}
    return json.dumps(payload, separators=(",", ":")).encode()


async def reply(send: Send, status: int, body: bytes, content_type: bytes = JSON_CT,
                headers: list[tuple[bytes, bytes]] | None = None, *, head: bool = False) -> None:
    out = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    if headers:
        out += headers
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": b"" if head else body})


async def reply_json(send: Send, status: int, payload: Any, *, head: bool = False) -> None:
    await reply(send, status, json.dumps(payload, separators=(",", ":")).encode(), head=head)


async def reply_error(send: Send, status: int, message: str, *, openai: bool = False,
                      retry_after: float | None = None) -> None:
    headers: list[tuple[bytes, bytes]] = []
    if retry_after is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="gpuctl"'))
    await reply(send, status, error_body(message, status, openai=openai), headers=headers)


async def reply_not_found(send: Send) -> None:
    await reply(send, 404, b"404 page not found", TEXT_CT)
