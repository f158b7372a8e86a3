"""Request bodies as JSON objects, with the two ways ``json.loads`` fails that are not
``ValueError``s caught where they should be.

* Nesting: ``json.loads`` recurses, so ``[[[[...`` 2,000 deep raised ``RecursionError`` and
  the gateway answered 500 with a traceback. Depth is bounded here (``MAX_DEPTH``, far past
  any chat request) by a scan of the bytes before parsing.
* Lone surrogates: ``"\\ud800"`` parses into a ``str`` that cannot be encoded, and
  ``/api/show`` answered 500 when it re-encoded the model name. A body whose escapes include
  surrogates is checked once parsed; a body without them (nearly all) pays one ``find``.

Both are answered 400 ``{"error": ...}`` by the caller, as any other invalid JSON.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["MAX_DEPTH", "BadJson", "load_object"]

MAX_DEPTH = 64
_OPENERS = re.compile(rb"[\[{]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


class BadJson(ValueError):
    """The body is not a usable JSON object; the message says why, for a 400."""


def load_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise BadJson("missing request body")
    if len(_OPENERS.findall(body, 0, 1 << 20)) > MAX_DEPTH and _depth(body) > MAX_DEPTH:
        raise BadJson(f"request body nested deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        raise BadJson("invalid JSON in request body") from None
    if not isinstance(value, dict):
        raise BadJson("request body must be a JSON object")
    if _SURROGATE_ESCAPE.search(body) is not None and not _encodable(value):
        raise BadJson("invalid JSON in request body: unpaired surrogate in a string")
    return value


def _depth(body: bytes) -> int:
    """Deepest nesting of ``[``/``{`` outside strings (only run on a body with many)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _encodable(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
