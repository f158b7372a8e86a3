"""HTTP client of one GPU's Ollama: readiness, ``/api/tags``, ``/api/ps``.

Probes are short (a paused or booting node must not stall a refresh): a few seconds to
connect and to answer. Generation traffic does not go through here; the gateway owns those
long-lived streams and their timeouts.
"""

from __future__ import annotations

from typing import Any

import httpx

from gpuctl.cloud.base import Workspace
from gpuctl.errors import NodeError
from gpuctl.node.base import ModelView

__all__ = ["PROBE_TIMEOUT", "NodeClient", "node_url"]

#: Connect and read budget of one probe, in seconds.
PROBE_TIMEOUT = httpx.Timeout(5.0, connect=3.0)


def node_url(template: str, ws: Workspace) -> str:
    """The node's Ollama base URL: ``template`` with ``{ip}``, ``{fqdn}``, ``{host_name}`` filled.

    A workspace with a fixed ``node_url`` (a static host) keeps it. A placeholder the
    workspace cannot fill (no IP yet while ``creating``) is a ``NodeError``.
    """
    if ws.node_url:
        return ws.node_url.rstrip("/")
    values = {"ip": ws.ip, "fqdn": ws.fqdn, "host_name": ws.host_name}
    url = template
    for key, value in values.items():
        placeholder = "{" + key + "}"
        if placeholder in url:
            if not value:
                raise NodeError(f"{ws.name} has no {key} yet, so {template} cannot be reached")
            url = url.replace(placeholder, value)
    return url.rstrip("/")


class NodeClient:
    """``NodeProbe`` over HTTP, sending ``Authorization: Bearer <node token>`` when one is set."""

    @classmethod
    def for_workspace(
        cls,
        ws: Workspace,
        template: str,
        *,
        token: str | None,
        http: httpx.AsyncClient | None = None,
    ) -> NodeClient:
        return cls(node_url(template, ws), token=token, http=http)

    def __init__(
        self, base_url: str, *, token: str | None = None, http: httpx.AsyncClient | None = None
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers: dict[str, str] = {"Authorization": f"Bearer {token}"} if token else {}
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=PROBE_TIMEOUT)

    def __repr__(self) -> str:  # no token in reprs
        return f"NodeClient({self.base_url!r})"

    async def ready(self) -> bool:
        """True when Ollama answers ``GET /`` with 200; False for any failure, never raises."""
        try:
            response = await self._http.get(
                f"{self.base_url}/", headers=self.headers, timeout=PROBE_TIMEOUT
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def tags(self) -> list[ModelView]:
        body = await self._get_json("/api/tags")
        models: list[ModelView] = []
        for entry in body.get("models") or []:
            if not isinstance(entry, dict):
                continue
            name = str(entry.get("name") or entry.get("model") or "")
            if not name:
                continue
            models.append(
                ModelView(
                    name=name,
                    model=str(entry.get("model") or name),
                    modified_at=str(entry.get("modified_at") or ""),
                    size=int(entry.get("size") or 0),
                    digest=str(entry.get("digest") or ""),
                    details=dict(entry.get("details") or {}),
                )
            )
        return models

    async def ps(self) -> list[dict[str, Any]]:
        body = await self._get_json("/api/ps")
        return [dict(m) for m in body.get("models") or [] if isinstance(m, dict)]

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def _get_json(self, path: str) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        try:
            response = await self._http.get(url, headers=self.headers, timeout=PROBE_TIMEOUT)
        except httpx.HTTPError as exc:
            raise NodeError(f"Ollama at {self.base_url} did not answer {path}: "
                            f"{type(exc).__name__}") from None
        if response.status_code in (401, 403):
            raise NodeError(
                f"Ollama at {self.base_url} rejected the node token (HTTP {response.status_code})",
                hint="Set GPUCTL_NODE_TOKEN to the token the GPU node's proxy expects.",
            )
        if response.status_code != 200:
            raise NodeError(f"Ollama at {self.base_url} answered {path} with HTTP "
                            f"{response.status_code}")
        try:
            body = response.json()
        except ValueError:
            raise NodeError(f"Ollama at {self.base_url} sent non-JSON for {path}") from None
        if not isinstance(body, dict):
            raise NodeError(f"Ollama at {self.base_url} sent an unexpected body for {path}")
        return body
