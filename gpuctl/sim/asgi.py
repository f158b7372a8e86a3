"""What every simulated server shares: the ASGI types (``gpuctl.asgi``) and an answer to the
lifespan protocol.

The simulated nodes and cloud are raw ASGI apps (no framework, so they stay fast enough to
benchmark the gateway against); the server opens each with a lifespan exchange first.
"""

from __future__ import annotations

from gpuctl.asgi import Receive, Scope, Send

__all__ = ["Receive", "Scope", "Send", "answer_lifespan"]



async def answer_lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge startup and shutdown; returns once the server shuts the app down."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
