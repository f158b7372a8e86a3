"""What the engine needs from one GPU's Ollama: is it up, what it has, what it has loaded.

``gpuctl.node.client.NodeClient`` speaks HTTP to a real node; ``gpuctl.sim`` offers an
in-memory one for engine tests on a fake clock.
"""

from __future__ import annotations

from typing import Any, Protocol

from gpuctl.engine.api import ModelView

__all__ = ["NodeProbe"]


class NodeProbe(Protocol):
    #: The node's Ollama base URL as the gateway proxies to it (no trailing slash).
    base_url: str

    async def ready(self) -> bool:
        """True when Ollama answers; never raises for a node that is simply down."""
        ...

    async def tags(self) -> list[ModelView]:
        """``GET /api/tags``: the models on the node's disk. Raises ``NodeError``."""
        ...

    async def ps(self) -> list[dict[str, Any]]:
        """``GET /api/ps``: the models in memory, as Ollama lists them. Raises ``NodeError``."""
        ...
