"""What every cloud provider offers the engine: list, get, resume and pause workspaces.

``Workspace`` is the provider-neutral view of one machine; ``status`` keeps the cloud's own
word (``running``, ``paused``, ``resuming`` … or anything new the cloud invents), and the
engine maps it to a GPU state, treating an unknown status as "in progress".
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ACTION_IN_PROGRESS", "TRANSITIONAL_STATUSES", "CloudProvider", "Workspace"]

#: Cloud statuses that mean "an action is under way; poll again soon".
TRANSITIONAL_STATUSES = frozenset(
    {"creating", "resuming", "pausing", "updating", "rebooting", "deleting"}
)
#: States of a cloud action (``workspace_actions[].status``) that is still under way.
ACTION_IN_PROGRESS = frozenset({"pending", "initialized", "running"})
_UNDER_WAY = {"resume": ("resuming", "running"), "pause": ("pausing", "paused")}


class Workspace(BaseModel):
    """One cloud workspace, as gpuctl needs it."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    status: str
    active: bool = False
    ip: str | None = None
    fqdn: str | None = None
    host_name: str | None = None
    flavor: str | None = Field(None, description="machine flavour id, e.g. gpu-a10-11core-…")
    size: str | None = Field(None, description="human size name, e.g. 'A10 - 1 GPU'")
    allowed_actions: tuple[str, ...] = ()
    last_action: str | None = Field(None, description="type of the newest workspace action")
    last_action_status: str | None = None
    last_action_error: str | None = Field(None, description="e.g. 'Timeout waiting for VM…'")
    node_url: str | None = Field(
        None, description="a fixed Ollama URL (static hosts); overrides gpu.ollama_url"
    )

    def shows(self, action: str) -> bool:
        """The cloud shows ``action`` ("resume" or "pause") taken: the status moving that
        way, or a new action of that type in progress. How a caller learns, after an
        unclear answer or a restart, whether an action it sent (or meant to) arrived."""
        if self.status in _UNDER_WAY.get(action, ()):
            return True
        return self.last_action == action and self.last_action_status in ACTION_IN_PROGRESS

    @property
    def can_resume(self) -> bool:
        return "resume" in self.allowed_actions

    @property
    def can_pause(self) -> bool:
        return "pause" in self.allowed_actions


@runtime_checkable
class CloudProvider(Protocol):
    """A source of GPU workspaces. Implementations: ``surf``, ``static``, ``sim``."""

    #: False for providers whose machines gpuctl cannot start or stop (static hosts).
    managed: bool

    async def list_workspaces(self) -> list[Workspace]:
        """Every GPU workspace matching the configured filter, across all pages."""
        ...

    async def get_workspace(self, workspace_id: str) -> Workspace:
        """One workspace; raises ``GpuNotFound`` when the cloud does not know the id."""
        ...

    async def resume(self, workspace_id: str) -> Workspace:
        """Ask the cloud to resume; returns the workspace as re-read after the request."""
        ...

    async def pause(self, workspace_id: str) -> Workspace:
        """Ask the cloud to pause; returns the workspace as re-read after the request."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
