"""The SURF Research Cloud workspace API, as a ``CloudProvider``.

What the API does and how we know it is in ``shared/facts/surf-api.md``; the points that shape
this module:

* The token goes bare in ``authorization`` (no ``Bearer``), the CSRF token, when given, in
  ``X-CSRFTOKEN``. Neither is ever logged.
* The list is paginated (``{count, next, previous, results}``) with an unknown default page
  size, so every page is read. Only the *query* of ``next`` is used, applied to our own list
  URL: a gateway behind a proxy may hand out ``next`` links with an internal host or an
  ``http://`` scheme, and following those would leak the token or fail.
* Which workspaces are gpuctl's: the server is asked for ``application_type=Compute`` and
  ``deleted=false`` (and the same is checked again client-side, in case a server ignores a
  filter). Then the **name filter is the primary selector**: a workspace whose name contains
  ``machine_name_filter`` is managed whatever its flavour, because a group may well run an
  Ollama test box on a CPU flavour on purpose. With an *empty* filter, only workspaces with a
  GPU flavour (``gpu`` in ``resource_meta.flavor_name`` or in the size name) are taken, so an
  unconfigured gpuctl never starts managing (and auto-pausing) a colleague's CPU machines.
* Actions accept any 2xx and the workspace is re-read afterwards (the action's body shape
  is not reliable). A 400 is a refusal; the reason is built from the body's ``message`` and
  the workspace's current status ("already resuming").
* 429 honours ``Retry-After`` up to a bound; 5xx, timeouts and connection failures are retried
  with bounded exponential backoff. An action POST is never retried blindly: after a 5xx the
  workspace is read back to learn whether the cloud took the action anyway (a new action of
  that type in progress, or the status moving that way), and only if it did not is the POST
  sent again, with jittered backoff, up to ``max_retries`` times (fault run 3 of issue 9: at
  50 % cloud errors, a 500 on a resume was taken as the end of that GPU). After a timeout or
  a broken connection the read-back decides too, but a POST the cloud may still be working
  through is not resent: the caller is told it may have been accepted.
* Error messages name the workspace, never the API's URLs or ids: they reach API users.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import httpx

from gpuctl.cloud.base import Workspace
from gpuctl.errors import (
    ActionRefused,
    ActionUncertain,
    CloudError,
    CloudRateLimited,
    CloudUnavailable,
    CredentialsError,
    GpuNotFound,
)

__all__ = ["SurfProvider", "workspace_from_json"]

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]

#: Page size asked for; SURF's own portal tools use 100.
PAGE_LIMIT = 100
#: Never follow more pages than this (a server repeating ``next`` must not loop us forever).
MAX_PAGES = 1000
#: Longest ``Retry-After`` we wait out in-process; beyond it the caller is told to come back.
MAX_RETRY_AFTER = 60.0
#: Statuses retried for any request, and for action POSTs (the cloud did not act on these).
_RETRY_STATUSES = frozenset({500, 502, 503, 504})
_ACTIONS = ("resume", "pause")


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _newest_action(actions: object) -> Mapping[str, Any] | None:
    """The newest ``workspace_actions`` entry: latest ``time_created``, list order breaking ties."""
    if not isinstance(actions, list):
        return None
    entries = [(str(a.get("time_created") or ""), i, a) for i, a in enumerate(actions)
               if isinstance(a, Mapping)]
    if not entries:
        return None
    return max(entries, key=lambda entry: (entry[0], entry[1]))[2]


def workspace_from_json(data: Mapping[str, Any]) -> Workspace:
    """Map one workspace object of the SURF API to a ``Workspace``; tolerant of missing keys
    (an IP appears minutes into ``creating``), but a workspace needs its id."""
    if not data.get("id"):
        raise CloudError("SURF API sent a workspace without an id")
    resource_meta = data.get("resource_meta") or {}
    meta = data.get("meta") or {}
    if not isinstance(resource_meta, Mapping):
        resource_meta = {}
    if not isinstance(meta, Mapping):
        meta = {}
    size = None
    flavours = meta.get("flavours")
    if isinstance(flavours, list):
        for flavour in flavours:
            if isinstance(flavour, Mapping) and flavour.get("category") == "size":
                size = _text(flavour.get("name"))
                break
    allowed = data.get("allowed_actions")
    if not isinstance(allowed, list):
        fallback = data.get("actions")  # also a list of allowed names, not history
        allowed = fallback if isinstance(fallback, list) else []
    newest = _newest_action(data.get("workspace_actions"))
    error = None
    if newest is not None and isinstance(newest.get("result"), Mapping):
        error = _text(newest["result"].get("error"))
    return Workspace(
        id=str(data["id"]),
        name=str(data.get("name") or data["id"]),
        status=str(data.get("status") or "unknown"),
        active=bool(data.get("active")),
        ip=_text(resource_meta.get("ip")),
        fqdn=_text(resource_meta.get("workspace_fqdn")) or _text(meta.get("workspace_fqdn")),
        host_name=_text(meta.get("host_name")),
        flavor=_text(resource_meta.get("flavor_name")),
        size=size,
        allowed_actions=tuple(str(a) for a in allowed),
        last_action=_text(newest.get("type")) if newest else None,
        last_action_status=_text(newest.get("status")) if newest else None,
        last_action_error=error,
    )


def _is_listed(data: Mapping[str, Any]) -> bool:
    """Client-side echo of the server filters: Compute only, not deleted."""
    app_type = data.get("application_type")
    if app_type is None and isinstance(data.get("meta"), Mapping):
        app_type = data["meta"].get("application_type")
    if app_type is not None and str(app_type).lower() != "compute":
        return False
    return not (data.get("status") == "deleted" or data.get("time_deleted"))


def _looks_like_gpu(ws: Workspace) -> bool:
    return any("gpu" in (text or "").lower() for text in (ws.flavor, ws.size))


def _message_of(response: httpx.Response) -> str:
    """The human part of a SURF error body (``message`` may be a string or a list)."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200]
    if not isinstance(body, Mapping):
        return ""
    message = body.get("message", body.get("detail", ""))
    if isinstance(message, list):
        return "; ".join(str(m) for m in message)
    return str(message)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare enough to fall back to our own backoff


