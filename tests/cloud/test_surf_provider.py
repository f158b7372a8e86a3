"""SurfProvider against the SURF API's real response shapes (pytest-httpx, no network)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import pytest
from pytest_httpx import HTTPXMock

from gpuctl.cloud.surf import SurfProvider
from gpuctl.errors import (
    ActionRefused,
    CloudError,
    CloudRateLimited,
    CloudUnavailable,
    CredentialsError,
    GpuNotFound,
)

from .shapes import BASE, LIST_URL, page, workspace

TOKEN = "s3cret-token"
FIRST_PAGE = {"application_type": "Compute", "deleted": "false", "limit": "100"}
WS_ID = "451226aa-0000-4000-8000-000000000001"
WS_URL = f"{BASE}/workspace/workspaces/{WS_ID}/"


class Sleeps:
    """Records the backoff the provider asks for, without sleeping."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def provider(sleeps: Sleeps) -> AsyncIterator[SurfProvider]:
    p = SurfProvider(BASE + "/", TOKEN, name_filter="ollama", sleep=sleeps, max_retries=3)
    yield p
    await p.aclose()


def list_url(**params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {**FIRST_PAGE, **params}.items())
    return f"{LIST_URL}?{query}"


async def test_list_follows_next_through_every_page(
    provider: SurfProvider, httpx_mock: HTTPXMock
) -> None:
    # ``next`` points at an internal host: only its paging keys are used, on our own URL.
    internal = "http://workspace-svc:8000/workspaces/?application_type=Compute&deleted=false"
    httpx_mock.add_response(url=list_url(), json=page(
        [workspace("ollama-a"), workspace("ollama-b")], next_url=f"{internal}&limit=2&offset=2"))
    httpx_mock.add_response(url=list_url(limit="2", offset="2"), json=page(
        [workspace("ollama-c"), workspace("ollama-d")], next_url=f"{internal}&limit=2&offset=4"))
    httpx_mock.add_response(url=list_url(limit="2", offset="4"), json=page(
        [workspace("ollama-e")]))

    names = [ws.name for ws in await provider.list_workspaces()]

    assert names == ["ollama-a", "ollama-b", "ollama-c", "ollama-d", "ollama-e"]
    assert all(r.url.host == "gw.example.test" for r in httpx_mock.get_requests())


async def test_list_sends_the_bare_token_and_no_bearer_prefix(
    provider: SurfProvider, httpx_mock: HTTPXMock
) -> None:
    httpx_mock.add_response(url=list_url(), json=page([]))

    await provider.list_workspaces()

    request = httpx_mock.get_request()
    assert request is not None
    assert request.headers["authorization"] == TOKEN
    assert "x-csrftoken" not in request.headers


async def test_csrf_token_is_sent_when_given(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=list_url(), json=page([]))
    p = SurfProvider(BASE, TOKEN, csrf_token="csrf-1")
    try:
        await p.list_workspaces()
    finally:
        await p.aclose()
    request = httpx_mock.get_request()
    assert request is not None and request.headers["x-csrftoken"] == "csrf-1"


async def test_name_filter_keeps_only_names_containing_it_case_insensitively(
    provider: SurfProvider, httpx_mock: HTTPXMock
) -> None:
    httpx_mock.add_response(url=list_url(), json=page([
        workspace("LMSTUDIO-Ollama4"), workspace("thesis-rstudio"), workspace("my-ollama"),
        workspace("ollama-cpu-test", flavor="cpu-4core-16gb", size="4 core - 16 GB"),
    ]))

    names = [ws.name for ws in await provider.list_workspaces()]

    # The filter is the selector: a CPU box named for gpuctl is included on purpose.
    assert names == ["LMSTUDIO-Ollama4", "my-ollama", "ollama-cpu-test"]


async def test_empty_filter_keeps_only_gpu_flavours(httpx_mock: HTTPXMock) -> None:
    httpx_mock.add_response(url=list_url(), json=page([
        workspace("a10-box"), workspace("colleague-cpu", flavor="cpu-4core", size="4 core"),
    ]))
    p = SurfProvider(BASE, TOKEN)
    try:
        names = [ws.name for ws in await p.list_workspaces()]
    finally:
        await p.aclose()
    assert names == ["a10-box"]


async def test_deleted_and_non_compute_workspaces_are_left_out_even_if_the_server_sends_them(
    provider: SurfProvider, httpx_mock: HTTPXMock
) -> None:
    httpx_mock.add_response(url=list_url(), json=page([
        workspace("ollama-live"),
        workspace("ollama-gone", deleted=True),
        workspace("ollama-storage", application_type="Storage"),
        workspace("ollama-compute", application_type="Compute"),
    ]))

    names = [ws.name for ws in await provider.list_workspaces()]

    assert names == ["ollama-compute", "ollama-live"]


