"""gpuctl config path | show | set, and the precedence flag > env > file > default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gpuctl.cli.config_cmd import redact

from .conftest import Gpuctl

LEGACY = """\
# the config of the service gpuctl replaces
[server]
host = "0.0.0.0"
port = 8000

[cloud_api]
base_url = "https://gw.live.surfresearchcloud.nl/v1"
machine_name_filter = "GroulsR"      # workspaces whose name contains this

[timing]
reservation_minutes = 10
fallback_reservation_minutes = 3
startup_timeout_seconds = 120
ollama_readiness_wait_seconds = 10

[paths]
api_keys_file = "api_keys.json"
"""


def show(gpuctl: Gpuctl, *args: str, **context: Any) -> dict[str, Any]:
    result = gpuctl(*args, "config", "show", "--json", **context)
    assert result.exit_code == 0, result.output
    values: dict[str, Any] = json.loads(result.stdout)["values"]
    return values


def test_path_follows_config_flag_then_env_then_home(gpuctl: Gpuctl, gpuctl_home: Path,
                                                    tmp_path: Path) -> None:
    assert gpuctl("config", "path").stdout.strip() == str(gpuctl_home / "config.toml")
    gpuctl.env["GPUCTL_CONFIG"] = str(tmp_path / "from-env.toml")
    assert gpuctl("config", "path").stdout.strip() == str(tmp_path / "from-env.toml")
    flagged = gpuctl("--config", str(tmp_path / "flag.toml"), "config", "path")
    assert flagged.stdout.strip() == str(tmp_path / "flag.toml")


def test_precedence_is_flag_then_env_then_file_then_default(
    gpuctl: Gpuctl, gpuctl_home: Path
) -> None:
    (gpuctl_home / "config.toml").write_text("[server]\nport = 9000\nhost = '10.0.0.1'\n")

    from_file = show(gpuctl)
    gpuctl.env["GPUCTL_SERVER__PORT"] = "9100"
    from_env = show(gpuctl)
    from_flag = show(gpuctl, overrides={"server.port": 9200})

    assert from_file["server.port"] == {"value": 9000, "source": f"file {gpuctl_home}/config.toml"}
    assert from_file["server.max_queue"] == {"value": 256, "source": "default"}
    assert from_env["server.port"] == {"value": 9100, "source": "env GPUCTL_SERVER__PORT"}
    assert from_env["server.host"]["value"] == "10.0.0.1"  # the file still counts elsewhere
    assert from_flag["server.port"] == {"value": 9200, "source": "flag"}


def test_the_config_flag_beats_gpuctl_config(gpuctl: Gpuctl, tmp_path: Path) -> None:
    (tmp_path / "env.toml").write_text("[gpu]\nslots = 2\n")
    (tmp_path / "flag.toml").write_text("[gpu]\nslots = 8\n")
    gpuctl.env["GPUCTL_CONFIG"] = str(tmp_path / "env.toml")

    assert show(gpuctl)["gpu.slots"]["value"] == 2
    assert show(gpuctl, "--config", str(tmp_path / "flag.toml"))["gpu.slots"]["value"] == 8


def test_the_replaced_services_config_loads_unchanged(gpuctl: Gpuctl, gpuctl_home: Path) -> None:
    (gpuctl_home / "config.toml").write_text(LEGACY)

    values = show(gpuctl)

    assert values["cloud_api.machine_name_filter"]["value"] == "GroulsR"
    assert values["timing.startup_timeout_seconds"]["value"] == 120
    assert values["paths.api_keys_file"]["value"] == "api_keys.json"


def test_show_table_tags_sources_on_stdout_and_names_the_file_on_stderr(
    gpuctl: Gpuctl, gpuctl_home: Path
) -> None:
    result = gpuctl("config", "show")

    assert result.exit_code == 0
    assert "does not exist" in result.stderr and str(gpuctl_home) in result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("server.port"))
    assert "8000" in line and "default" in line


def test_show_redacts_credentials_in_urls(gpuctl: Gpuctl) -> None:
    gpuctl.env["GPUCTL_CLOUD_API__HOSTS"] = '["http://admin:hunter2@10.0.0.5:11434"]'

    result = gpuctl("config", "show")

    assert "hunter2" not in result.output
    assert "http://***@10.0.0.5:11434" in result.stdout


def test_redact_hides_secret_keys_and_url_userinfo() -> None:
    assert redact("node_token", "abc") == "***"
    assert redact("base_url", "https://u:p@gw.example/v1") == "https://***@gw.example/v1"
    assert redact("base_url", "https://gw.example/v1") == "https://gw.example/v1"
    assert redact("port", 8000) == 8000


def test_set_keeps_comments_and_layout(gpuctl: Gpuctl, gpuctl_home: Path) -> None:
    path = gpuctl_home / "config.toml"
    path.write_text(LEGACY)

    result = gpuctl("config", "set", "cloud_api.machine_name_filter", "ollama")

    assert result.exit_code == 0, result.output
    text = path.read_text()
    assert "# the config of the service gpuctl replaces" in text
    assert "# workspaces whose name contains this" in text
    assert 'machine_name_filter = "ollama"' in text
    assert "Set cloud_api.machine_name_filter" in result.stderr
    assert show(gpuctl)["cloud_api.machine_name_filter"]["value"] == "ollama"


def test_set_creates_the_file_with_the_right_type(gpuctl: Gpuctl, gpuctl_home: Path) -> None:
    result = gpuctl("config", "set", "gpu.slots", "6")

    assert result.exit_code == 0, result.output
    assert "slots = 6" in (gpuctl_home / "config.toml").read_text()


def test_set_rejects_a_bad_value_naming_the_key(gpuctl: Gpuctl, gpuctl_home: Path) -> None:
    result = gpuctl("config", "set", "server.port", "lots")

    assert result.exit_code == 2
    assert result.stderr.startswith("Error: ") and "server.port" in result.stderr
    assert not (gpuctl_home / "config.toml").exists()


def test_set_rejects_an_unknown_key_and_lists_known_ones(gpuctl: Gpuctl) -> None:
    result = gpuctl("config", "set", "server.colour", "blue")

    assert result.exit_code == 2
    assert "unknown config key 'server.colour'" in result.stderr
    assert "Hint: Known keys:" in result.stderr


def test_set_warns_when_an_env_variable_overrides_the_file(gpuctl: Gpuctl) -> None:
    gpuctl.env["GPUCTL_GPU__SLOTS"] = "3"

    result = gpuctl("config", "set", "gpu.slots", "6")

    assert "GPUCTL_GPU__SLOTS is set and overrides the file" in result.stderr


def test_an_unknown_section_names_the_file(gpuctl: Gpuctl, gpuctl_home: Path) -> None:
    (gpuctl_home / "config.toml").write_text("[sever]\nport = 1\n")

    result = gpuctl("config", "show")

    assert result.exit_code == 2
    assert "unknown section [sever]" in result.stderr
    assert str(gpuctl_home / "config.toml") in result.stderr


def test_invalid_toml_is_a_readable_error(gpuctl: Gpuctl, gpuctl_home: Path) -> None:
    (gpuctl_home / "config.toml").write_text("[server\nport = 1\n")

    result = gpuctl("config", "show")

    assert result.exit_code == 2
    assert "not valid TOML" in result.stderr
    assert "Traceback" not in result.output


def test_schedule_entries_load_validate_and_show(gpuctl: Gpuctl, gpuctl_home: Path) -> None:
    (gpuctl_home / "config.toml").write_text(
        '[timing]\npause_policy = "adaptive"\n\n'
        '[[schedule]]\ngpus = ["gpu-a"]\ndays = "mon-fri"\nfrom = "08:30"\nuntil = "18:00"\n'
        'timezone = "Europe/Amsterdam"\nmode = "awake"\n'
    )
    shown = gpuctl("config", "show", "--json")
    assert shown.exit_code == 0, shown.output
    values = json.loads(shown.stdout)["values"]
    assert values["timing.pause_policy"]["value"] == "adaptive"
    assert values["schedule[0].from"]["value"] == "08:30"
    assert values["schedule[0].timezone"]["value"] == "Europe/Amsterdam"


@pytest.mark.parametrize(("entry", "complaint"), [
    ('days = "mon-fry"', "days"),
    ('from = "8:75"', "from"),
    ('until = "25:00"', "until"),
    ('timezone = "Mars/Olympus"', "time zone"),
    ('mode = "asleep"', "mode"),
    ('lights = "on"', "lights"),
])
def test_a_bad_schedule_entry_is_a_config_error(
    gpuctl: Gpuctl, gpuctl_home: Path, entry: str, complaint: str
) -> None:
    (gpuctl_home / "config.toml").write_text(f"[[schedule]]\n{entry}\n")
    result = gpuctl("config", "show")
    assert result.exit_code == 2
    assert complaint in result.stderr
