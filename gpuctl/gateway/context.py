"""What every part of the gateway shares: config, engine, keys, the node pool, metrics.

``EngineFace`` lists the engine methods the gateway calls (``gpuctl.engine.Engine``
provides them), so the gateway depends on the contract, not on the engine's insides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from gpuctl.config import Config
from gpuctl.engine.api import (
    ActionResult,
    GpuView,
    ModelView,
    ProgressCallback,
    RequestRow,
    Ticket,
    Usage,
)
from gpuctl.engine.overview import FleetOverview
from gpuctl.engine.requestlog import RequestLog
from gpuctl.errors import GpuctlError
from gpuctl.gateway.auth import Authenticator
from gpuctl.gateway.limits import ClientShare, StallWatch
from gpuctl.gateway.metrics import GatewayMetrics
from gpuctl.gateway.upstream import Pool, PoolTransport
from gpuctl.store.keys import KeyStore
from gpuctl.store.store import UsageTotals

__all__ = ["EngineFace", "Gateway"]


class EngineFace(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def refresh(self, *, probe: bool = True) -> None: ...
    def refresh_error(self) -> str | None: ...
    def gpus(self) -> list[GpuView]: ...
    def gpu(self, ref: str) -> GpuView: ...
    async def wake(self, ref: str, *, wait: bool = False, timeout: float | None = None,
                   progress: ProgressCallback | None = None) -> ActionResult: ...
    async def pause(self, ref: str, *, wait: bool = False) -> ActionResult: ...
    async def acquire(self, model: str, user: str, *,
                      progress: ProgressCallback | None = None,
                      request: RequestRow | None = None) -> Ticket: ...
    def begin_request(self, key_id: str, user: str, route: str,
                      model: str = "") -> RequestRow: ...
    def end_request(self, request: RequestRow, status: int) -> None: ...
    def budget_remaining(self, key_id: str) -> float | None: ...
    def release(self, ticket: Ticket, usage: Usage | None = None, *,
                failed: str | None = None) -> None: ...
    def models(self) -> list[ModelView]: ...
    def loaded(self) -> list[dict[str, Any]]: ...
    def gpus_with_model(self, model: str) -> list[GpuView]: ...
    async def management_targets(self, model: str | None = None,
                                 names: Sequence[str] = ()) -> list[GpuView]: ...
    def route_again(self, attempt: int, *, answered: bool) -> bool: ...
    def remember_show(self, model: str, body: bytes) -> None: ...
    def shown(self, model: str) -> bytes | None: ...
    def queue_depth(self) -> int: ...
    async def usage(self, *, since: str = "7d", until: str | None = None, by: str = "user",
                    user: str | None = None) -> Any: ...
    async def request_log(self, *, since: str = "7d", until: str | None = None,
                          limit: int = ...) -> RequestLog: ...
    def in_flight(self) -> int: ...
    def turn_away(self, message: str = ..., *, unless_within: float = 0.0) -> int: ...
    def turned_away(self) -> int: ...
    def metrics(self) -> Any: ...
    def overview(self) -> FleetOverview: ...
    def usage_totals(self) -> dict[str, UsageTotals]: ...
    def requests(self, since: float, until: float) -> list[RequestRow]: ...


@dataclass
class Gateway:
    """The gateway's shared state. Built by ``create_app``; lives as long as the server."""

    config: Config
    engine: EngineFace
    keys: KeyStore
    node_token: str | None = None
    connect_timeout: float = 5.0
    manage_engine: bool = True
    #: Replicas: a header naming the replica that served (``x-gpuctl-replica: pid@host``).
    replica_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    pool: Pool = field(init=False)
    http: httpx.AsyncClient = field(init=False)
    auth: Authenticator = field(init=False)
    metrics: GatewayMetrics = field(init=False)
    node_headers: list[tuple[bytes, bytes]] = field(init=False)
    max_body: int = field(init=False)
    stalls: StallWatch = field(init=False)
    clients: ClientShare = field(init=False)
    #: Why the engine failed to start, if it did (``serve`` reports it and exits).
    startup_error: GpuctlError | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.pool = Pool(connect_timeout=self.connect_timeout)
        # One shared client over the O(1) pool; no read timeout (model loads take minutes).
        self.http = httpx.AsyncClient(
            transport=PoolTransport(self.pool),
            timeout=httpx.Timeout(None, connect=self.connect_timeout),
        )
        self.auth = Authenticator(self.keys)
        self.metrics = GatewayMetrics(lambda: self.engine)
        # The node token is handed in (``serve`` gets it from ``Credentials``), never read
        # from the environment here: one owner for each secret.
        token = self.node_token
        self.node_headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self.max_body = int(self.config.server.max_body_mb * 1024 * 1024)
        self.stalls = StallWatch(self.config.server.stall_timeout_seconds)
        self.clients = ClientShare(self.config.server.max_connections_per_client)

    def node_headers_dict(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.node_headers}

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.pool.aclose()