async def test_workspace_json_maps_to_workspace_fields(
    provider: SurfProvider, httpx_mock: HTTPXMock
) -> None:
    data = workspace("ollama4", id=WS_ID, status="paused", actions=[
        {"type": "pause", "status": "success", "reason": "API", "result": {},
         "time_created": "2026-10-07T12:00:00Z"},
        {"type": "resume", "status": "failed", "reason": "API",
         "result": {"error": "Timeout waiting for VM to resume."},
         "time_created": "2026-10-07T13:03:00Z"},
        {"type": "create", "status": "success", "reason": "API", "result": {},
         "time_created": "2026-10-01T09:00:00Z"},
    ])
    httpx_mock.add_response(url=WS_URL, json=data)

    ws = await provider.get_workspace(WS_ID)

    assert (ws.id, ws.name, ws.status, ws.active) == (WS_ID, "ollama4", "paused", False)
    assert ws.ip == "145.38.194.153"
    assert ws.fqdn == "ollama4.myco.src.surf-hosted.nl"
    assert ws.host_name == "ollama4"
    assert ws.flavor == "gpu-a10-11core-88gb-50gb-2tb"
    assert ws.size == "A10 - 1 GPU"
    assert ws.can_resume and not ws.can_pause
    assert (ws.last_action, ws.last_action_status, ws.last_action_error) == (
        "resume", "failed", "Timeout waiting for VM to resume.")


async def test_fqdn_falls_back_to_meta_and_missing_ip_is_none(
    provider: SurfProvider, httpx_mock: HTTPXMock
) -> None:
    data = workspace("ollama4", id=WS_ID, status="creating", ip=None)
    del data["resource_meta"]["workspace_fqdn"]
    data["meta"]["workspace_fqdn"] = "from-meta.myco.src.surf-hosted.nl"
    httpx_mock.add_response(url=WS_URL, json=data)

    ws = await provider.get_workspace(WS_ID)

    assert ws.ip is None
    assert ws.fqdn == "from-meta.myco.src.surf-hosted.nl"


async def test_unknown_status_is_kept_as_is(
    provider: SurfProvider, httpx_mock: HTTPXMock
) -> None:
    httpx_mock.add_response(url=WS_URL, json=workspace("ollama4", id=WS_ID, status="hibernating"))

    ws = await provider.get_workspace(WS_ID)

    assert ws.status == "hibernating"


async def test_resume_posts_empty_body_and_rereads_the_workspace(
    provider: SurfProvider, httpx_mock: HTTPXMock
) -> None:
    httpx_mock.add_response(method="POST", url=f"{WS_URL}actions/resume/", status_code=202,
                            json={"detail": "accepted"})
    httpx_mock.add_response(method="GET", url=WS_URL,
                            json=workspace("ollama4", id=WS_ID, status="resuming"))

    ws = await provider.resume(WS_ID)

    assert ws.status == "resuming"
    post = httpx_mock.get_request(method="POST")
    assert post is not None and post.content == b"{}"
    assert post.headers["authorization"] == TOKEN


async def test_pause_posts_to_the_pause_action(
    provider: SurfProvider, httpx_mock: HTTPXMock
) -> None:
    httpx_mock.add_response(method="POST", url=f"{WS_URL}actions/pause/",
                            json=workspace("ollama4", id=WS_ID, status="pausing"))
    httpx_mock.add_response(method="GET", url=WS_URL,
                            json=workspace("ollama4", id=WS_ID, status="pausing"))

    ws = await provider.pause(WS_ID)

    assert ws.status == "pausing"


async def test_refused_resume_says_already_resuming(
    provider: SurfProvider, httpx_mock: HTTPXMock
) -> None:
    httpx_mock.add_response(method="POST", url=f"{WS_URL}actions/resume/", status_code=400,
                            json={"code": 400, "status": "Bad Request",
                                  "message": ["Action resume not allowed in status resuming"]})
    httpx_mock.add_response(method="GET", url=WS_URL,
                            json=workspace("ollama4", id=WS_ID, status="resuming"))

    with pytest.raises(ActionRefused) as err:
        await provider.resume(WS_ID)

    assert "already resuming" in err.value.message
    assert "Action resume not allowed in status resuming" in err.value.message
    assert err.value.http_status == 409


@pytest.mark.parametrize("status", [401, 403])
async def test_rejected_token_is_a_credentials_error_with_exit_4(
    provider: SurfProvider, httpx_mock: HTTPXMock, status: int
) -> None:
    httpx_mock.add_response(url=list_url(), status_code=status,
                            json={"detail": "Invalid token."})

    with pytest.raises(CredentialsError) as err:
        await provider.list_workspaces()

    assert err.value.exit_code == 4
    assert TOKEN not in str(err.value) and TOKEN not in (err.value.hint or "")


