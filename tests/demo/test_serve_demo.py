"""``gpuctl serve --demo`` as a newcomer runs it: a real process, stopped with SIGTERM."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from gpuctl.cli.remote import DEMO_FILE

if TYPE_CHECKING:
    from conftest import GpuctlProcess  # tests/conftest.py: the gpuctl_process fixture


def test_serve_demo_prints_the_key_and_three_commands_and_exits_0_on_sigterm(
    gpuctl_home: Path, gpuctl_process: GpuctlProcess,
) -> None:
    # Any attempt to read a keyring fails loudly: the demo needs no credentials.
    env = {"PYTHON_KEYRING_BACKEND": "keyring.backends.fail.Keyring"}
    with gpuctl_process("serve", "--demo", "--port", "0", env=env) as proc:
        assert proc.stderr is not None
        intro: list[str] = []
        for line in proc.stderr:  # ends at the last line of the intro (or at EOF: a failure)
            intro.append(line.rstrip("\n"))
            if line.startswith("Watch the fleet"):
                break
        text = "\n".join(intro)
        assert "Watch the fleet: gpuctl top --demo" in text, text
        url = re.search(r"^Gateway:  (http://127\.0\.0\.1:\d+) ", text, re.M)
        key = re.search(r"^Demo key: (sk-[\w-]+)$", text, re.M)
        assert url and key, text
        assert f"Page:     {url.group(1)}/ui/  " in text  # the page, beside the demo key
        commands = [line.strip() for line in intro if line.startswith(("  curl", "  python3"))]
        assert [c.split()[0] for c in commands] == ["curl", "python3", "python3"]
        assert all(key.group(1) in c and url.group(1) in c for c in commands)
        assert "ollama.Client(" in commands[1] and "openai.OpenAI(" in commands[2]
        published = json.loads((gpuctl_home / "cache" / DEMO_FILE).read_text())
        assert published == {"url": url.group(1), "key": key.group(1), "pid": proc.pid}
        health = httpx.get(f"{url.group(1)}/gpu/discover", timeout=10,
                           headers={"Authorization": f"Bearer {key.group(1)}"})
        assert health.json()["discovered_gpus"] == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert not (gpuctl_home / "cache" / DEMO_FILE).exists()
        assert not (gpuctl_home / "state").exists()  # the user's own state is untouched


def test_serve_demo_stopped_right_after_its_intro_still_exits_0_and_cleans_up(
    gpuctl_home: Path, gpuctl_process: GpuctlProcess,
) -> None:
    with gpuctl_process("serve", "--demo", "--port", "0") as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("Watch the fleet"):
                break
        proc.send_signal(signal.SIGTERM)  # before the gateway has even started its engine
        assert proc.wait(15) == 0
        assert not (gpuctl_home / "cache" / DEMO_FILE).exists()
