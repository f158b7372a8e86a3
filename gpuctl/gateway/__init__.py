"""gpuctl.gateway: the shared HTTP face of the engine (``gpuctl serve``).

``create_app`` builds the ASGI app (a raw hot path for inference beside a Quart app for the
rest); ``server.GatewayServer`` serves it with granian, embedded in ``gpuctl serve``'s loop.
"""

from gpuctl.gateway.app import GatewayApp, create_app

__all__ = ["GatewayApp", "create_app"]
