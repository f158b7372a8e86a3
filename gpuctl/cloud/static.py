"""Fixed Ollama hosts as a ``CloudProvider`` (``cloud_api.provider = "static"``).

For a group that runs Ollama on machines gpuctl does not start or stop: a lab server, a
workstation, a GPU box outside SURF. Each host is an always-"running" workspace whose
``node_url`` is the host URL itself, so ``gpu.ollama_url`` does not apply. Resume and pause
refuse with ``NotCloudManaged``, which says why instead of pretending to act.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from gpuctl.cloud.base import Workspace
from gpuctl.errors import ConfigError, GpuNotFound, NotCloudManaged

__all__ = ["StaticProvider", "static_workspace"]


def _normalise(host: str) -> str:
    text = host.strip().rstrip("/")
    if "://" not in text:
        text = f"http://{text}"
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"cloud_api.hosts: {host!r} is not an Ollama URL",
            hint='Write hosts like "http://10.0.0.5:11434" or "https://ollama.example.org".',
        )
    if parts.port is None and parts.scheme == "http":
        text = f"http://{parts.netloc}:11434{parts.path}"
    return text


def static_workspace(host: str) -> Workspace:
    """The always-running workspace for one host URL; id and name come from the host."""
    url = _normalise(host)
    parts = urlsplit(url)
    hostname = parts.hostname or url
    name = f"{hostname}:{parts.port}" if parts.port else hostname
    if parts.path:
        name += parts.path
    try:
        ipaddress.ip_address(hostname)
        ip, fqdn = hostname, None
    except ValueError:
        ip, fqdn = None, hostname
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    return Workspace(
        id=f"static-{slug}",
        name=name,
        status="running",
        active=True,
        ip=ip,
        fqdn=fqdn,
        host_name=hostname,
        node_url=url,
    )


class StaticProvider:
    """``CloudProvider`` over a fixed list of Ollama hosts that gpuctl never starts or stops."""

    managed = False

    def __init__(self, hosts: list[str]) -> None:
        workspaces = [static_workspace(h) for h in hosts]
        self._by_id = {ws.id: ws for ws in workspaces}

    async def list_workspaces(self) -> list[Workspace]:
        return sorted(self._by_id.values(), key=lambda ws: ws.name)

    async def get_workspace(self, workspace_id: str) -> Workspace:
        try:
            return self._by_id[workspace_id]
        except KeyError:
            raise GpuNotFound(f"no static host with id {workspace_id!r}") from None

    async def resume(self, workspace_id: str) -> Workspace:
        ws = await self.get_workspace(workspace_id)
        raise NotCloudManaged(f"{ws.name} is a static host: gpuctl cannot resume it")

    async def pause(self, workspace_id: str) -> Workspace:
        ws = await self.get_workspace(workspace_id)
        raise NotCloudManaged(f"{ws.name} is a static host: gpuctl cannot pause it")

    async def aclose(self) -> None:
        return None