async def test_unknown_workspace_is_gpu_not_found(
    provider: SurfProvider, httpx_mock: HTTPXMock
) -> None:
    httpx_mock.add_response(url=WS_URL, status_code=404,
                            json={"code": 404, "status": "Not Found", "message": "Not found."})

    with pytest.raises(GpuNotFound):
        await provider.get_workspace(WS_ID)


async def test_rate_limit_waits_retry_after_then_succeeds(
    provider: SurfProvider, httpx_mock: HTTPXMock, sleeps: Sleeps
) -> None:
    httpx_mock.add_response(url=list_url(), status_code=429, headers={"Retry-After": "7"},
                            json={"code": 429, "message": "slow down"})
    httpx_mock.add_response(url=list_url(), json=page([workspace("ollama-a")]))

    workspaces = await provider.list_workspaces()

    assert [ws.name for ws in workspaces] == ["ollama-a"]
    assert sleeps.calls == [7.0]


async def test_rate_limit_beyond_the_bound_is_reported_not_waited(
    provider: SurfProvider, httpx_mock: HTTPXMock, sleeps: Sleeps
) -> None:
    httpx_mock.add_response(url=list_url(), status_code=429, headers={"Retry-After": "3600"})

    with pytest.raises(CloudRateLimited) as err:
        await provider.list_workspaces()

    assert err.value.retry_after == 3600.0
    assert sleeps.calls == []


async def test_server_errors_are_retried_with_growing_backoff_then_succeed(
    provider: SurfProvider, httpx_mock: HTTPXMock, sleeps: Sleeps
) -> None:
    httpx_mock.add_response(url=list_url(), status_code=500)
    httpx_mock.add_response(url=list_url(), status_code=503)
    httpx_mock.add_response(url=list_url(), json=page([workspace("ollama-a")]))

    workspaces = await provider.list_workspaces()

    assert len(workspaces) == 1
    assert sleeps.calls == [0.5, 1.0]


async def test_persistent_server_errors_become_cloud_unavailable_after_bounded_retries(
    provider: SurfProvider, httpx_mock: HTTPXMock, sleeps: Sleeps
) -> None:
    httpx_mock.add_response(url=list_url(), status_code=500, is_reusable=True)

    with pytest.raises(CloudUnavailable) as err:
        await provider.list_workspaces()

    assert len(httpx_mock.get_requests()) == 4  # max_retries=3: one try plus three retries
    assert sleeps.calls == [0.5, 1.0, 2.0]
    assert "HTTP 500" in err.value.message


async def test_timeouts_are_retried(
    provider: SurfProvider, httpx_mock: HTTPXMock, sleeps: Sleeps
) -> None:
    httpx_mock.add_exception(httpx.ReadTimeout("slow"), url=list_url())
    httpx_mock.add_exception(httpx.ConnectError("refused"), url=list_url())
    httpx_mock.add_response(url=list_url(), json=page([workspace("ollama-a")]))

    workspaces = await provider.list_workspaces()

    assert len(workspaces) == 1
    assert len(sleeps.calls) == 2


async def test_action_is_not_resent_after_a_read_timeout(
    provider: SurfProvider, httpx_mock: HTTPXMock
) -> None:
    httpx_mock.add_exception(httpx.ReadTimeout("slow"), method="POST",
                             url=f"{WS_URL}actions/resume/")
    httpx_mock.add_response(method="GET", url=WS_URL,
                            json=workspace("ollama4", id=WS_ID, status="paused"))

    with pytest.raises(CloudUnavailable) as err:
        await provider.resume(WS_ID)

    assert len(httpx_mock.get_requests(method="POST")) == 1
    assert "may have been accepted" in (err.value.hint or "")


async def test_a_timed_out_action_the_read_back_shows_taken_is_a_success(
    provider: SurfProvider, httpx_mock: HTTPXMock
) -> None:
    httpx_mock.add_exception(httpx.ReadTimeout("slow"), method="POST",
                             url=f"{WS_URL}actions/resume/")
    httpx_mock.add_response(method="GET", url=WS_URL,
                            json=workspace("ollama4", id=WS_ID, status="resuming"))

    assert (await provider.resume(WS_ID)).status == "resuming"
    assert len(httpx_mock.get_requests(method="POST")) == 1


