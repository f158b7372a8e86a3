"""The fleet of a running ``gpuctl serve --demo``, seen through its gateway.

The demo's fleet lives inside the serving process, so ``gpuctl status --demo`` and
``discover --demo`` ask that process: ``serve --demo`` publishes where it listens and its
demo key in ``<cache dir>/demo.json`` (readable by the user only, removed at exit), and these
commands call the gateway's admin API (``GET /gpu/discover``, ``GET /gpu/{ref}/status``) and
rebuild the ``GpuView`` objects the usual renderer prints. A file left behind by a demo that
died is recognised by its process id and ignored. ``gpuctl top`` reads ``GET /gpu/overview``
of the demo or of any gateway (``gateway_overview``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from gpuctl.engine.api import ActionResult, GpuView
from gpuctl.errors import CredentialsError, GpuctlError, GpuNotFound, UsageError

__all__ = ["DEMO_FILE", "DemoEndpoint", "GatewayGone", "NoDemoRunning", "demo_action",
           "demo_gpu", "demo_gpus", "find_demo", "gateway_get", "gateway_overview",
           "published_demo"]

DEMO_FILE = "demo.json"
_TIMEOUT = httpx.Timeout(10.0, connect=3.0)


class NoDemoRunning(GpuctlError):
    default_hint = "Start one with `gpuctl serve --demo` (in another terminal), then retry."


class DemoEndpoint(BaseModel):
    """Where a running demo listens, and the key to ask it with."""

    url: str
    key: str
    pid: int


@contextlib.contextmanager
def published_demo(path: Path, url: str, key: str) -> Iterator[DemoEndpoint]:
    """Write ``path`` while the block runs; remove it after, unless another demo took it over."""
    endpoint = DemoEndpoint(url=url, key=key, pid=os.getpid())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{endpoint.pid}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds a key
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        file.write(endpoint.model_dump_json(indent=2) + "\n")
    os.replace(tmp, path)
    try:
        yield endpoint
    finally:
        with contextlib.suppress(GpuctlError, OSError):
            if _read(path).pid == endpoint.pid:
                path.unlink()


def find_demo(path: Path) -> DemoEndpoint:
    """The running demo, or ``NoDemoRunning``."""
    if not path.exists():
        raise NoDemoRunning("no `gpuctl serve --demo` is running (found no demo.json)")
    endpoint = _read(path)
    if not _alive(endpoint.pid):
        raise NoDemoRunning(f"the demo that wrote {path} (process {endpoint.pid}) has ended")
    return endpoint


def demo_gpus(endpoint: DemoEndpoint) -> list[GpuView]:
    """Every GPU of the demo fleet, as ``gpuctl status`` shows them."""
    body = _get(endpoint, "/gpu/discover")
    return [_view(entry) for entry in body.get("gpus") or []]


def demo_gpu(endpoint: DemoEndpoint, ref: str) -> GpuView:
    """One GPU of the demo fleet by id, name or unique name prefix."""
    return _view(_get(endpoint, f"/gpu/{quote(ref, safe='')}/status"))


def _read(path: Path) -> DemoEndpoint:
    try:
        return DemoEndpoint.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError) as exc:
        raise NoDemoRunning(f"cannot read {path}: {type(exc).__name__}") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, though not likely ours
    return True


def demo_action(endpoint: DemoEndpoint, ref: str, action: str, *, wait: bool,
                timeout: float | None = None) -> ActionResult:
    """``gpuctl resume|pause --demo``: the demo gateway's ``POST /gpu/{ref}/{action}``."""
    params = {"wait": "1"} if wait else None
    if params is not None and timeout is not None:
        params["timeout"] = f"{timeout:g}"
    body = _get(endpoint, f"/gpu/{quote(ref, safe='')}/{action}", method="POST",
                params=params, timeout=httpx.Timeout(None if wait else 10.0, connect=3.0))
    gpu = demo_gpu(endpoint, str(body.get("gpu_id") or ref))
    return ActionResult(success=bool(body.get("success")), message=str(body.get("message")),
                        gpu=gpu, elapsed_seconds=float(body.get("elapsed_seconds") or 0.0))


def _get(endpoint: DemoEndpoint, path: str, *, method: str = "GET",
         params: dict[str, str] | None = None,
         timeout: httpx.Timeout = _TIMEOUT) -> dict[str, Any]:
    try:
        return gateway_get(endpoint.url, endpoint.key, path, params, method=method,
                           timeout=timeout)
    except GatewayGone as exc:
        raise NoDemoRunning(f"the demo at {endpoint.url} does not answer "
                            f"({exc.reason})") from None
    except GpuNotFound as exc:
        raise GpuNotFound(exc.message,
                          hint="Run `gpuctl discover --demo` to see the demo's GPUs.") from None


class GatewayGone(GpuctlError):
    """The gateway did not answer at all (not running, wrong URL, network down)."""

    default_hint = "Check the URL (--url or GPUCTL_GATEWAY_URL) and that the gateway runs."

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"the gateway at {url} does not answer ({reason})")
        self.reason = reason


def gateway_get(url: str, key: str, path: str, params: dict[str, str] | None = None, *,
                method: str = "GET", timeout: httpx.Timeout = _TIMEOUT) -> dict[str, Any]:
    """GET (or ``method``) ``path`` of a running gateway with ``key`` (in a header, never in
    the URL)."""
    url = url.rstrip("/")
    endpoint = DemoEndpoint(url=url, key=key, pid=0)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        response = httpx.request(method, f"{url}{path}", headers=headers, params=params,
                                 timeout=timeout)
    except httpx.HTTPError as exc:
        raise GatewayGone(url, type(exc).__name__) from None
    if response.status_code in (401, 403):
        raise CredentialsError(f"the gateway at {url} refused the key "
                               f"(HTTP {response.status_code})",
                               hint="Pass a valid key with --key or GPUCTL_GATEWAY_KEY.")
    return _body(endpoint, path, response)


def _body(endpoint: DemoEndpoint, path: str, response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if response.status_code == 404 and error:
        raise GpuNotFound(str(error))
    if response.status_code == 400 and error:
        raise UsageError(str(error))
    if response.status_code != 200 or not isinstance(body, dict):
        raise GpuctlError(f"the gateway at {endpoint.url} answered {path} with HTTP "
                          f"{response.status_code}" + (f": {error}" if error else ""))
    return body


def gateway_overview(url: str, key: str) -> dict[str, Any]:
    """``GET /gpu/overview`` of a running gateway: what ``gpuctl top`` shows."""
    body = gateway_get(url, key, "/gpu/overview")
    if "fleet" not in body:
        raise GpuctlError(f"the gateway at {url} sent no fleet in /gpu/overview",
                          hint="Is it a gpuctl gateway of this version?")
    return body


def _view(entry: Any) -> GpuView:
    try:
        return GpuView.model_validate(entry)
    except ValidationError as exc:
        raise GpuctlError(f"the demo sent a GPU this gpuctl cannot read: "
                          f"{json.dumps(exc.errors(include_url=False)[0], default=str)}",
                          hint="Run `gpuctl serve --demo` and `gpuctl status --demo` from the "
                               "same installation.") from None
