"""A fake SURF Research Cloud workspace API: an HTTP face over a ``SimCloud``.

It answers with the real shapes (``shared/facts/surf-api.md``): the paginated list with
absolute ``next`` URLs, ``application_type`` / ``deleted`` / ``name`` filters, one workspace,
and the ``resume`` / ``pause`` actions. The workspaces and their status walk (paused →
resuming → running, running → pausing → paused, a failing resume falling back to paused
with "Timeout waiting for VM to resume.", the counts of every action asked for) are those of
the ``SimCloud`` behind it (``sim.cloud``): the state machine lives there only, so a cloud a
test or the demo drives directly can also be served over HTTP. Timing is the cloud's: its
clock, or ``settle_after_reads`` (a transition ends at the N-th read of its workspace) for
callers that cannot move a clock. What is HTTP stays here: the token check, the JSON shapes,
pagination, and per-request fault injection (the next N requests answered 500, 429, 401...).

Serve it with ``gpuctl.sim.servers.running`` or ``ServerThread``; the provider's base URL
is ``<server url>/v1``.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import uuid
from collections import Counter, deque
from datetime import datetime, timezone
from typing import Any
from urllib.parse import parse_qsl, urlencode

from gpuctl.engine.clock import Clock, SystemClock
from gpuctl.errors import ActionRefused, GpuNotFound
from gpuctl.sim.asgi import Receive, Scope, Send, answer_lifespan
from gpuctl.sim.cloud import RESUME_FAILURE, SimAction, SimCloud, SimMachine

__all__ = ["RESUME_FAILURE", "SurfApiSim", "workspace_json"]



def _stamp(wall: float | None) -> str | None:
    if wall is None:
        return None
    stamp = datetime.fromtimestamp(wall, tz=timezone.utc)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _action_json(action: SimAction) -> dict[str, Any]:
    result: dict[str, Any] | None = None
    if action.status == "success":
        result = {}
    elif action.status == "failed":
        result = {"error": action.error}
    return {
        "id": action.id,
        "type": action.kind,
        "status": action.status,
        "reason": "API",
        "result": result,
        "time_created": _stamp(action.created),
        "time_updated": _stamp(action.updated),
        "issuer_display_name": None,
    }


def workspace_json(machine: SimMachine) -> dict[str, Any]:
    """One workspace as SURF's API shows it."""
    resource_meta: dict[str, Any] = {
        "workspace_fqdn": machine.fqdn,
        "flavor_name": machine.flavor,
        "instance_user": "ubuntu",
        "vm_id": f"vm-{machine.id[:8]}",
    }
    if machine.ip:
        resource_meta["ip"] = machine.ip
    allowed = list(machine.allowed_actions)
    return {
        "id": machine.id,
        "name": machine.name,
        "description": "",
        "status": machine.status,
        "active": machine.status == "running",
        "actions": allowed,
        "allowed_actions": allowed,
        "workspace_actions": [_action_json(a) for a in machine.actions],
        "deletable": True,
        "editable": True,
        "resource_meta": resource_meta,
        "meta": {
            "host_name": machine.host,
            "workspace_fqdn": machine.fqdn,
            "co_name": "myco",
            "wallet_name": "gpu-wallet",
            "subscription_name": "SURF HPC Cloud",
            "flavours": [
                {"name": "Ubuntu 22.04", "category": "os"},
                {"name": machine.size, "category": "size"},
            ],
        },
        "end_time": "2026-12-31T23:59:59Z",
        "time_created": "2026-10-01T09:00:00Z",
        "time_deleted": "2026-10-02T09:00:00Z" if machine.deleted else None,
        "wallet_id": "wallet-1",
        "owner_id": "owner-1",
        "co_id": "co-1",
        "network_security_group_rules": ["in tcp 22 22 0.0.0.0/0 immutable"],
    }