@pytest.mark.parametrize("status", [500, 503])
async def test_action_not_taken_after_a_5xx_is_sent_again_with_jittered_backoff(
    provider: SurfProvider, httpx_mock: HTTPXMock, sleeps: Sleeps, status: int
) -> None:
    httpx_mock.add_response(method="POST", url=f"{WS_URL}actions/resume/", status_code=status)
    httpx_mock.add_response(method="GET", url=WS_URL,
                            json=workspace("ollama4", id=WS_ID, status="paused"))
    httpx_mock.add_response(method="POST", url=f"{WS_URL}actions/resume/", status_code=200,
                            json={})
    httpx_mock.add_response(method="GET", url=WS_URL,
                            json=workspace("ollama4", id=WS_ID, status="resuming"))

    ws = await provider.resume(WS_ID)

    assert ws.status == "resuming"
    assert len(httpx_mock.get_requests(method="POST")) == 2
    (delay,) = sleeps.calls
    assert 0.25 <= delay <= 0.5  # backoff 0.5 s, jittered down by up to half


async def test_an_action_taken_despite_a_500_is_not_sent_twice(
    provider: SurfProvider, httpx_mock: HTTPXMock
) -> None:
    httpx_mock.add_response(method="POST", url=f"{WS_URL}actions/resume/", status_code=500)
    # SURF may still show "paused" for a while; the new pending action says it was taken.
    taken = workspace("ollama4", id=WS_ID, status="paused", actions=[
        {"type": "resume", "status": "pending", "time_created": "2026-10-07T13:03:00Z"}])
    httpx_mock.add_response(method="GET", url=WS_URL, json=taken)

    ws = await provider.resume(WS_ID)

    assert (ws.status, ws.last_action, ws.last_action_status) == ("paused", "resume", "pending")
    assert len(httpx_mock.get_requests(method="POST")) == 1


async def test_an_action_failing_every_time_names_the_gpu_but_no_url_or_id(
    provider: SurfProvider, httpx_mock: HTTPXMock, sleeps: Sleeps
) -> None:
    httpx_mock.add_response(method="POST", url=f"{WS_URL}actions/resume/", status_code=500,
                            is_reusable=True)
    httpx_mock.add_response(method="GET", url=WS_URL, is_reusable=True,
                            json=workspace("ollama4", id=WS_ID, status="paused"))

    with pytest.raises(CloudUnavailable) as err:
        await provider.resume(WS_ID)

    assert len(httpx_mock.get_requests(method="POST")) == 4  # max_retries=3: bounded
    assert len(sleeps.calls) == 3
    assert err.value.message == "SURF API failed to resume ollama4: HTTP 500 (tried 4 times)"
    assert "http" not in err.value.message.lower().replace("http 500", "")
    assert WS_ID not in err.value.message


async def test_other_client_errors_are_cloud_errors_with_the_message(
    provider: SurfProvider, httpx_mock: HTTPXMock
) -> None:
    httpx_mock.add_response(url=list_url(), status_code=418,
                            json={"code": 418, "message": ["teapot"]})

    with pytest.raises(CloudError, match=r"HTTP 418.*teapot"):
        await provider.list_workspaces()


async def test_non_json_answer_is_a_cloud_error(
    provider: SurfProvider, httpx_mock: HTTPXMock
) -> None:
    httpx_mock.add_response(url=list_url(), text="<html>maintenance</html>")

    with pytest.raises(CloudError, match="non-JSON"):
        await provider.list_workspaces()


async def test_a_repeating_next_link_stops_instead_of_looping(
    provider: SurfProvider, httpx_mock: HTTPXMock
) -> None:
    looping = f"{LIST_URL}?application_type=Compute&deleted=false&limit=100&offset=1"
    httpx_mock.add_response(url=list_url(), json=page([workspace("ollama-a")],
                                                      next_url=looping))
    httpx_mock.add_response(url=re.compile(r".*offset=1.*"), json=page(
        [workspace("ollama-b")], next_url=looping), is_reusable=True)

    names = [ws.name for ws in await provider.list_workspaces()]

    assert names == ["ollama-a", "ollama-b"]
    assert len(httpx_mock.get_requests()) == 2


def test_repr_does_not_contain_the_token() -> None:
    p = SurfProvider(BASE, TOKEN)
    assert TOKEN not in repr(p)


async def test_verify_reports_how_many_workspaces_the_token_sees(
    provider: SurfProvider, httpx_mock: HTTPXMock
) -> None:
    httpx_mock.add_response(url=list_url(limit="1"), json=page([workspace("a")], count=12))

    assert await provider.verify() == 12


async def test_a_workspace_without_an_id_is_a_cloud_error_not_a_crash(
    provider: SurfProvider, httpx_mock: HTTPXMock
) -> None:
    httpx_mock.add_response(url=WS_URL, json={"name": "x", "status": "running"})

    with pytest.raises(CloudError, match="without an id"):
        await provider.get_workspace(WS_ID)
