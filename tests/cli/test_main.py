"""The root command: help, version, exit codes, error display, and a light import."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest

from .conftest import Cloud, Gpuctl

if TYPE_CHECKING:
    from conftest import GpuctlProcess  # tests/conftest.py: the gpuctl_process fixture


def test_help_lists_every_fixed_command(gpuctl: Gpuctl) -> None:
    result = gpuctl("--help")

    assert result.exit_code == 0
    for command in ("discover", "status", "resume", "pause", "keys", "auth", "config",
                    "completion", "serve"):
        assert command in result.stdout


def test_no_arguments_shows_help_and_exits_2(gpuctl: Gpuctl) -> None:
    result = gpuctl()

    assert result.exit_code == 2
    assert "Usage: gpuctl" in result.output


def test_version(gpuctl: Gpuctl) -> None:
    result = gpuctl("--version")

    assert result.exit_code == 0
    assert result.stdout.startswith("gpuctl 0.")


def test_a_missing_argument_is_a_usage_error_with_exit_2(gpuctl: Gpuctl) -> None:
    result = gpuctl("resume")

    assert result.exit_code == 2
    assert "Missing argument 'GPU'" in result.output


def _boom(config: Any, credentials: Any) -> Any:
    raise RuntimeError("kaputt\nsecond line")


def test_an_unexpected_error_is_one_line_and_a_hint_without_traceback(gpuctl: Gpuctl) -> None:
    result = gpuctl("discover", cloud_factory=_boom)

    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: unexpected RuntimeError: kaputt",
        "Hint: this is a bug in gpuctl; rerun with --debug for the details and report them.",
    ]
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback(gpuctl: Gpuctl) -> None:
    result = gpuctl("--debug", "discover", cloud_factory=_boom)

    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert "RuntimeError: kaputt" in result.stderr


def _interrupted(config: Any, credentials: Any) -> Any:
    raise KeyboardInterrupt


def test_ctrl_c_exits_130(gpuctl: Gpuctl) -> None:
    result = gpuctl("discover", cloud_factory=_interrupted)

    assert result.exit_code == 130
    assert result.stderr.startswith("Interrupted.")
    assert "Traceback" not in result.output


def test_a_broken_config_file_is_one_readable_error_with_exit_2(
    gpuctl: Gpuctl, gpuctl_home: Any
) -> None:
    (gpuctl_home / "config.toml").write_text('[server]\nport = "eighty"\n')

    result = gpuctl("discover")

    assert result.exit_code == 2
    first = result.stderr.splitlines()[0]
    assert first.startswith("Error: ")
    assert str(gpuctl_home / "config.toml") in first and "server.port" in first
    assert "Traceback" not in result.output


def test_json_output_is_pure_json(gpuctl: Gpuctl) -> None:
    result = gpuctl("config", "show", "--json")

    assert result.exit_code == 0
    assert json.loads(result.stdout)["values"]["server.port"]["value"] == 8000


@pytest.mark.parametrize("module", ["quart", "granian", "gpuctl.engine.engine", "httpx",
                                    "pydantic", "keyring", "rich.table"])
def test_importing_the_cli_stays_light(module: str) -> None:
    code = f"import sys, gpuctl.cli.main; print({module!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_python_dash_m_gpuctl_runs_the_cli() -> None:
    out = subprocess.run([sys.executable, "-m", "gpuctl", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("gpuctl ")


def test_debug_logs_no_line_per_http_request_and_no_keyring_chatter(
    cloud: Cloud, gpuctl_process: GpuctlProcess,
) -> None:
    cloud.sim.add("gpu-a", status="running", ip="127.0.0.1")
    with gpuctl_process("--debug", "status", env=cloud.env()) as proc:
        assert proc.wait(30) == 0
        assert proc.stderr is not None
        log = proc.stderr.read()
    assert "DEBUG gpuctl" in log or "DEBUG asyncio" in log  # debug logging is on
    assert "HTTP Request:" not in log  # httpx's INFO line per request (node probes too)
    assert "keyring" not in log  # the token is in the environment
