"""What the engine needs from one GPU's Ollama: is it up, what it has, what it has loaded.

``gpuctl.node.client.NodeClient`` speaks HTTP to a real node; ``gpuctl.sim`` offers an
in-memory one for engine tests on a fake clock. The types here belong to the node layer:
the engine imports them (and re-exports ``ModelView`` to its faces), never the reverse.
"""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import BaseModel, Field

__all__ = ["ModelView", "NodeProbe"]


class ModelView(BaseModel):
    """One model as a node lists it (``/api/tags``), with the fields Ollama clients require."""

    name: str
    model: str
    modified_at: str = ""
    size: int = 0
    digest: str = ""
    details: dict[str, object] = Field(default_factory=dict)


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