class SurfProvider:
    """``CloudProvider`` for SURF Research Cloud (``cloud_api.provider = "surf"``)."""

    managed = True

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        csrf_token: str | None = None,
        name_filter: str = "",
        http: httpx.AsyncClient | None = None,
        sleep: Sleep = asyncio.sleep,
        max_retries: int = 4,
        backoff_seconds: float = 0.5,
        max_backoff_seconds: float = 8.0,
        timeout: float = 30.0,
        token_source: str | None = None,
    ) -> None:
        if not token:
            raise CredentialsError("no SURF API token given")
        self.base_url = base_url.rstrip("/")
        self.name_filter = name_filter
        #: Where the token came from ("environment variable GPUCTL_API_TOKEN"), so that a
        #: rejection can say which token was rejected without showing it.
        self.token_source = token_source
        self._headers = {"authorization": token, "accept": "application/json"}
        if csrf_token:
            self._headers["x-csrftoken"] = csrf_token
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0))
        self._sleep = sleep
        self._max_retries = max(0, max_retries)
        self._backoff = backoff_seconds
        self._max_backoff = max_backoff_seconds

    def __repr__(self) -> str:  # the token stays out of reprs, logs and tracebacks
        return f"SurfProvider({self.base_url!r}, name_filter={self.name_filter!r})"

    # -- the CloudProvider protocol -------------------------------------------------------

    async def list_workspaces(self) -> list[Workspace]:
        """Every matching Compute workspace, across all pages, sorted by name."""
        found: dict[str, Workspace] = {}
        for data in await self._list_raw():
            if not _is_listed(data):
                continue
            ws = workspace_from_json(data)
            if self._selected(ws):
                found[ws.id] = ws
        return sorted(found.values(), key=lambda ws: (ws.name, ws.id))

    async def get_workspace(self, workspace_id: str) -> Workspace:
        response = await self._request("GET", self._workspace_url(workspace_id))
        return workspace_from_json(self._json_object(response))

    async def resume(self, workspace_id: str) -> Workspace:
        return await self._action(workspace_id, "resume")

    async def pause(self, workspace_id: str) -> Workspace:
        return await self._action(workspace_id, "pause")

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    # -- extras ---------------------------------------------------------------------------

    async def verify(self) -> int:
        """One cheap authenticated call; returns how many Compute workspaces the token sees.

        Raises ``CredentialsError`` when the API rejects the token (``auth status``).
        """
        response = await self._request(
            "GET", self._list_url(), params={**self._list_params(), "limit": "1"}
        )
        body = self._json_object(response)
        count = body.get("count")
        return int(count) if isinstance(count, int) else len(body.get("results") or [])

    # -- internals ------------------------------------------------------------------------

    def _selected(self, ws: Workspace) -> bool:
        if self.name_filter:
            return self.name_filter.lower() in ws.name.lower()
        return _looks_like_gpu(ws)

    def _list_url(self) -> str:
        return f"{self.base_url}/workspace/workspaces/"

    def _workspace_url(self, workspace_id: str) -> str:
        return f"{self.base_url}/workspace/workspaces/{quote(workspace_id, safe='')}/"

    @staticmethod
    def _list_params() -> dict[str, str]:
        return {"application_type": "Compute", "deleted": "false", "limit": str(PAGE_LIMIT)}

    async def _list_raw(self) -> list[Mapping[str, Any]]:
        params: dict[str, str] = self._list_params()
        results: list[Mapping[str, Any]] = []
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            response = await self._request("GET", self._list_url(), params=params)
            body = self._json_object(response)
            page = body.get("results")
            if not isinstance(page, list):
                raise CloudError("SURF API sent a workspace list without results")
            results.extend(item for item in page if isinstance(item, Mapping) and "id" in item)
            next_url = body.get("next")
            if not next_url or not page:
                return results
            # Keep our own endpoint and filters; take only paging keys from ``next``.
            next_params = dict(parse_qsl(urlsplit(str(next_url)).query))
            key = urlencode(sorted(next_params.items()))
            if key in seen:
                log.warning("SURF list repeated a page (%s); stopping there", key)
                return results
            seen.add(key)
            params = {**self._list_params(), **next_params}
        log.warning("SURF list has more than %d pages; reading stopped", MAX_PAGES)
        return results

    async def _action(self, workspace_id: str, action: str) -> Workspace:
        """POST the action; after a 5xx, read back whether it was taken, resend if not."""
        assert action in _ACTIONS
        url = f"{self._workspace_url(workspace_id)}actions/{action}/"
        for attempt in range(self._max_retries + 1):
            try:
                await self._request("POST", url, json={})
            except _Refused as refused:
                current = await self.get_workspace(workspace_id)
                raise ActionRefused(_refusal_reason(action, current, refused.message)) from None
            except _PostFailed as failed:
                current = await self.get_workspace(workspace_id)
                if current.shows(action):
                    log.info("SURF answered %s to the %s of %s, but took it", failed.problem,
                             action, current.name)
                    return current
                if not failed.resendable:
                    raise ActionUncertain(
                        f"SURF API did not answer the {action} of {current.name}: "
                        f"{failed.problem}") from None
                if attempt == self._max_retries:
                    raise CloudUnavailable(
                        f"SURF API failed to {action} {current.name}: {failed.problem}"
                        + (f" (tried {attempt + 1} times)" if attempt else "")) from None
                log.warning("SURF answered %s to the %s of %s and did not take it; sending "
                            "it again", failed.problem, action, current.name)
                await self._sleep(self._backoff_delay(attempt) * random.uniform(0.5, 1.0))
                continue
            return await self.get_workspace(workspace_id)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _backoff_delay(self, attempt: int) -> float:
        return float(min(self._max_backoff, self._backoff * (2**attempt)))

    async def _request(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
    ) -> httpx.Response:
        """Send one request with retries; return a 2xx response or raise a ``GpuctlError``.

        A POST is sent once (bar 429s): a 5xx, a timeout or a broken connection raises
        ``_PostFailed`` for ``_action`` to read back.
        """
        is_post = method != "GET"
        what = "list the workspaces" if url == self._list_url() else "read a workspace"
        headers = dict(self._headers)
        last_problem = "no attempt made"
        for attempt in range(self._max_retries + 1):
            final = attempt == self._max_retries
            try:
                response = await self._http.request(
                    method, url, params=params, json=json, headers=headers
                )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                last_problem = f"cannot connect ({type(exc).__name__})"
                if is_post:  # never sent: safe to send again
                    raise _PostFailed(last_problem, resendable=True) from None
            except httpx.TimeoutException as exc:
                last_problem = f"no answer in time ({type(exc).__name__})"
                if is_post:  # the cloud may still act on it: do not send the action twice
                    raise _PostFailed(last_problem, resendable=False) from None
            except httpx.TransportError as exc:
                last_problem = f"connection failed ({type(exc).__name__})"
                if is_post:
                    raise _PostFailed(last_problem, resendable=False) from None
            else:
                log.debug("%s %s -> %d", method, url, response.status_code)
                status = response.status_code
                if 200 <= status < 300:
                    return response
                if status == 429:
                    wait = _retry_after(response)
                    if final or (wait is not None and wait > MAX_RETRY_AFTER):
                        raise CloudRateLimited(
                            "SURF API rate limit reached"
                            + (f" (asked to wait {wait:g} s)" if wait is not None else ""),
                            retry_after=wait,
                        )
                    await self._sleep(wait if wait is not None else self._backoff_delay(attempt))
                    continue
                if status >= 500 and is_post:
                    raise _PostFailed(f"HTTP {status}", resendable=True)
                if status in _RETRY_STATUSES:
                    last_problem = f"HTTP {status}"
                else:
                    self._raise_for(status, response, method, url)
            if final:
                break
            await self._sleep(self._backoff_delay(attempt))
        raise CloudUnavailable(
            f"SURF API failed to {what}: {last_problem} (tried {self._max_retries + 1} times)"
        )

    def _raise_for(
        self, status: int, response: httpx.Response, method: str, url: str
    ) -> NoReturn:
        message = _message_of(response)
        if status in (401, 403):
            source = f" from {self.token_source}" if self.token_source else ""
            raise CredentialsError(
                f"SURF API rejected the token{source} (HTTP {status}"
                + (f": {message})" if message else ")"),
                hint="The token may be expired or lack access to this collaborative "
                "organisation. Create a new one in the SURF Research Cloud portal "
                "(Profile → API tokens) and run `gpuctl auth login`.",
            )
        log.debug("SURF API answered HTTP %d to %s %s", status, method, url)
        if status == 404:
            raise GpuNotFound("SURF API knows no such workspace")
        if status == 400 and method == "POST":
            raise _Refused(message)
        if 500 <= status < 600:
            raise CloudUnavailable(f"SURF API failed: HTTP {status}")
        raise CloudError(f"SURF API answered HTTP {status}" + (f": {message}" if message else ""))

    @staticmethod
    def _json_object(response: httpx.Response) -> Mapping[str, Any]:
        try:
            body = response.json()
        except ValueError:
            log.debug("non-JSON answer from %s", response.url)
            raise CloudError("SURF API sent a non-JSON answer") from None
        if not isinstance(body, Mapping):
            log.debug("unexpected answer from %s", response.url)
            raise CloudError("SURF API sent an answer that is not a JSON object")
        return body


class _PostFailed(Exception):
    """Internal: an action POST got no clear answer; ``_action`` reads back what happened.

    ``resendable``: the cloud answered 5xx or the request never left, so sending it again
    cannot start a second action the first one did not (a read-back has said it was not
    taken). After a timeout the cloud may still be working through the first one.
    """

    def __init__(self, problem: str, *, resendable: bool) -> None:
        super().__init__(problem)
        self.problem = problem
        self.resendable = resendable


class _Refused(Exception):
    """Internal: the cloud answered 400 to an action; turned into ``ActionRefused``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _refusal_reason(action: str, ws: Workspace, message: str) -> str:
    """A clear reason for a refused action: "already resuming", plus the cloud's own words."""
    status = ws.status
    already = {"resume": ("resuming", "running"), "pause": ("pausing", "paused")}
    reason = f"it is already {status}" if status in already[action] else f"it is {status}"
    text = f"SURF refused to {action} {ws.name}: {reason}"
    return f"{text} ({message})" if message else text