class SurfApiSim:
    """The fake API. ``await sim(scope, receive, send)`` is the ASGI entry point.

    ``cloud``: the ``SimCloud`` to serve; without one, a new one is made from ``clock`` (the
    system clock by default) and the timing options, which are ignored when ``cloud`` is
    given."""

    def __init__(
        self,
        *,
        cloud: SimCloud | None = None,
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
        self.cloud = cloud or SimCloud(
            clock or SystemClock(), resume_seconds=resume_seconds, pause_seconds=pause_seconds,
            failed_resume_seconds=failed_resume_seconds, settle_after_reads=settle_after_reads)
        self.token = token
        self.page_size = page_size
        self.prefix = prefix.rstrip("/")
        # Bounded, so a long-running demo does not grow without end.
        self.requests: deque[tuple[str, str]] = deque(maxlen=history)
        self.headers_seen: deque[dict[str, str]] = deque(maxlen=history)
        self.lock = threading.Lock()  # tests poke state from another thread (ServerThread)
        self._faults: list[tuple[int, float | None]] = []
        self._flaky: tuple[float, int, bool] | None = None
        self._gate: threading.Event | None = None
        self._gate_drop = False
        #: Action POSTs waiting on ``hold_actions``.
        self.held_actions = 0
        #: The requests answered with an injected fault, as (method, path).
        self.faulted: deque[tuple[str, str]] = deque(maxlen=history)
        self._rng = random.Random(0)

    # -- the cloud behind ------------------------------------------------------------------

    @property
    def clock(self) -> Clock:
        return self.cloud.clock

    @property
    def settle_after_reads(self) -> int | None:
        return self.cloud.settle_after_reads

    @settle_after_reads.setter
    def settle_after_reads(self, reads: int | None) -> None:
        with self.lock:
            self.cloud.settle_after_reads = reads

    @property
    def workspaces(self) -> dict[str, SimMachine]:
        return self.cloud.machines

    @property
    def resume_posts(self) -> Counter[str]:
        """Resume actions asked for, per workspace id, refused ones included."""
        return self.cloud.resume_calls

    @property
    def pause_posts(self) -> Counter[str]:
        return self.cloud.pause_calls

    # -- set-up and fault injection --------------------------------------------------------

    def add(self, name: str, *, id: str | None = None, status: str = "paused",
            **fields: Any) -> SimMachine:
        """A workspace in the cloud behind (``SimCloud.add``), with a SURF-like uuid id."""
        with self.lock:
            return self.cloud.add(name, id=id or str(uuid.uuid4()), status=status, **fields)

    def fail_requests(self, count: int = 1, *, status: int = 500,
                      retry_after: float | None = None) -> None:
        """Answer the next ``count`` requests with ``status`` (and ``Retry-After`` if given)."""
        with self.lock:
            self._faults.extend([(status, retry_after)] * count)

    def fail_randomly(self, rate: float, *, status: int = 500, seed: int = 0,
                      acted: bool = False) -> None:
        """From now on answer a fraction ``rate`` of requests with ``status`` (seeded, so a
        run repeats); ``acted``: an action answered so was carried out all the same (the
        cloud failed after taking it). ``rate=0`` ends it."""
        with self.lock:
            self._flaky = (rate, status, acted) if rate > 0 else None
            self._rng = random.Random(seed)

    def hold_actions(self) -> None:
        """From now on, action POSTs wait unanswered (and not carried out) until
        ``release_actions``: the window between a gateway recording an action and the cloud
        getting it, held open (``held_actions`` counts the waiting ones)."""
        with self.lock:
            self._gate = threading.Event()
            self._gate_drop = False

    def release_actions(self, *, drop: bool = False) -> None:
        """Let held action POSTs go on; ``drop``: answer them 503 without acting, as if
        they never reached the cloud (their sender was killed)."""
        with self.lock:
            gate, self._gate = self._gate, None
            self._gate_drop = drop
        if gate is not None:
            gate.set()

    def fail_next_resume(self, workspace_id: str) -> None:
        """The next resume of this workspace fails (after the cloud's failed-resume time)."""
        with self.lock:
            self.cloud.fail_next_resume(workspace_id)

    def by_name(self, name: str) -> SimMachine:
        return self.cloud.find(name)

    # -- ASGI ------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        status: int
        body: Any
        extra: dict[str, str]
        gate = self._gate
        if gate is not None and scope["method"] == "POST":
            self.held_actions += 1
            await asyncio.to_thread(gate.wait, 60.0)  # bounded: a test forgetting to release
            self.held_actions -= 1
            if self._gate_drop:  # it never reached the cloud
                status, body, extra = 503, _error(503, "dropped"), {}
            else:
                status, body, extra = self._handle(scope, headers)
        else:
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
            flaky = self._flaky
            if flaky is not None and self._rng.random() < flaky[0]:
                _, status, acted = flaky
                if acted:  # carry it out, then answer the fault
                    self._route(scope, headers, method, path)
                self.faulted.append((method, path))
                return status, _error(status, "injected fault"), {}
            return self._route(scope, headers, method, path)

    def _route(self, scope: Scope, headers: dict[str, str], method: str, path: str
               ) -> tuple[int, Any, dict[str, str]]:
        """Answer one request (the caller holds ``self.lock``)."""
        if headers.get("authorization") != self.token:
            return 401, {"detail": "Invalid token."}, {}
        if not path.startswith(self.prefix + "/workspace/workspaces/"):
            return 404, _error(404, "Not found."), {}
        parts = path[len(self.prefix + "/workspace/workspaces/"):].strip("/").split("/")
        query = dict(parse_qsl(scope.get("query_string", b"").decode()))
        if parts == [""] and method == "GET":
            return 200, self._list(scope, headers, query), {}
        machine = self.cloud.machines.get(parts[0])
        if machine is None or (machine.deleted and method != "GET"):
            return 404, _error(404, "Not found."), {}
        if len(parts) == 1 and method == "GET":
            return 200, workspace_json(self.cloud.machine_now(machine.id)), {}
        if len(parts) == 3 and parts[1] == "actions" and method == "POST":
            return self._action(machine, parts[2])
        return 405, _error(405, "Method not allowed."), {}

    def _list(self, scope: Scope, headers: dict[str, str], query: dict[str, str]
              ) -> dict[str, Any]:
        items = sorted(self.cloud.machines_now(), key=lambda m: m.name)
        if "application_type" in query:
            items = [m for m in items if m.application_type == query["application_type"]]
        if query.get("deleted") == "false":
            items = [m for m in items if not m.deleted]
        if query.get("name"):
            items = [m for m in items if query["name"].lower() in m.name.lower()]
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
            "results": [workspace_json(m) for m in page],
        }

    def _action(self, machine: SimMachine, action: str) -> tuple[int, Any, dict[str, str]]:
        start = {"resume": self.cloud.resume_now, "pause": self.cloud.pause_now}.get(action)
        if start is None:
            return 400, _error(400, f"Action {action} is not supported here."), {}
        try:
            machine = start(machine.id)
        except ActionRefused:
            return 400, _error(
                400, f"Action {action} is not allowed for a workspace in status "
                     f"{machine.status}."), {}
        except GpuNotFound:
            return 404, _error(404, "Not found."), {}
        return 200, workspace_json(machine), {}  # like SURF: the answer still shows "resuming"


def _error(code: int, message: str) -> dict[str, Any]:
    names = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
             405: "Method Not Allowed", 429: "Too Many Requests", 500: "Internal Server Error",
             502: "Bad Gateway", 503: "Service Unavailable"}
    return {"code": code, "status": names.get(code, "Error"), "message": [message]}
