"""The static provider and ``make_provider``."""

from __future__ import annotations

import pytest

from gpuctl.cloud import make_provider
from gpuctl.cloud.static import StaticProvider, static_workspace
from gpuctl.cloud.surf import SurfProvider
from gpuctl.config import load_config
from gpuctl.credentials import Credentials
from gpuctl.errors import ConfigError, CredentialsError, GpuNotFound, NotCloudManaged


def test_a_static_host_is_an_always_running_workspace_named_after_the_host() -> None:
    ws = static_workspace("http://10.0.0.5:11434/")

    assert (ws.name, ws.status, ws.active) == ("10.0.0.5:11434", "running", True)
    assert ws.id == "static-10-0-0-5-11434"
    assert ws.ip == "10.0.0.5" and ws.fqdn is None
    assert ws.node_url == "http://10.0.0.5:11434"


def test_a_bare_host_gets_ollamas_port_and_a_name_is_an_fqdn() -> None:
    ws = static_workspace("lab-gpu.example.org")

    assert ws.node_url == "http://lab-gpu.example.org:11434"
    assert ws.fqdn == "lab-gpu.example.org" and ws.ip is None


def test_an_https_host_keeps_its_default_port() -> None:
    assert static_workspace("https://ollama.example.org").node_url == "https://ollama.example.org"


def test_a_host_that_is_not_a_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"cloud_api\.hosts"):
        static_workspace("ftp://x")


async def test_static_provider_lists_gets_and_refuses_actions_clearly() -> None:
    provider = StaticProvider(["http://10.0.0.6:11434", "http://10.0.0.5:11434"])

    listed = await provider.list_workspaces()
    one = await provider.get_workspace(listed[0].id)

    assert [ws.name for ws in listed] == ["10.0.0.5:11434", "10.0.0.6:11434"]
    assert one == listed[0]
    assert provider.managed is False
    with pytest.raises(NotCloudManaged, match="static host: gpuctl cannot resume it"):
        await provider.resume(one.id)
    with pytest.raises(NotCloudManaged, match="cannot pause"):
        await provider.pause(one.id)
    with pytest.raises(GpuNotFound):
        await provider.get_workspace("nope")


async def test_make_provider_builds_surf_with_the_found_token() -> None:
    config = load_config(env={"GPUCTL_CLOUD_API__MACHINE_NAME_FILTER": "ollama"}).config

    provider = make_provider(config, Credentials({"GPUCTL_API_TOKEN": "t"}))
    try:
        assert isinstance(provider, SurfProvider)
        assert provider.name_filter == "ollama"
        assert provider.base_url == "https://gw.live.surfresearchcloud.nl/v1"
    finally:
        await provider.aclose()


def test_make_provider_for_surf_without_a_token_is_a_credentials_error() -> None:
    config = load_config(env={}).config

    with pytest.raises(CredentialsError):
        make_provider(config, Credentials({}))


def test_make_provider_for_static_needs_no_token() -> None:
    config = load_config(env={"GPUCTL_CLOUD_API__PROVIDER": "static",
                              "GPUCTL_CLOUD_API__HOSTS": "http://a:1,http://b:2"}).config

    provider = make_provider(config, Credentials({}))

    assert isinstance(provider, StaticProvider)
