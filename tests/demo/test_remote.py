"""``status --demo`` and ``discover --demo`` with no demo to ask, and ``demo.json`` itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from gpuctl.cli.remote import DEMO_FILE, DemoEndpoint, published_demo

from .conftest import gpuctl


def test_status_demo_without_a_running_demo_fails_with_a_hint() -> None:
    for command in ("status", "discover"):
        result = gpuctl(command, "--demo")
        assert result.exit_code == 1
        assert "Error: no `gpuctl serve --demo` is running" in result.stderr
        assert "Hint: Start one with `gpuctl serve --demo`" in result.stderr


def test_a_demo_json_left_by_a_dead_demo_is_not_trusted(gpuctl_home: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])  # its pid is unused once it ends
    dead.wait()
    path = gpuctl_home / "cache" / DEMO_FILE
    path.parent.mkdir()
    path.write_text(DemoEndpoint(url="http://127.0.0.1:9", key="sk-x", pid=dead.pid)
                    .model_dump_json())
    result = gpuctl("status", "--demo")
    assert result.exit_code == 1
    assert f"(process {dead.pid}) has ended" in result.stderr


def test_a_demo_that_does_not_answer_is_reported_not_crashed(gpuctl_home: Path) -> None:
    with published_demo(gpuctl_home / "cache" / DEMO_FILE, "http://127.0.0.1:9", "sk-x"):
        result = gpuctl("discover", "--demo")
    assert result.exit_code == 1
    assert "does not answer" in result.stderr
    assert "Traceback" not in result.output


def test_demo_json_is_private_and_removed_at_exit(tmp_path: Path) -> None:
    path = tmp_path / "cache" / DEMO_FILE
    with published_demo(path, "http://127.0.0.1:8000", "sk-secret") as endpoint:
        assert json.loads(path.read_text()) == {"url": "http://127.0.0.1:8000",
                                                "key": "sk-secret", "pid": os.getpid()}
        assert endpoint.pid == os.getpid()
        assert path.stat().st_mode & 0o777 == 0o600
    assert not path.exists()


def test_a_demo_does_not_remove_the_file_of_a_newer_demo(tmp_path: Path) -> None:
    path = tmp_path / DEMO_FILE
    with published_demo(path, "http://127.0.0.1:8000", "sk-old"):
        newer = DemoEndpoint(url="http://127.0.0.1:8001", key="sk-new", pid=os.getpid() + 1)
        path.write_text(newer.model_dump_json())
    assert DemoEndpoint.model_validate_json(path.read_text()) == newer
