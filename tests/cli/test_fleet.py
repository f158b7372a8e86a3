"""discover / status / resume / pause through Typer's runner, against the simulated SURF API
and a simulated Ollama node on real loopback sockets."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from gpuctl.cli.gpucache import complete_gpu, read_cache
from gpuctl.cloud.surf import SurfProvider
from gpuctl.config import cache_dir

from .conftest import TOKEN, Cloud, Gpuctl, no_sleep


def add_fleet(cloud: Cloud) -> None:
    """Five matching GPUs across three pages (page size 2), plus workspaces to leave out."""
    for name in ("gpu-a", "gpu-b", "gpu-c", "gpu-d", "gpu-e"):
        cloud.sim.add(name, id=f"id-{name}", ip="127.0.0.1")
    cloud.sim.add("thesis-rstudio", ip="127.0.0.1")          # name does not match
    cloud.sim.add("gpu-old", deleted=True, ip="127.0.0.1")    # deleted
    cloud.sim.add("gpu-disk", application_type="Storage")     # not Compute


def test_discover_lists_exactly_the_filtered_workspaces_across_pages(
    cloud: Cloud, gpuctl_on: Gpuctl
) -> None:
    add_fleet(cloud)

    result = gpuctl_on("discover", "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["discovered_gpus"] == 5
    assert [g["name"] for g in data["gpus"]] == ["gpu-a", "gpu-b", "gpu-c", "gpu-d", "gpu-e"]
    list_calls = [p for m, p in cloud.sim.requests if m == "GET" and p.endswith("workspaces/")]
    assert len(list_calls) >= 3  # page size 2: every page was read


def test_discover_json_has_stable_keys(cloud: Cloud, gpuctl_on: Gpuctl) -> None:
    cloud.sim.add("gpu-a", ip="127.0.0.1")

    data = json.loads(gpuctl_on("discover", "--json").stdout)

    assert list(data) == ["discovered_gpus", "gpus"]
    assert list(data["gpus"][0])[:6] == ["id", "name", "state", "cloud_status", "ip", "fqdn"]
    assert data["gpus"][0]["cloud_status"] == "paused"
    assert data["gpus"][0]["can_resume"] is True


def test_discover_prints_a_table_with_data_on_stdout_only(
    cloud: Cloud, gpuctl_on: Gpuctl
) -> None:
    cloud.sim.add("gpu-a", ip="127.0.0.1")

    result = gpuctl_on("discover")

    assert result.exit_code == 0
    assert "gpu-a" in result.stdout and "NAME" in result.stdout
    assert result.stderr == ""


def test_discover_with_no_match_says_so_on_stderr(cloud: Cloud, gpuctl_on: Gpuctl) -> None:
    cloud.sim.add("thesis-rstudio")

    result = gpuctl_on("discover")

    assert result.exit_code == 0
    assert result.stdout == ""
    assert "No GPU workspaces match the filter 'gpu'" in result.stderr


def test_discover_caches_names_for_completion(cloud: Cloud, gpuctl_on: Gpuctl) -> None:
    add_fleet(cloud)

    gpuctl_on("discover")

    assert [g["name"] for g in read_cache(cache_dir())][:2] == ["gpu-a", "gpu-b"]
    requests_before = len(cloud.sim.requests)
    assert [name for name, _ in complete_gpu("gpu-")] == [
        "gpu-a", "gpu-b", "gpu-c", "gpu-d", "gpu-e"]
    assert complete_gpu("id-gpu-c") == [("id-gpu-c", "gpu-c")]
    assert len(cloud.sim.requests) == requests_before  # TAB never touches the network


def test_status_of_a_running_gpu_shows_its_models_and_loaded_models(
    cloud: Cloud, gpuctl_on: Gpuctl
) -> None:
    cloud.sim.add("gpu-a", status="running", ip="127.0.0.1")
    cloud.node.loaded.add("llama3.2:latest")

    result = gpuctl_on("status", "gpu-a", "--json")

    assert result.exit_code == 0, result.output
    view = json.loads(result.stdout)
    assert view["name"] == "gpu-a"
    assert view["state"] == "idle"
    assert view["models"] == ["llama3.2:latest", "qwen2.5:7b"]
    assert view["loaded"] == ["llama3.2:latest"]


def test_status_table_marks_loaded_models(cloud: Cloud, gpuctl_on: Gpuctl) -> None:
    cloud.sim.add("gpu-a", status="running", ip="127.0.0.1")
    cloud.node.loaded.add("llama3.2:latest")

    result = gpuctl_on("status")

    assert result.exit_code == 0, result.output
    assert "llama3.2:latest*" in result.stdout
    assert "qwen2.5:7b" in result.stdout


def test_status_by_unique_prefix_finds_the_gpu(cloud: Cloud, gpuctl_on: Gpuctl) -> None:
    cloud.sim.add("gpu-alpha", ip="127.0.0.1")
    cloud.sim.add("gpu-beta", ip="127.0.0.1")

    result = gpuctl_on("status", "gpu-al", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["name"] == "gpu-alpha"


def test_ambiguous_prefix_lists_the_matches_and_exits_2(cloud: Cloud, gpuctl_on: Gpuctl) -> None:
    cloud.sim.add("gpu-alpha", ip="127.0.0.1")
    cloud.sim.add("gpu-alps", ip="127.0.0.1")

    result = gpuctl_on("status", "gpu-al")

    assert result.exit_code == 2
    assert "gpu-alpha" in result.stderr and "gpu-alps" in result.stderr
    assert result.stderr.startswith("Error: ")
    assert "Traceback" not in result.output


def test_unknown_gpu_exits_1_with_error_and_hint(cloud: Cloud, gpuctl_on: Gpuctl) -> None:
    cloud.sim.add("gpu-a", ip="127.0.0.1")

    result = gpuctl_on("status", "nope")

    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Error: ") and "nope" in lines[0]
    assert lines[1].startswith("Hint: ")
    assert result.stdout == ""


def test_resume_wait_sends_one_resume_and_returns_once_ollama_answers(
    cloud: Cloud, gpuctl_on: Gpuctl
) -> None:
    ws = cloud.sim.add("gpu-a", ip="127.0.0.1")

    result = gpuctl_on("resume", "gpu-a", "--wait", "--json")

    assert result.exit_code == 0, result.output
    assert cloud.sim.resume_posts[ws.id] == 1
    outcome = json.loads(result.stdout)
    assert outcome["success"] is True
    assert outcome["gpu"]["state"] == "idle"
    assert cloud.node.requests["/"] >= 1  # Ollama itself was asked, not only the cloud
    assert "Ollama ready" in result.stderr  # the stages, as plain lines off a terminal


def test_resume_without_wait_returns_after_the_cloud_accepts(
    cloud: Cloud, gpuctl_on: Gpuctl
) -> None:
    ws = cloud.sim.add("gpu-a", ip="127.0.0.1")
    cloud.sim.settle_after_reads = 1000  # still resuming long after the command returns

    result = gpuctl_on("resume", "gpu-a")

    assert result.exit_code == 0, result.output
    assert cloud.sim.resume_posts[ws.id] == 1
    assert "resuming gpu-a" in result.stderr


def test_resuming_a_running_gpu_is_a_success_without_a_cloud_call(
    cloud: Cloud, gpuctl_on: Gpuctl
) -> None:
    ws = cloud.sim.add("gpu-a", status="running", ip="127.0.0.1")

    result = gpuctl_on("resume", "gpu-a")

    assert result.exit_code == 0, result.output
    assert "already running" in result.stderr
    assert cloud.sim.resume_posts[ws.id] == 0


def test_resume_that_the_cloud_fails_exits_1_with_the_cloud_reason(
    cloud: Cloud, gpuctl_on: Gpuctl
) -> None:
    ws = cloud.sim.add("gpu-a", ip="127.0.0.1")
    cloud.sim.fail_next_resume(ws.id)

    result = gpuctl_on("resume", "gpu-a", "--wait")

    assert result.exit_code == 1
    assert "Timeout waiting for VM to resume." in result.stderr
    assert "Traceback" not in result.output


def test_timeout_requires_wait(gpuctl_on: Gpuctl) -> None:
    result = gpuctl_on("resume", "gpu-a", "--timeout", "5")

    assert result.exit_code == 2
    assert "--timeout" in result.output


def test_pause_sends_one_pause(cloud: Cloud, gpuctl_on: Gpuctl) -> None:
    ws = cloud.sim.add("gpu-a", status="running", ip="127.0.0.1")

    result = gpuctl_on("pause", "gpu-a", "--wait", "--json")

    assert result.exit_code == 0, result.output
    assert cloud.sim.pause_posts[ws.id] == 1
    assert json.loads(result.stdout)["gpu"]["state"] == "paused"


def test_pausing_a_paused_gpu_is_a_success_without_a_cloud_call(
    cloud: Cloud, gpuctl_on: Gpuctl
) -> None:
    ws = cloud.sim.add("gpu-a", status="paused", ip="127.0.0.1")

    result = gpuctl_on("pause", "gpu-a")

    assert result.exit_code == 0, result.output
    assert "already paused" in result.stderr
    assert cloud.sim.pause_posts[ws.id] == 0


def test_a_rejected_token_exits_4_without_traceback(cloud: Cloud, gpuctl_on: Gpuctl) -> None:
    cloud.sim.add("gpu-a")
    gpuctl_on.env["GPUCTL_API_TOKEN"] = "expired-token"

    result = gpuctl_on("discover")

    assert result.exit_code == 4
    assert result.stderr.startswith(
        "Error: SURF API rejected the token from environment variable GPUCTL_API_TOKEN "
        "(HTTP 401")
    assert "expired-token" not in result.output
    assert "Traceback" not in result.output


def test_a_missing_token_exits_4_listing_where_it_looked(cloud: Cloud, gpuctl_on: Gpuctl) -> None:
    del gpuctl_on.env["GPUCTL_API_TOKEN"]

    result = gpuctl_on("discover")

    assert result.exit_code == 4
    for place in ("GPUCTL_API_TOKEN", "CLOUD_API_TOKEN", "GPUCTL_API_TOKEN_FILE",
                  "CREDENTIALS_DIRECTORY", "OS keyring"):
        assert place in result.stderr
    assert "Hint: Run `gpuctl auth login`" in result.stderr


def test_an_unavailable_cloud_exits_1_with_a_readable_line(
    cloud: Cloud, gpuctl_on: Gpuctl
) -> None:
    cloud.sim.fail_requests(10, status=500)

    def provider(config: Any, credentials: Any) -> SurfProvider:
        return SurfProvider(f"{cloud.url}/v1", TOKEN, name_filter="gpu", sleep=no_sleep)

    result = gpuctl_on("discover", cloud_factory=provider)

    assert result.exit_code == 1
    assert result.stderr.startswith("Error: SURF API failed to list the workspaces: HTTP 500")
    assert "HTTP 500" in result.stderr
    assert "Traceback" not in result.output


def test_static_hosts_are_listed_and_pause_says_not_cloud_managed(
    cloud: Cloud, gpuctl: Gpuctl
) -> None:
    gpuctl.env.update({"GPUCTL_CLOUD_API__PROVIDER": "static",
                       "GPUCTL_CLOUD_API__HOSTS": cloud.node_url})

    listed = gpuctl("status", "--json")
    paused = gpuctl("pause", "127.0.0.1")

    assert listed.exit_code == 0, listed.output
    gpus = json.loads(listed.stdout)["gpus"]
    assert [(g["name"], g["state"]) for g in gpus] == [
        (f"127.0.0.1:{cloud.node_port}", "idle")]
    assert paused.exit_code == 1
    assert paused.stderr.startswith("Error: ") and "static host" in paused.stderr
    assert len(cloud.sim.requests) == 0  # no SURF API (and no token) needed


def test_debug_logs_never_contain_the_token(
    cloud: Cloud, gpuctl_on: Gpuctl, caplog: pytest.LogCaptureFixture
) -> None:
    ws = cloud.sim.add("gpu-a", ip="127.0.0.1")
    caplog.set_level(logging.DEBUG)

    result = gpuctl_on("--debug", "resume", "gpu-a", "--wait")

    assert result.exit_code == 0, result.output
    assert cloud.sim.resume_posts[ws.id] == 1
    assert any("actions/resume" in r.getMessage() for r in caplog.records)  # logs were on
    assert all(TOKEN not in r.getMessage() for r in caplog.records)
    assert TOKEN not in result.output
