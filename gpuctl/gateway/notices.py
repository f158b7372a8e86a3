"""Wait notices: what a streaming request hears while it is held for a wake or a slot.

A resume on SURF takes minutes. A chat UI shows nothing for that long unless the stream says
something it displays, and people who see nothing reload and resend. ``server.wait_notice``
picks the form:

- ``"thinking"`` (the default): each notice is a valid chunk of the request's own API with
  empty content and the text as *reasoning*: ``message.thinking`` on ``/api/chat``,
  ``thinking`` on ``/api/generate``, ``delta.reasoning_content`` on ``/v1/chat/completions``.
  Chat UIs (Open WebUI) show it in their collapsible reasoning block and the answer stays
  clean; programs that read ``content`` (the ``ollama`` and ``openai`` clients, LangChain,
  LiteLLM) get only the answer. Endpoints with no reasoning field (``/v1/completions``,
  ``/v1/responses``) get SSE comments instead; non-streaming requests get nothing.
- ``"comment"``: SSE comment lines (``: waking gpu-3, about 70 s``) on streaming ``/v1``
  requests only, which every SSE parser skips; native NDJSON streams hear nothing.
- ``"none"``: silence until the answer starts.

Every notice starts with ``MARKER``. Open WebUI sends an assistant turn's thinking back in
the next request's history, so ``strip_history`` removes marked lines from incoming
messages before a node sees them; a real thinking model's reasoning (no marker) passes
untouched.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Literal

__all__ = [
    "MARKER",
    "Notifier",
    "WaitNotice",
    "notifier",
    "strip_history",
]

WaitNotice = Literal["comment", "thinking", "none"]

#: The first characters of every notice: ASCII, so that a JSON encoder that escapes
#: non-ASCII cannot hide it from the byte check in ``strip_history``.
MARKER = "[gpuctl] "
_MARKER_BYTES = MARKER.encode()
#: A marked line, also as Open WebUI quotes reasoning (``> [gpuctl] ...``).
_MARKED_LINE = re.compile(r"^[ \t]*(?:>[ \t]*)?" + re.escape(MARKER) + r".*(?:\n|$)",
                          re.MULTILINE)
#: Message fields that carry reasoning, in the APIs and clients gpuctl serves.
_REASONING_FIELDS = ("thinking", "reasoning_content", "reasoning")


class Notifier:
    """Renders a held request's notices as bytes of its stream, and says what starts it."""

    #: The stream's content type when the notices start it (the node's answer follows).
    content_type: bytes = b"text/event-stream"

    def __init__(self, model: str) -> None:
        self.model = model

    def chunk(self, text: str) -> bytes:
        """One notice (without its marker) as bytes of the stream."""
        return f": {text}\n\n".encode()

    def error(self, message: str) -> bytes:
        """A failure after the notices started the stream (the status line is gone)."""
        body = json.dumps({"error": {"message": message, "type": "api_error",
                                     "param": None, "code": None}})
        return f"data: {body}\n\n".encode()


class _ChatCompletionNotifier(Notifier):
    def chunk(self, text: str) -> bytes:
        payload = {
            "id": "chatcmpl-gpuctl-wait", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": self.model, "system_fingerprint": "gpuctl",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": "",
                                               "reasoning_content": f"{MARKER}{text}\n"},
                         "finish_reason": None}],
        }
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class _NativeNotifier(Notifier):
    content_type = b"application/x-ndjson"

    def __init__(self, model: str, *, chat: bool) -> None:
        super().__init__(model)
        self.chat = chat

    def chunk(self, text: str) -> bytes:
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        note = f"{MARKER}{text}\n"
        payload: dict[str, Any] = {"model": self.model, "created_at": when}
        if self.chat:
            payload["message"] = {"role": "assistant", "content": "", "thinking": note}
        else:
            payload.update(response="", thinking=note)
        payload["done"] = False
        return json.dumps(payload, separators=(",", ":")).encode() + b"\n"

    def error(self, message: str) -> bytes:
        return json.dumps({"error": message}).encode() + b"\n"


def notifier(mode: WaitNotice, path: str, model: str, *, stream: bool) -> Notifier | None:
    """How a request on ``path`` hears its wait under ``mode``; None: it hears nothing."""
    if not stream or mode == "none":
        return None
    openai = path.startswith("/v1/")
    if mode == "comment":
        return Notifier(model) if openai else None
    if path == "/v1/chat/completions":
        return _ChatCompletionNotifier(model)
    if path in ("/api/chat", "/api/generate"):
        return _NativeNotifier(model, chat=path == "/api/chat")
    return Notifier(model) if openai else None


def _clean(text: str) -> str | None:
    """``text`` without marked lines; None when nothing else was in it."""
    kept = _MARKED_LINE.sub("", text)
    return kept if kept.strip() else None


def _strip_think_blocks(content: str) -> str:
    """Drop ``<think>`` / ``<details type="reasoning">`` blocks that hold only notices."""

    def drop(match: re.Match[str]) -> str:
        inner = match.group("inner")
        inner = re.sub(r"<summary>.*?</summary>", "", inner, flags=re.DOTALL)
        return "" if _clean(inner) is None else match.group(0)

    content = re.sub(r"<think>(?P<inner>.*?)</think>\s*", drop, content, flags=re.DOTALL)
    return re.sub(r"<details[^>]*type=\"reasoning\"[^>]*>(?P<inner>.*?)</details>\s*", drop,
                  content, flags=re.DOTALL)


def strip_history(request: dict[str, Any], body: bytes) -> bytes:
    """``body`` without the notices a chat UI sent back in its history.

    A byte check first: a body with no marker (nearly all) is returned as it came, unparsed
    again and unchanged. Only assistant turns are touched, and in them only marked lines:
    a reasoning field left empty is removed, other text stays as the client sent it.
    """
    if _MARKER_BYTES not in body:
        return body
    messages = request.get("messages")
    if not isinstance(messages, list):
        return body
    changed = False
    for message in messages:
        if not isinstance(message, dict) or message.get("role") != "assistant":
            continue
        for name in _REASONING_FIELDS:
            value = message.get(name)
            if isinstance(value, str) and MARKER in value:
                cleaned = _clean(value)
                if cleaned is None:
                    del message[name]
                else:
                    message[name] = cleaned
                changed = True
        content = message.get("content")
        if isinstance(content, str) and MARKER in content:
            cleaned_content = _strip_think_blocks(content)
            if cleaned_content != content:
                message["content"] = cleaned_content
                changed = True
    if not changed:
        return body
    return json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode()
