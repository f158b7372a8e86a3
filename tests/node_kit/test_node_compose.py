"""``gpu-node/docker-compose.yml`` and ``.env.example``, read structurally.

There is no Docker engine here (so no ``docker compose config``); the file is parsed with a
strict reader of the YAML subset it uses and checked for what the node kit promises:
Ollama on the GPU and unpublished, the token only at the proxy, the right variables.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from gpuctl.config import GpuConfig, TimingConfig

from .mini_yaml import YamlSubsetError, parse
from .support import GPU_NODE

COMPOSE_TEXT = (GPU_NODE / "docker-compose.yml").read_text()
ENV_EXAMPLE = (GPU_NODE / ".env.example").read_text()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = parse(COMPOSE_TEXT)
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def ollama(compose: dict[str, Any]) -> dict[str, Any]:
    service: dict[str, Any] = compose["services"]["ollama"]
    return service


@pytest.fixture(scope="module")
def caddy(compose: dict[str, Any]) -> dict[str, Any]:
    service: dict[str, Any] = compose["services"]["caddy"]
    return service


def test_ollama_reserves_the_nvidia_gpu(ollama: dict[str, Any]) -> None:
    assert ollama["image"].startswith("ollama/ollama:")
    (device,) = ollama["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["capabilities"] == ["gpu"]


def test_ollama_port_is_not_published(ollama: dict[str, Any]) -> None:
    assert "ports" not in ollama
    assert ollama.get("network_mode") != "host"


def test_models_live_on_a_named_volume(compose: dict[str, Any], ollama: dict[str, Any]) -> None:
    assert "ollama:/root/.ollama" in ollama["volumes"]
    named = {v.split(":")[0] for s in compose["services"].values() for v in s.get("volumes", [])}
    named = {v for v in named if not v.startswith((".", "/"))}
    assert named <= set(compose["volumes"]), "every named volume is declared"


def test_ollama_runs_the_mounted_entrypoint(ollama: dict[str, Any]) -> None:
    assert "./entrypoint.sh:/gpuctl/entrypoint.sh:ro" in ollama["volumes"]
    assert ollama["entrypoint"] == ["/bin/bash", "/gpuctl/entrypoint.sh"]


def test_the_pull_list_has_its_own_variable(ollama: dict[str, Any]) -> None:
    env = ollama["environment"]
    assert env["GPUCTL_PULL_MODELS"].startswith("${GPUCTL_PULL_MODELS")
    assert "OLLAMA_MODELS" not in env, "OLLAMA_MODELS is Ollama's model directory"


def test_parallelism_and_keep_alive_default_to_the_gateways_slots_and_lease(
    ollama: dict[str, Any],
) -> None:
    env = ollama["environment"]
    slots = GpuConfig().slots
    lease = TimingConfig().reservation_minutes
    assert env["OLLAMA_NUM_PARALLEL"] == f"${{OLLAMA_NUM_PARALLEL:-{slots}}}"
    assert env["OLLAMA_KEEP_ALIVE"] == f"${{OLLAMA_KEEP_ALIVE:-{lease:g}m}}"
    assert f"\nOLLAMA_NUM_PARALLEL={slots}\n" in ENV_EXAMPLE
    assert f"\nOLLAMA_KEEP_ALIVE={lease:g}m\n" in ENV_EXAMPLE


def test_healthcheck_works_without_curl(ollama: dict[str, Any]) -> None:
    test = ollama["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL")
    assert "ollama" in test[1:] or "/dev/tcp" in " ".join(test)
    assert not {"curl", "wget"} & set(" ".join(test).split())


def test_both_services_restart(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        assert service["restart"] in ("unless-stopped", "always")


def test_caddy_serves_80_and_443_with_the_node_caddyfile(caddy: dict[str, Any]) -> None:
    assert {"80:80", "443:443"} <= set(caddy["ports"])
    assert "./Caddyfile:/etc/caddy/Caddyfile:ro" in caddy["volumes"]
    assert "caddy_data:/data" in caddy["volumes"], "certificates survive a restart"


def test_the_token_and_name_are_required_and_only_caddy_gets_the_token(
    caddy: dict[str, Any], ollama: dict[str, Any]
) -> None:
    env = caddy["environment"]
    assert env["GPUCTL_NODE_TOKEN"].startswith("${GPUCTL_NODE_TOKEN:?")
    assert env["GPUCTL_NODE_FQDN"].startswith("${GPUCTL_NODE_FQDN:?")
    assert "GPUCTL_NODE_TOKEN" not in ollama["environment"]


def test_every_variable_the_compose_file_reads_is_in_env_example() -> None:
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE_TEXT))
    documented = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE, re.MULTILINE))
    assert used - documented == set()
    assert "OLLAMA_MODELS" not in documented


def test_env_example_leaves_the_token_empty() -> None:
    assert re.search(r"^GPUCTL_NODE_TOKEN=$", ENV_EXAMPLE, re.MULTILINE)


@pytest.mark.parametrize(
    "text",
    ["a:\n\tb: 1\n", "a: &x 1\n", "a: |\n  text\n", "a: {b: 1}\n", "a: 1\na: 2\n", "a: 'open\n"],
    ids=["tab", "anchor", "block-scalar", "flow-mapping", "duplicate-key", "open-quote"],
)
def test_the_yaml_reader_rejects_what_it_does_not_understand(text: str) -> None:
    with pytest.raises(YamlSubsetError):
        parse(text)


def test_the_yaml_reader_reads_the_compose_idioms() -> None:
    text = 'a:\n  - "80:80"\n  - x: 1\n    y: [gpu]\n  - plain # note\nb:\n- z\nc:\n'
    assert parse(text) == {"a": ["80:80", {"x": "1", "y": ["gpu"]}, "plain"], "b": ["z"], "c": None}
