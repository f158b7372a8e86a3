"""gpuctl auth login | status | logout against the simulated SURF API and an in-memory keyring."""

from __future__ import annotations

import json

import pytest
from keyring.backend import KeyringBackend
from keyring.backends import null

from gpuctl.credentials import SERVICE

from .conftest import TOKEN, Cloud, Gpuctl


@pytest.fixture
def no_env_token(gpuctl_on: Gpuctl) -> Gpuctl:
    del gpuctl_on.env["GPUCTL_API_TOKEN"]
    return gpuctl_on


def test_login_with_token_from_stdin_checks_then_stores_it(
    cloud: Cloud, no_env_token: Gpuctl, memory_keyring: KeyringBackend
) -> None:
    cloud.sim.add("gpu-a")

    result = no_env_token("auth", "login", "--with-token", input=f"{TOKEN}\n")

    assert result.exit_code == 0, result.output
    assert memory_keyring.get_password(SERVICE, "api_token") == TOKEN
    assert "accepts the token" in result.stderr
    assert TOKEN not in result.output
    assert cloud.sim.headers_seen[-1]["authorization"] == TOKEN


def test_login_reads_an_optional_csrf_token_from_the_second_line(
    no_env_token: Gpuctl, memory_keyring: KeyringBackend
) -> None:
    result = no_env_token("auth", "login", "--with-token", input=f"{TOKEN}\ncsrf-1\n")

    assert result.exit_code == 0, result.output
    assert memory_keyring.get_password(SERVICE, "csrf_token") == "csrf-1"


def test_login_prompts_hidden_when_no_stdin_flag(
    no_env_token: Gpuctl, memory_keyring: KeyringBackend
) -> None:
    result = no_env_token("auth", "login", input=f"{TOKEN}\n")

    assert result.exit_code == 0, result.output
    assert "SURF API token" in result.output
    assert TOKEN not in result.output  # hidden input is not echoed
    assert memory_keyring.get_password(SERVICE, "api_token") == TOKEN


def test_login_with_a_rejected_token_exits_4_and_stores_nothing(
    no_env_token: Gpuctl, memory_keyring: KeyringBackend
) -> None:
    result = no_env_token("auth", "login", "--with-token", input="wrong-token\n")

    assert result.exit_code == 4
    assert "rejected the token" in result.stderr
    assert memory_keyring.get_password(SERVICE, "api_token") is None


def test_login_refuses_a_keyring_that_drops_secrets(no_env_token: Gpuctl) -> None:
    result = no_env_token("auth", "login", "--with-token", input=f"{TOKEN}\n",
                          keyring_backend=null.Keyring())  # type: ignore[no-untyped-call]

    assert result.exit_code == 4
    assert "cannot store the token" in result.stderr
    assert "Hint: No usable OS keyring here" in result.stderr


def test_login_with_empty_input_is_a_usage_error(no_env_token: Gpuctl) -> None:
    result = no_env_token("auth", "login", "--with-token", input="\n")

    assert result.exit_code == 2
    assert "no token given" in result.stderr


def test_status_says_where_the_token_is_and_that_the_api_accepts_it(
    cloud: Cloud, gpuctl_on: Gpuctl
) -> None:
    cloud.sim.add("gpu-a")
    cloud.sim.add("gpu-b")

    result = gpuctl_on("auth", "status", "--json")

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["token_source"] == "environment variable GPUCTL_API_TOKEN"
    assert report["accepted"] is True
    assert report["workspaces_visible"] == 2
    assert TOKEN not in result.output


def test_status_of_a_rejected_token_exits_4(gpuctl_on: Gpuctl) -> None:
    gpuctl_on.env["GPUCTL_API_TOKEN"] = "expired"

    result = gpuctl_on("auth", "status")

    assert result.exit_code == 4
    assert "NO (rejected)" in result.stdout
    assert "expired" not in result.output


def test_status_without_a_token_exits_4_and_lists_the_places(no_env_token: Gpuctl) -> None:
    result = no_env_token("auth", "status", "--json")

    assert result.exit_code == 4
    report = json.loads(result.stdout)
    assert report["token_source"] is None
    assert "GPUCTL_API_TOKEN" in report["problem"] and "OS keyring" in report["problem"]


def test_status_finds_a_token_stored_by_login(
    no_env_token: Gpuctl, memory_keyring: KeyringBackend
) -> None:
    memory_keyring.set_password(SERVICE, "api_token", TOKEN)

    report = json.loads(no_env_token("auth", "status", "--json").stdout)

    assert report["token_source"].startswith("OS keyring")
    assert report["accepted"] is True


def test_logout_removes_the_token_and_mentions_an_env_token_that_remains(
    gpuctl_on: Gpuctl, memory_keyring: KeyringBackend
) -> None:
    memory_keyring.set_password(SERVICE, "api_token", TOKEN)

    result = gpuctl_on("auth", "logout")

    assert result.exit_code == 0
    assert memory_keyring.get_password(SERVICE, "api_token") is None
    assert "Removed the token" in result.stderr
    assert "still provided by environment variable GPUCTL_API_TOKEN" in result.stderr
