"""Workspace JSON in the shapes the SURF API really returns (see shared/facts/surf-api.md)."""

from __future__ import annotations

from typing import Any

BASE = "https://gw.example.test/v1"
LIST_URL = f"{BASE}/workspace/workspaces/"


def workspace(
    name: str,
    *,
    id: str | None = None,
    status: str = "paused",
    ip: str | None = "145.38.194.153",
    flavor: str = "gpu-a10-11core-88gb-50gb-2tb",
    size: str = "A10 - 1 GPU",
    deleted: bool = False,
    application_type: str | None = None,
    actions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    allowed = {"paused": ["resume", "update_nsgs", "update_storages"],
               "running": ["pause", "reboot", "update_nsgs", "update_storages"]}.get(status, [])
    data: dict[str, Any] = {
        "id": id or f"{name.lower()}-0000-4000-8000-000000000000",
        "name": name,
        "description": "",
        "status": status,
        "active": status == "running",
        "actions": allowed,
        "allowed_actions": allowed,
        "workspace_actions": actions or [],
        "resource_meta": {
            "ip": ip,
            "workspace_fqdn": f"{name.lower()}.myco.src.surf-hosted.nl",
            "flavor_name": flavor,
            "instance_user": "ubuntu",
        },
        "meta": {
            "host_name": name.lower(),
            "co_name": "myco",
            "flavours": [{"name": "Ubuntu 22.04", "category": "os"},
                         {"name": size, "category": "size"}],
        },
        "end_time": "2026-12-31T23:59:59Z",
        "time_created": "2026-10-01T09:00:00Z",
        "time_deleted": "2026-10-02T09:00:00Z" if deleted else None,
        "wallet_id": "w", "owner_id": "o", "co_id": "c",
    }
    if deleted:
        data["status"] = "deleted"
    if application_type is not None:
        data["application_type"] = application_type
    return data


def page(results: list[dict[str, Any]], *, next_url: str | None = None,
         count: int | None = None) -> dict[str, Any]:
    return {"count": len(results) if count is None else count, "next": next_url,
            "previous": None, "results": results}
