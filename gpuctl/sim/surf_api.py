"""A fake SURF Research Cloud workspace API, as a raw ASGI app, for tests and the demo.

It answers with the real shapes (``shared/facts/surf-api.md``): the paginated list with
absolute ``next`` URLs, ``application_type`` / ``deleted`` / ``name`` filters, one workspace,
and the ``resume`` / ``pause`` actions with their status walk (paused → resuming → running,
running → pausing → paused). A transition ends ``resume_seconds`` / ``pause_seconds`` after
it began, measured on an injectable clock and evaluated lazily on each read, so a test on a
``FakeClock`` moves the cloud by moving the clock, and a delay of 0 means "the next read sees
the end state". For callers that cannot move a clock (a CLI test runs the real one),
``settle_after_reads=N`` ends a transition at the N-th read of the workspace instead: as
deterministic as a fake clock, with no waiting. Tests can also make a resume fail (it falls
back to ``paused`` with a failed action "Timeout waiting for VM to resume."), make the next
N requests fail (500, 429, 401…), and count the action POSTs per workspace to assert
"exactly one resume".

Serve it with ``gpuctl.sim.servers.running`` or ``ServerThread``; the provider's base URL
is ``<server url>/v1``.
"""

from __future__ import annotations

import itertools
import json
import threading
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl, urlencode

from gpuctl.engine.clock import Clock, SystemClock

__all__ = ["SimWorkspace", "SurfApiSim"]

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

RESUME_FAILURE = "Timeout waiting for VM to resume."

_ALLOWED = {
    "running": ["pause", "reboot", "update_nsgs", "update_storages"],
    "paused": ["resume", "update_nsgs", "update_storages"],
}
# status during a transition -> status once it ends
_TRANSITIONS = {"resuming": "running", "pausing": "paused"}


@dataclass
class SimWorkspace:
    """One simulated workspace; mutate it freely from a test (under ``SurfApiSim.lock``)."""

    id: str
    name: str
    status: str = "paused"
    ip: str | None = "145.38.194.153"
    host_name: str = "ollama"
    flavor: str = "gpu-a10-11core-88gb-50gb-2tb"
    size: str = "A10 - 1 GPU"
    application_type: str = "Compute"
    deleted: bool = False
    fail_next_resume: bool = False
    actions: list[dict[str, Any]] = field(default_factory=list)
    transition_ends: float | None = None
    reads_left: int | None = None
    failing: bool = False

    def to_json(self) -> dict[str, Any]:
        fqdn = f"{self.host_name}.myco.src.surf-hosted.nl"
        resource_meta: dict[str, Any] = {
            "workspace_fqdn": fqdn,
            "flavor_name": self.flavor,
            "instance_user": "ubuntu",
            "vm_id": f"vm-{self.id[:8]}",
        }
        if self.ip:
            resource_meta["ip"] = self.ip
        allowed = list(_ALLOWED.get(self.status, []))
        return {
            "id": self.id,
            "name": self.name,
            "description": "",
            "status": self.status,
            "active": self.status == "running",
            "actions": allowed,
            "allowed_actions": allowed,
            "workspace_actions": list(self.actions),
            "deletable": True,
            "editable": True,
            "resource_meta": resource_meta,
            "meta": {
                "host_name": self.host_name,
                "workspace_fqdn": fqdn,
                "co_name": "myco",
                "wallet_name": "gpu-wallet",
                "subscription_name": "SURF HPC Cloud",
                "flavours": [
                    {"name": "Ubuntu 22.04", "category": "os"},
                    {"name": self.size, "category": "size"},
                ],
            },
            "end_time": "2026-12-31T23:59:59Z",
            "time_created": "2026-10-01T09:00:00Z",
            "time_deleted": "2026-10-02T09:00:00Z" if self.deleted else None,
            "wallet_id": "wallet-1",
            "owner_id": "owner-1",
            "co_id": "co-1",
            "network_security_group_rules": ["in tcp 22 22 0.0.0.0/0 immutable"],
        }


