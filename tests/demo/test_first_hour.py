"""The ten frictions a newcomer met in the first hour, each pinned by a test.

1. the demo's curl promises ``-i``; 2. the client commands say where to install their package;
3. ``status`` has the lease column its help promises, and a 15 s lease is not "0 min";
4. an unknown demo GPU hints at ``discover --demo``; 5. ``resume``/``pause`` take ``--demo``;
6. GPU names complete after ``status --demo``; 7. ``serve`` exits 130 on Ctrl-C (0 on
SIGTERM, tested beside the demo's other process tests); 8. ``config set`` with a bad value
shows a good one; 9. a missing token mentions the demo; 10. pytest says why it skips.
"""

from __future__ import annotations

import io
import re
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import tomlkit
from rich.console import Console

from gpuctl.cli.gpucache import complete_gpu
from gpuctl.cli.output import gpu_detail_table, gpu_table
from gpuctl.engine.api import GpuState, GpuView, LeaseView
from gpuctl.sim.demo import try_commands

from .conftest import DemoFactory, gpuctl, gpuctl_beside

if TYPE_CHECKING:
    from conftest import GpuctlProcess  # tests/conftest.py: the gpuctl_process fixture

ROOT = Path(__file__).resolve().parents[2]


def test_1_the_demo_curl_shows_the_headers_its_comment_mentions() -> None:
    (comment, curl), *_ = try_commands("http://127.0.0.1:8000", "sk-demo")
    assert curl.startswith("curl -iN ") and "-i shows the headers" in comment


def test_2_the_client_commands_say_where_to_install_their_package() -> None:
    _, (ollama_comment, _), (openai_comment, _) = try_commands("http://h:1", "sk-demo")
    assert "python3 -m pip install ollama" in ollama_comment
    assert "not gpuctl's pipx environment" in ollama_comment
    assert "python3 -m pip install openai" in openai_comment


def _text(renderable: object) -> str:
    console = Console(width=160, file=io.StringIO(), record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


def test_3_status_shows_leases_and_a_short_lease_in_seconds() -> None:
    gpu = GpuView(id="ws-1", name="gpu-1", state=GpuState.IDLE, cloud_status="running",
                  flavor="a10", slots=4, leases=[LeaseView(user="alice", expires_in_seconds=15)])
    table = _text(gpu_table([gpu], with_models=True))
    assert "LEASES" in table and "alice 15 s" in table
    assert "alice (15 s left)" in _text(gpu_detail_table(gpu))
    longer = gpu.model_copy(update={"leases": [LeaseView(user="bob", expires_in_seconds=600)]})
    assert "bob (10 min left)" in _text(gpu_detail_table(longer))


async def test_4_5_6_the_demo_commands_hint_act_and_complete(start_demo: DemoFactory) -> None:
    async with start_demo(reservation_minutes=5):
        missing = await gpuctl_beside("status", "nosuch", "--demo")
        assert missing.exit_code == 1
        assert "gpuctl discover --demo" in missing.stderr  # 4: the command that will work
        woken = await gpuctl_beside("resume", "gpu-2", "--demo", "--wait")
        assert woken.exit_code == 0, woken.output  # 5
        listed = await gpuctl_beside("status", "gpu-2", "--demo", "--json")
        assert '"state": "idle"' in listed.stdout
        paused = await gpuctl_beside("pause", "gpu-2", "--demo", "--json")
        assert paused.exit_code == 0, paused.output
        assert '"success": true' in paused.stdout
        assert (await gpuctl_beside("status", "--demo")).exit_code == 0
    assert [name for name, _ in complete_gpu("gpu-")] == ["gpu-1", "gpu-2", "gpu-3"]  # 6


def test_7_serve_exits_130_on_ctrl_c(gpuctl_process: GpuctlProcess) -> None:
    with gpuctl_process("serve", "--demo", "--port", "0") as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("Watch the fleet"):
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 130


def test_8_config_set_with_a_bad_value_shows_a_good_one() -> None:
    result = gpuctl("config", "set", "gpu.slots", "abc")
    assert result.exit_code == 2
    assert "Hint: For example `gpuctl config set gpu.slots 4` (the default)." in result.stderr


def test_9_discover_without_a_token_mentions_the_demo() -> None:
    result = gpuctl("discover")
    assert result.exit_code == 4
    assert "gpuctl serve --demo" in result.stderr and "discover --demo" in result.stderr


def test_10_pytest_says_why_each_test_was_skipped() -> None:
    pyproject = tomlkit.parse((ROOT / "pyproject.toml").read_text()).unwrap()
    addopts = pyproject["tool"]["pytest"]["ini_options"]["addopts"]
    assert re.search(r"(^|\s)-rs(\s|$)", addopts)

