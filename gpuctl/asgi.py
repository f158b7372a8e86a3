"""The ASGI callable's types, shared by the gateway and the simulated servers.

Both speak raw ASGI (no framework on the hot path, none in the simulators), so both need
the same three names; they live here, below every layer, rather than in one layer that the
other would have to import.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["Message", "Receive", "Scope", "Send"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