class SurfApiSim:
    """The fake API. ``await sim(scope, receive, send)`` is the ASGI entry point."""

    def __init__(
        self,
        *,
        token: str = "sim-token",
        clock: Clock | None = None,
        page_size: int = 100,
        resume_seconds: float = 60.0,
        pause_seconds: float = 30.0,
        failed_resume_seconds: float = 600.0,
        settle_after_reads: int | None = None,
        prefix: str = "/v1",
        history: int = 10_000,
    ) -> None:
        self.token = token
        self.clock: Clock = clock or SystemClock()
        self.page_size = page_size
        self.resume_seconds = resume_seconds
        self.pause_seconds = pause_seconds
        self.failed_resume_seconds = failed_resume_seconds
        self.settle_after_reads = settle_after_reads
        self.prefix = prefix.rstrip("/")
        self.workspaces: dict[str, SimWorkspace] = {}
        self.resume_posts: Counter[str] = Counter()
        self.pause_posts: Counter[str] = Counter()
        # Bounded, so a long-running demo does not grow without end.
        self.requests: deque[tuple[str, str]] = deque(maxlen=history)
        self.headers_seen: deque[dict[str, str]] = deque(maxlen=history)
        self.lock = threading.Lock()  # tests poke state from another thread (ServerThread)
        self._faults: list[tuple[int, float | None]] = []
        self._action_ids = itertools.count(1)

    # -- set-up and fault injection --------------------------------------------------------

    def add(self, name: str, *, id: str | None = None, status: str = "paused",
            **fields: Any) -> SimWorkspace:
        ws = SimWorkspace(id=id or str(uuid.uuid4()), name=name, status=status, **fields)
        with self.lock:
            self.workspaces[ws.id] = ws
        return ws

    def fail_requests(self, count: int = 1, *, status: int = 500,
                      retry_after: float | None = None) -> None:
        """Answer the next ``count`` requests with ``status`` (and ``Retry-After`` if given)."""
        with self.lock:
            self._faults.extend([(status, retry_after)] * count)

    def fail_next_resume(self, workspace_id: str) -> None:
        """The next resume of this workspace fails after ``failed_resume_seconds``."""
        with self.lock:
            self.workspaces[workspace_id].fail_next_resume = True

    def by_name(self, name: str) -> SimWorkspace:
        return next(ws for ws in self.workspaces.values() if ws.name == name)

    # -- the status walk -------------------------------------------------------------------

    def _settle(self, ws: SimWorkspace) -> None:
        """Finish a transition whose time has come (called before every read)."""
        if ws.transition_ends is None:
            return
        if ws.reads_left is not None:
            ws.reads_left -= 1
            if ws.reads_left > 0:
                return
        elif self.clock.now() < ws.transition_ends:
            return
        ws.transition_ends = None
        ws.reads_left = None
        latest = ws.actions[-1] if ws.actions else None
        if ws.failing:
            ws.failing = False
            ws.status = "paused"
            if latest is not None:
                latest.update(status="failed", result={"error": RESUME_FAILURE})
        else:
            ws.status = _TRANSITIONS.get(ws.status, ws.status)
            if latest is not None:
                latest.update(status="success", result={})
        if latest is not None:
            latest["time_updated"] = self._stamp()

    def _stamp(self) -> str:
        stamp = datetime.fromtimestamp(self.clock.wall(), tz=timezone.utc)
        return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    def _start(self, ws: SimWorkspace, action: str) -> None:
        if action == "resume":
            ws.status = "resuming"
            ws.failing = ws.fail_next_resume
            ws.fail_next_resume = False
            delay = self.failed_resume_seconds if ws.failing else self.resume_seconds
        else:
            ws.status = "pausing"
            delay = self.pause_seconds
        ws.transition_ends = self.clock.now() + delay
        ws.reads_left = self.settle_after_reads
        ws.actions.append({
            "id": next(self._action_ids),
            "type": action,
            "status": "pending",
            "reason": "API",
            "result": None,
            "time_created": self._stamp(),
            "time_updated": None,
            "issuer_display_name": None,
        })

    # -- ASGI ------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        status, body, extra = self._handle(scope, headers)
        raw = json.dumps(body).encode()
        out = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
        out += [(k.encode(), v.encode()) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": raw})

    def _handle(self, scope: Scope, headers: dict[str, str]
                ) -> tuple[int, Any, dict[str, str]]:
        method = scope["method"]
        path: str = scope["path"]
        with self.lock:
            self.requests.append((method, path))
            self.headers_seen.append(headers)
            if self._faults:
                status, retry_after = self._faults.pop(0)
                extra = {"retry-after": f"{retry_after:g}"} if retry_after is not None else {}
                return status, _error(status, "injected fault"), extra
            if headers.get("authorization") != self.token:
                return 401, {"detail": "Invalid token."}, {}
            if not path.startswith(self.prefix + "/workspace/workspaces/"):
                return 404, _error(404, "Not found."), {}
            parts = path[len(self.prefix + "/workspace/workspaces/"):].strip("/").split("/")
            query = dict(parse_qsl(scope.get("query_string", b"").decode()))
            if parts == [""] and method == "GET":
                return 200, self._list(scope, headers, query), {}
            ws = self.workspaces.get(parts[0])
            if ws is None or (ws.deleted and method != "GET"):
                return 404, _error(404, "Not found."), {}
            self._settle(ws)
            if len(parts) == 1 and method == "GET":
                return 200, ws.to_json(), {}
            if len(parts) == 3 and parts[1] == "actions" and method == "POST":
                return self._action(ws, parts[2])
            return 405, _error(405, "Method not allowed."), {}

    def _list(self, scope: Scope, headers: dict[str, str], query: dict[str, str]
              ) -> dict[str, Any]:
        items = sorted(self.workspaces.values(), key=lambda ws: ws.name)
        for ws in items:
            self._settle(ws)
        if "application_type" in query:
            items = [ws for ws in items if ws.application_type == query["application_type"]]
        if query.get("deleted") == "false":
            items = [ws for ws in items if not ws.deleted]
        if query.get("name"):
            items = [ws for ws in items if query["name"].lower() in ws.name.lower()]
        limit = min(int(query.get("limit", self.page_size)), self.page_size)
        offset = int(query.get("offset", 0))
        page = items[offset : offset + limit]
        host = headers.get("host", "testserver")
        base = f"{scope.get('scheme', 'http')}://{host}{scope['path']}"

        def link(at: int) -> str:
            return f"{base}?{urlencode({**query, 'limit': limit, 'offset': at})}"

        return {
            "count": len(items),
            "next": link(offset + limit) if offset + limit < len(items) else None,
            "previous": link(max(0, offset - limit)) if offset > 0 else None,
            "results": [ws.to_json() for ws in page],
        }

    def _action(self, ws: SimWorkspace, action: str) -> tuple[int, Any, dict[str, str]]:
        if action not in ("resume", "pause"):
            return 400, _error(400, f"Action {action} is not supported here."), {}
        (self.resume_posts if action == "resume" else self.pause_posts)[ws.id] += 1
        if action not in _ALLOWED.get(ws.status, []):
            return 400, _error(
                400, f"Action {action} is not allowed for a workspace in status {ws.status}."
            ), {}
        self._start(ws, action)
        return 200, ws.to_json(), {}  # like SURF: the answer still shows "resuming"


def _error(code: int, message: str) -> dict[str, Any]:
    names = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
             405: "Method Not Allowed", 429: "Too Many Requests", 500: "Internal Server Error",
             502: "Bad Gateway", 503: "Service Unavailable"}
    return {"code": code, "status": names.get(code, "Error"), "message": [message]}
